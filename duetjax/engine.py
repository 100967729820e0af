"""The public ``Engine``: vLLM-shaped ``generate`` / ``chat`` over continuous batching.

Each ``step`` schedules a batch (``scheduler.py``), launches it on an executor
(``executor.py``; in duet mode a split iteration runs on worker processes instead,
``split_executor.py``) and turns the results of the step launched before into outputs
(``output_processor.py``). Admitting requests is ``admission.py``'s; building the parts at
start-up, ``duet/assembly.py``'s.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from types import MappingProxyType
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from models import ModelConfig

from .config import EngineConfig
from .core.device_state import kv_dtype
from .core.admission import Prompt
from .duet.assembly import assemble, load, prepare
from .duet.split_mode import DuetStats
from .engine_stats import EngineStats
from .loop_stats import LoopStats
from .outputs import RequestOutput
from .sampling_defaults import SamplingDefaults
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .core.step_inputs import Bucket

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "LoopStats", "Prompt"]

Conversation = Sequence[dict]  # OpenAI-style messages


class Engine:
    """Loads a model and serves prompts with continuous batching.

    ``Engine()`` serves the embedded SmolLM2-135M-Instruct; ``Engine(model=PATH)`` a Hugging
    Face directory, a GGUF file or an Orbax checkpoint directory; ``load_format="dummy"``
    random weights of the real shapes.
    Extra keyword arguments are ``EngineConfig`` fields; ``mode="duet"`` turns on DuetServe's
    split mode (create the Engine before any other JAX call then: see ``duet.prepare_process``).
    Requests without SamplingParams get ``get_default_sampling_params()``: the model's
    generation config's settings (``generation_config``, as vLLM's; ``sampling_defaults.py``).
    """

    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto",
                 load_format: str = "auto", show_progress: bool = True, **config: Any):
        self.config = EngineConfig(**config)
        setup = prepare(self.config)  # before JAX meets the GPU, and before the slow part
        log.info("mode %s (%s)", setup.mode, setup.why)
        loaded = load(model, dtype, load_format, self.config, setup)
        self.sampling_defaults = SamplingDefaults.resolve(self.config.generation_config, loaded)
        """The SamplingParams fields the model's generation config sets."""
        parts = assemble(loaded, self.config, setup, show_progress)
        self.mode, self.model, self.tokenizer = setup.mode, parts.model, loaded.tokenizer
        self.max_model_len = parts.max_model_len
        self.runner, self.duet, self.token_budget = parts.runner, parts.duet, parts.token_budget
        self.scheduler, self.output_processor = parts.scheduler, parts.output_processor
        self.executor, self.split_executor = parts.executor, parts.split_executor
        self.admission, self.loop_stats = parts.admission, parts.loop_stats
        self._budgets: collections.Counter[int] = collections.Counter()
        """How often each SLO-aware budget ran (aggregated iterations with prefill work)."""
        self._last_budget: int | None = None
        self._num_steps = 0

    # ---- what the engine is and does ------------------------------------------------------

    @property
    def model_path(self) -> Path:
        """Where the model was loaded from (a directory or a GGUF file)."""
        return self.model.path

    @property
    def model_config(self) -> ModelConfig:
        """The model's architecture (layers, heads, sizes), e.g. for roofline estimates."""
        return self.model.config

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype, and that of every weight outside FP8 linear layers."""
        return np.dtype(self.model.dtype)

    @property
    def kv_cache_dtype(self) -> np.dtype:
        """The KV cache's element type: e4m3 with ``kv_cache_dtype='fp8'``, else ``dtype``."""
        return np.dtype(kv_dtype(self.model, self.config))

    @property
    def quantization(self) -> str | None:
        """'fp8' when the linear layers hold FP8 weights; None when every weight is in ``dtype``."""
        return "fp8" if self.model.quantization is not None else None

    @property
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size)."""
        return self.model.config.vocab_size

    @property
    def sm_share(self) -> tuple[float, float]:
        """(prefill, decode) SM shares of the last iteration: (1, 1) when aggregated."""
        decision = self.duet.stats.last_decision if self.duet is not None else None
        return (decision.s_p, decision.s_d) if decision is not None else (1.0, 1.0)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's state and counters (nothing in it changes later)."""
        scheduler, blocks = self.scheduler, self.scheduler.blocks
        duet = self.duet.stats.counters() if self.duet is not None else {}
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=blocks.usage, num_free_pages=blocks.num_free_pages,
            num_pages=blocks.num_pages, page_size=self.config.page_size,
            prefix_cache_hit_rate=blocks.prefix_hit_rate, prefix_cache_hit_tokens=blocks.prefix_hits,
            prefix_cache_query_tokens=blocks.prefix_queries,
            mode=self.mode, sm_share=self.sm_share, num_steps=self._num_steps,
            num_preemptions=scheduler.num_preemptions, num_constrained=scheduler.num_constrained,
            num_prompt_logprobs=scheduler.num_prompt_logprobs,
            token_budget=self._last_budget or self.config.max_num_batched_tokens,
            token_budget_choices=MappingProxyType(dict(self._budgets)),
            **self._mixed_step_correction(),
            loop=dataclasses.replace(self.loop_stats), compile_seconds=self.runner.compile_seconds,
            **duet)

    def _mixed_step_correction(self) -> dict[str, Any]:
        """The online correction of the mixed steps' predictions (duet mode's, or the SLO-aware
        budget's), as ``EngineStats`` fields; none without one."""
        if self.duet is not None:
            correction = self.duet.correction if self.duet.corrected is not None else None
        else:
            correction = getattr(getattr(self.token_budget, "roofline", None), "correction", None)
        if correction is None:
            return {}
        return dict(mixed_step_correction=correction.factor("aggregated"),
                    mixed_step_observations=correction.observations.get(("aggregated",), 0),
                    mixed_step_errors=correction.error_quantiles("aggregated", (0.5, 0.9, 0.99)))

    def split_history(self) -> DuetStats | None:
        """Duet mode: a copy of every split iteration's records (predicted and measured times,
        k, SM shares, each worker's own time), for benchmarks and roofline fits; None when
        aggregated. It grows with every split iteration: ``stats()`` is the cheap snapshot."""
        return copy.deepcopy(self.duet.stats) if self.duet is not None else None

    def compiled_buckets(self) -> list[Bucket]:
        """The step shapes compiled so far (every one the scheduler can ask for once
        ``compile_on_start`` compiled them: serving never compiles)."""
        return self.runner.compiled_buckets()

    def wait_for_workers(self, timeout: float) -> list[str]:
        """Duet mode: blocks until every worker process is ready (they load and compile in the
        background; until then iterations run aggregated) and returns their names; raises
        ``WorkerDied`` if one is not ready within ``timeout`` seconds. Aggregated mode: returns
        [] at once."""
        if self.duet is None:
            return []
        self.duet.wait_ready(timeout)
        return sorted(client.name for client in self.duet.workers.values())

    def close(self) -> None:
        """Stops duet workers and the MPS daemon this engine started (idempotent)."""
        if self.duet is not None:
            self.duet.close()
            self.duet = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------------------------

    def get_default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """What a request without SamplingParams samples with: the model's generation config's
        settings (vLLM's ``LLM.get_default_sampling_params``), with ``overrides``
        (SamplingParams fields) on top, e.g. ``get_default_sampling_params(max_tokens=64)``."""
        return self.sampling_defaults.params(**overrides)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues one prompt; returns its request id. No params: the model's defaults."""
        request = self.admission.request(prompt, params or self.get_default_sampling_params(),
                                         request_id)
        self.output_processor.add(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stops a request now and frees its pages (unknown or finished ids are ignored). One
        whose pages a duet worker's running step still writes is stopped once that step ends."""
        if self.split_executor is None or not self.split_executor.defer_abort(request_id):
            self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_work() or self.executor.holds_unfinished()
                or (self.split_executor is not None and self.split_executor.busy))

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling iteration, pipelined: it launches step N+1 before reading step N's
        tokens, so the device never waits for the host. Stop conditions are therefore checked
        one step late; a token computed past a stop is discarded. Returns the outputs of the
        requests that got a token in step N, and of those that failed
        (``OutputProcessor.fail``). In duet mode an iteration the optimizer splits runs on the
        worker pair instead (``SplitExecutor``)."""
        self._num_steps += 1
        outputs = self._step()
        if self.output_processor.failed:
            outputs = outputs + self.output_processor.take_failed()
        return outputs

    def _step(self) -> list[RequestOutput]:
        split = self.split_executor
        if split is None:
            return self._aggregated_step()
        if split.iteration is not None:  # a split iteration's chunk runs: it goes on
            return split.advance()
        decision, pair = split.decide()
        drained = split.leave_stream(pair)
        if pair is not None:
            return drained + split.start(decision, pair)
        if decision is None:
            return drained + self._aggregated_step()
        return drained + self._aggregated_step(decision.t_aggregated, decision.token_budget)

    def _aggregated_step(self, predicted: float | None = None,
                         budget: int | None = None) -> list[RequestOutput]:
        """One pipelined step on this process's device: schedule, launch, then read the step
        launched before. ``budget``: its tokens (None: the SLO-aware budget's choice, else the
        fixed one). When the step in flight samples a constrained token (structured outputs),
        its tokens are read first: the next step's token mask follows from them, so the
        pipeline waits for the device."""
        started = time.perf_counter()
        executor, processor = self.executor, self.output_processor
        drained, waited = [], 0.0
        if executor.in_flight is not None and executor.in_flight.samples_constrained:
            drained, waited = processor.process(executor.take_in_flight())
        drain_seconds = time.perf_counter() - started
        if budget is None and self.token_budget is not None and self.scheduler.has_prefill_work():
            budget = self.token_budget.choose(*self.scheduler.preview(),
                                              self.scheduler.queue_to_pace(time.time()))
            predicted = self.token_budget.last_predicted_s or None
        if budget is not None:  # (an SLO-aware budget, in either mode)
            self._last_budget = budget
            self._budgets[budget] += 1
        batch = self.scheduler.schedule(self.config.decode_steps, budget=budget)
        scheduled = prepared = time.perf_counter()
        launched = executor.launch(batch)  # (None: nothing launched)
        launch_seconds = 0.0
        if launched is not None:
            launch_seconds = self.runner.last_launch_seconds
            prepared = time.perf_counter()
            processor.reserve(batch, launched)
            self.scheduler.commit(batch)
        marked = time.perf_counter()
        ready, read_waited = processor.process(executor.in_flight) if executor.in_flight else ([], 0.0)
        executor.advance(launched, predicted)
        self.loop_stats.record_aggregated(started, drain_seconds, scheduled, prepared, marked,
                                          launch_seconds, waited + read_waited,
                                          batch.num_steps if batch.scheduled else 0)
        return drained + ready if drained else ready

    # ---- batch APIs -------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt; returns one ``RequestOutput`` per prompt, in order.
        No sampling_params: ``get_default_sampling_params()``, the model's defaults."""
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(self.add_request(prompt, params))
        except Exception:
            for request_id in ids:
                self.abort(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.admission.chat_prompt(conversation, add_generation_prompt,
                                              chat_template_kwargs) for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: Iterable[str], use_tqdm: bool) -> list[RequestOutput]:
        order = {request_id: i for i, request_id in enumerate(request_ids)}
        results: list[RequestOutput | None] = [None] * len(order)
        self.output_processor.finished_only = True
        try:
            with tqdm(total=len(order), desc="generate", disable=not use_tqdm) as bar:
                while self.has_unfinished_requests():
                    for output in self.step():
                        if output.finished and output.request_id in order:
                            results[order[output.request_id]] = output
                            bar.update(1)
        finally:
            self.output_processor.finished_only = False
        return results
