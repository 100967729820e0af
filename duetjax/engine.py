"""The public ``Engine``: vLLM-shaped ``generate`` / ``chat`` over continuous batching."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing.connection
import numbers
import time
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import jax
import numpy as np
from tqdm.auto import tqdm

import pallas_kernels

from models import LoadedModel, load_model

from .block_manager import BlockManager
from .compilation_cache import enable_compilation_cache
from .config import EngineConfig
from .correction import Correction
from .duet import (Duet, build_roofline, device_profile, duet_kv_bytes, final_dispatch_steps,
                   prepare_process)
from .model_runner import InFlight, ModelRunner, plan_num_pages
from .outputs import CompletionOutput, RequestOutput
from .prompt_logprobs import chunks_of
from .request import PENDING, Request, RequestStatus
from .roofline import DeviceProfile
from .sampling_defaults import SamplingDefaults
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput, split_batch
from .shared_state import SharedState
from .step_inputs import MIN_MIXED_TOKENS, bucket_for, build_inputs
from .structured_outputs import GrammarCompiler, all_tokens_mask, fill_token_mask
from .token_budget import TokenBudget
from .worker_client import RemoteInFlight, WorkerDied

log = logging.getLogger(__name__)

FINISHED = RequestStatus.FINISHED

Prompt = Union[str, dict]
Message = dict
Conversation = Sequence[Message]


@dataclasses.dataclass
class LoopStats:
    """Where the host loop's time goes (the device is busy meanwhile when pipelining works)."""

    steps: int = 0
    """Model steps run (a k-step decode counts k)."""
    dispatches: int = 0
    """Executable launches (loop iterations that launched nothing record no dispatch)."""
    host_seconds: float = 0.0
    """Python work: scheduling, input preparation and output processing."""
    launch_seconds: float = 0.0
    """Inside the executable call (the runtime blocks there while its queue is full)."""
    wait_seconds: float = 0.0
    """Blocked on the device for a step's results."""
    schedule_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: the scheduler's pass."""
    prepare_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: building and packing the inputs."""
    launch_bookkeeping_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: reserving output slots, committing."""
    apply_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: applying sampled tokens (stop checks,
    detokenizing, outputs)."""

    def record(self, host: float, launch: float, wait: float, steps: int = 1) -> None:
        self.steps += steps
        self.dispatches += 1 if steps else 0
        self.host_seconds += host
        self.launch_seconds += launch
        self.wait_seconds += wait

    @property
    def host_ms_per_step(self) -> float:
        return 1e3 * self.host_seconds / max(self.steps, 1)


def _logprobs_of(sampled, step: int, row: int, token: int, top_n: int) -> dict[int, float]:
    """{token id: logprob} for the sampled token and the top-N alternatives of one row."""
    entry = {int(t): float(lp) for t, lp in zip(sampled.top_ids[step, row, :top_n],
                                                 sampled.top_logprobs[step, row, :top_n])}
    entry[token] = float(sampled.logprobs[step, row])
    return entry


@dataclasses.dataclass
class _Split:
    """A split iteration in progress (its prefill chunk runs across ``Engine.step`` calls)."""

    decision: Any
    pair: tuple[Any, Any]
    """(prefill worker, decode worker)."""
    launched_at: float
    stream_k: int
    """Decode steps per decode-worker dispatch while the chunk runs."""
    stream_step_seconds: float = 0.0
    """Predicted time of one of those decode steps."""
    prefill: Any = None
    """The chunk's RemoteInFlight (None: no chunk, or its worker died)."""
    request_ids: set[str] = dataclasses.field(default_factory=set)
    """Requests in the chunk: the decode stream leaves them alone."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    """Worker-side seconds: the chunk, and the decode dispatches that finished meanwhile."""
    decode_steps: int = 0
    """Decode steps those dispatches ran."""
    decode_dispatches: int = 0
    prefill_tokens: int = 0
    """Tokens of the chunks."""
    decode_batch: int = 0
    """Requests of the first decode dispatch."""


class Engine:
    """Loads a model and serves prompts with continuous batching.

    ``Engine()`` serves the embedded SmolLM2-135M-Instruct; ``Engine(model=PATH)`` a Hugging
    Face directory or a GGUF file; ``load_format="dummy"`` random weights of the real shapes.
    Extra keyword arguments are ``EngineConfig`` fields; ``mode="duet"`` turns on DuetServe's
    split mode (create the Engine before any other JAX call then: see ``duet.prepare_process``).
    Requests without SamplingParams get ``get_default_sampling_params()``: the model's
    generation config's settings (``generation_config``, as vLLM's; ``sampling_defaults.py``).
    """

    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto",
                 load_format: str = "auto", show_progress: bool = True, **config: Any):
        self.config = EngineConfig(**config)
        self.mode, daemon, why = prepare_process(self.config.mode)  # before JAX meets the GPU
        # What the mode needs is checked before the slow part (loading, compiling) starts.
        profile = None
        if self.mode == "duet" or self.config.tbt_slo_ms is not None:  # (the roofline's)
            profile = device_profile(self.config, "duet mode" if self.mode == "duet"
                                     else "tbt_slo_ms in aggregated mode")
        self.model: LoadedModel = load_model(model, dtype=dtype, load_format=load_format)
        self.sampling_defaults = SamplingDefaults.resolve(self.config.generation_config, self.model)
        """The SamplingParams fields the model's generation config sets."""
        if self.sampling_defaults.fields:
            log.info("default sampling, from the model's generation config: %s (requests override "
                     "it; generation config 'vllm' leaves it out)", ", ".join(
                         f"{k}={v}" for k, v in self.sampling_defaults.fields.items()))
        self.tokenizer = self.model.tokenizer
        cfg = self.model.config
        limit = cfg.max_position_embeddings
        if self.config.max_model_len is not None:
            limit = self.config.max_model_len
        elif jax.default_backend() != "gpu":
            limit = min(limit, self.config.cpu_max_model_len)
        self.max_model_len = limit
        enable_compilation_cache(self.config.compilation_cache_dir)
        self.duet: Duet | None = None
        if self.mode == "duet":
            self.runner = self._shared_runner()
        else:
            self.runner = ModelRunner(self.model, self.config, self.max_model_len)
        log.info("mode %s (%s)", self.mode, why)
        if self.config.compile_on_start:
            self.runner.compile_all(show_progress=show_progress)
        if self.mode == "duet":  # after compiling: prefill workers load the same executables
            try:
                self.duet = Duet(self.model, self.config, self.max_model_len,
                                 self.runner.num_pages, self.runner.shared, daemon, profile)
            except BaseException:
                self.runner.shared.close()
                raise
        self.token_budget = self._slo_token_budget(profile)
        """Aggregated mode with a TBT SLO: each iteration's token budget (None: the fixed one)."""
        blocks = BlockManager(self.runner.num_pages, self.config.page_size,
                              self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, blocks, self.max_model_len,
                                   fill_slot=self._fill_slot)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else cfg.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._in_flight: InFlight | None = None
        self._split: _Split | None = None
        """The split iteration whose prefill chunk is running, if any."""
        self._stream: RemoteInFlight | None = None
        """The decode stream's dispatch running on a decode worker, if any. It may outlive its
        split iteration: the next split's chunk launches without waiting for it."""
        self._deferred_aborts: list[str] = []
        """Aborted requests whose pages a worker step still writes (freed once it ends)."""
        self._in_flight_predicted: float | None = None
        """The controller's prediction for the in-flight aggregated step (duet mode)."""
        self._last_results: float | None = None
        """When the previous aggregated step's results arrived, while the pipeline stays full."""
        self._finished_outputs_only = False
        """``step`` returns outputs of finished requests only (``generate`` needs no others)."""
        self._failed_outputs: list[RequestOutput] = []
        """Outputs of requests failed since ``step`` last returned (``_fail``)."""
        self._grammars = (GrammarCompiler(self.tokenizer.backend.to_str(), cfg.vocab_size,
                                          self.eos_token_ids) if self.tokenizer else None)
        """Structured outputs' grammar compiler (None: no tokenizer)."""
        self.stats = LoopStats()
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(self.config.seed)
        log.info("engine ready: %s (%s, %s), max_model_len %d, load %.1fs", self.model.path,
                 cfg.architecture, np.dtype(self.model.dtype).name, self.max_model_len,
                 self.model.load_seconds)

    def _shared_runner(self) -> ModelRunner:
        """Duet mode: weights, KV pool and counts in buffers the workers attach to."""
        free = None
        cfg = self.model.config
        if jax.default_backend() == "gpu":
            import cupy
            pairs = self.config.active_duet_pairs
            free = duet_kv_bytes(
                free_bytes=cupy.cuda.runtime.memGetInfo()[0],
                weight_bytes=sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.model.params)),
                workers=len({p for p, _ in pairs} | {d for _, d in pairs}),
                worker_reserve_gib=self.config.duet_worker_reserve_gib,
                kv_tokens=self.config.kv_cache_tokens,
                kv_bytes_per_token=pallas_kernels.kv_bytes_per_token(
                    cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                    np.dtype(self.model.dtype).itemsize))
        num_pages = plan_num_pages(self.model, self.config, free)
        shared = SharedState.create(
            self.model.params,
            pallas_kernels.kv_pool_shape(cfg.num_layers, num_pages, cfg.num_kv_heads,
                                         self.config.page_size, cfg.head_dim),
            self.model.dtype, (self.config.max_num_seqs, cfg.vocab_size))
        self.model = dataclasses.replace(self.model, params=None)  # one copy: the shared one
        return ModelRunner(self.model, self.config, self.max_model_len, num_pages=num_pages,
                           shared=shared)

    def _slo_token_budget(self, profile: DeviceProfile | None) -> TokenBudget | None:
        """The SLO-aware budget of aggregated iterations, when a TBT SLO is set."""
        config = self.config
        if self.mode != "aggregated" or config.tbt_slo_ms is None:
            return None
        roofline = build_roofline(self.model.config, self.model.dtype, config, self.max_model_len,
                                  profile, Correction() if config.duet_online_correction else None)
        return TokenBudget(roofline, config.tbt_slo_ms / 1e3, config.max_num_batched_tokens,
                           min_tokens=MIN_MIXED_TOKENS, min_prefill_tokens=MIN_MIXED_TOKENS)

    @property
    def sm_share(self) -> tuple[float, float]:
        """(prefill, decode) SM shares of the last iteration: (1, 1) when aggregated."""
        decision = self.duet.stats.last_decision if self.duet is not None else None
        return (decision.s_p, decision.s_d) if decision is not None else (1.0, 1.0)

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

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if isinstance(ids, (str, bytes)) or not all(
                        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                    raise TypeError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), [int(t) for t in ids]
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError(f"{self.model.path} ships no tokenizer; pass {{'prompt_token_ids': [...]}}")
        return prompt, self.tokenizer.encode(prompt)

    def get_default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """What a request without SamplingParams samples with: the model's generation config's
        settings (vLLM's ``LLM.get_default_sampling_params``), with ``overrides``
        (SamplingParams fields) on top, e.g. ``get_default_sampling_params(max_tokens=64)``."""
        return self.sampling_defaults.params(**overrides)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues one prompt; returns its request id. No params: the model's defaults."""
        params = params or self.get_default_sampling_params()
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        for field, field_ids in (("prompt", ids), ("logit_bias", params.logit_bias or ()),
                                 ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in field_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"{field} token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        matcher = None
        if params.structured_outputs is not None:
            matcher = self._grammar_compiler().matcher(params.structured_outputs)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**32))
        request = Request(request_id, ids, params, seed, prompt=text)
        request.stop_ids = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else self.eos_token_ids)
        if self.tokenizer is not None:
            request.detokenizer = self.tokenizer.incremental_detokenizer(
                ids, skip_special_tokens=params.skip_special_tokens)
        request.plain = request.detokenizer is None and params.logprobs is None
        request.matcher = matcher
        self.scheduler.add(request)
        self._requests[request_id] = request
        return request_id

    def _grammar_compiler(self) -> GrammarCompiler:
        """The model's ``GrammarCompiler``; ValueError where structured outputs cannot run."""
        if self._grammars is None:
            raise ValueError(f"structured outputs need a tokenizer; {self.model.path} ships none")
        return self._grammars

    def _token_mask(self, batch: SchedulerOutput) -> np.ndarray | None:
        """The allowed tokens of the batch's rows that sample a constrained token (None when
        there are none): each from its request's grammar state."""
        if not self.scheduler.num_constrained:
            return None
        mask = None
        for row, item in enumerate(batch.scheduled):
            request = item.request
            if request.matcher is not None and item.completes_sequence:
                if mask is None:
                    mask = all_tokens_mask(len(batch.scheduled), self.model.config.vocab_size)
                try:
                    fill_token_mask(request.matcher, mask, row)
                except Exception as error:  # its row samples unmasked; the token is dropped
                    self._fail(request, error)
        return mask

    def abort(self, request_id: str) -> None:
        """Stops a request now and frees its pages (unknown or finished ids are ignored)."""
        if self._in_worker_step(request_id):
            # A worker still writes its KV pages: free them once that step ends.
            self._deferred_aborts.append(request_id)
            return
        request = self._requests.pop(request_id, None)
        if request is not None and not request.is_finished:
            request.output_token_ids = request.resolved_output_ids
            self.scheduler.finish(request, "abort")

    def _in_worker_step(self, request_id: str) -> bool:
        """Whether a duet worker's running step (the chunk or the decode stream) holds it."""
        if self._split is not None and request_id in self._split.request_ids:
            return True
        return self._stream is not None and any(
            item.request.request_id == request_id for item in self._stream.batch.scheduled)

    def _run_deferred_aborts(self) -> None:
        waiting, self._deferred_aborts = self._deferred_aborts, []
        for request_id in waiting:
            self.abort(request_id)  # (deferred again if another worker step holds it)

    def has_unfinished_requests(self) -> bool:
        in_flight = self._in_flight is not None and any(
            not item.request.is_finished for item in self._in_flight.batch.scheduled)
        return (self.scheduler.has_work() or in_flight or self._split is not None
                or self._stream is not None)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling iteration, pipelined: it launches step N+1 before reading step N's
        tokens, so the device never waits for the host. Stop conditions are therefore checked
        one step late; a token computed past a stop is discarded. Returns the outputs of the
        requests that got a token in step N, and of those that failed (``_fail``). In duet
        mode an iteration the optimizer splits runs on the worker pair instead
        (``_split_step``)."""
        outputs = self._step()
        if self._failed_outputs:
            outputs = outputs + self._failed_outputs
            self._failed_outputs = []
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self._split is not None:
            return self._split_stream()
        predicted = budget = None
        drained: list[RequestOutput] = []
        if self.duet is not None:
            prefill, decode = self.scheduler.preview()
            decision = pair = None
            # (nothing to split; or a constrained request waits or runs, or a request with
            # prompt logprobs waits or prefills: workers take no token masks and compute no
            # prompt logprobs, so iterations stay aggregated meanwhile)
            if (prefill and decode and not self.scheduler.num_constrained
                    and not self.scheduler.num_prompt_logprobs):
                decision, pair = self.duet.decide(prefill, decode)
                predicted = decision.t_aggregated
            if self._stream is not None and (pair is None or self._stream.client is not pair[1]):
                before = time.perf_counter()  # the stream's tokens must be on the host first
                drained = self._finish_stream()
                self.duet.stats.switch_seconds.append(time.perf_counter() - before)
            if pair is not None:
                return drained + self._split_step(decision, pair)
            if decision is not None:
                budget = decision.token_budget
        if drained:
            return drained + self._aggregated_step(predicted, budget)
        return self._aggregated_step(predicted, budget)

    def _aggregated_step(self, predicted: float | None,
                         budget: int | None = None) -> list[RequestOutput]:
        """One pipelined step on this process's device (``step``), within ``budget`` tokens
        (None: the SLO-aware budget's choice, else the fixed one). When the step in flight
        samples a constrained token (structured outputs), its tokens are read first: the
        next step's token mask follows from them, so the pipeline waits for the device."""
        started = time.perf_counter()
        drained, waited = [], 0.0
        if self._in_flight is not None and self._in_flight.samples_constrained:
            drained, waited = self._finish_step(self._in_flight)
            self._in_flight = None
        drain_seconds = time.perf_counter() - started
        if budget is None and self.token_budget is not None and self.scheduler.has_prefill_work():
            budget = self.token_budget.choose(*self.scheduler.preview())
            predicted = self.token_budget.last_predicted_s or None
        batch = self.scheduler.schedule(self.config.decode_steps, budget=budget)
        scheduled = prepared = time.perf_counter()
        launched, launch_seconds = None, 0.0
        if batch.scheduled:
            token_mask = self._token_mask(batch)
            prompt_chunks = (chunks_of(batch) if self.scheduler.num_prompt_logprobs
                             and batch.continues is None else None)
            try:
                launched = self.runner.dispatch(batch, self._in_flight, token_mask, prompt_chunks)
            except Exception as error:
                if not self._fail_requests_without_inputs(batch):
                    raise  # not one request's doing: the engine fails
                log.warning("a step was not launched: %r (its requests are scheduled again)", error)
        if launched is not None:
            launched.samples_constrained = token_mask is not None
            launch_seconds = self.runner.last_launch_seconds
            prepared = time.perf_counter()
            self._mark_launched(batch, launched)
            self.scheduler.commit(batch)
        marked = time.perf_counter()
        outputs, in_flight_waited = self._finish_step(self._in_flight) if self._in_flight else ([], 0.0)
        waited += in_flight_waited
        self._observe_aggregated(launched, predicted)
        self._in_flight = launched
        stats, now = self.stats, time.perf_counter()
        stats.schedule_seconds += scheduled - started - drain_seconds
        stats.prepare_seconds += prepared - scheduled - launch_seconds
        stats.launch_bookkeeping_seconds += marked - prepared
        stats.apply_seconds += now - marked + drain_seconds - waited
        stats.record(now - started - waited - launch_seconds, launch_seconds, waited,
                     batch.num_steps if batch.scheduled else 0)
        return drained + outputs if drained else outputs

    def _observe_aggregated(self, launched: InFlight | None, predicted: float | None) -> None:
        """The in-flight step's results just arrived; with the pipeline full, the
        time since the previous step's results is that step's iteration time, which teaches
        the roofline correction (``correction.py``) when the controller (or the SLO-aware
        budget) predicted it."""
        learner = self.duet if self.duet is not None else self.token_budget
        if learner is None:
            return
        now = time.perf_counter()
        if self._in_flight is not None and self._last_results is not None and self._in_flight_predicted:
            learner.observe_aggregated(self._in_flight_predicted, now - self._last_results)
        self._last_results = now if self._in_flight is not None and launched is not None else None
        self._in_flight_predicted = predicted

    def _mark_launched(self, batch: SchedulerOutput, launched: InFlight) -> None:
        """Reserves output slots (PENDING) for the tokens a launched dispatch samples."""
        launched.finished_at_launch = self.scheduler.num_finished
        if batch.continues is not None:  # the previous dispatch again: only what changes
            k = batch.num_steps
            previous = self._in_flight
            if previous is not None and previous.batch.scheduled is batch.scheduled:
                # (each output grew by k PENDING at that launch, and nothing else since)
                launched.output_index = [first + k for first in previous.output_index]
            else:
                launched.output_index = [len(r.output_token_ids) for r in batch.continues.requests]
            if k == 1:
                for request in batch.continues.requests:
                    request.output_token_ids.append(PENDING)
            else:
                pad = [PENDING] * k
                for request in batch.continues.requests:
                    request.output_token_ids += pad
            return
        now = time.time()
        output_index: list[int | None] = [None] * len(batch.scheduled)
        for row, item in enumerate(batch.scheduled):
            request = item.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            request.penalty_slot_fresh = False  # this step zeroes a fresh slot
            outputs = request.output_token_ids
            first = len(outputs)
            # (``item.completes_sequence``, inlined) the step samples its next token(s)
            if request.num_computed_tokens + item.num_new_tokens == len(request.prompt_token_ids) + first:
                num_steps = item.num_steps
                outputs += [PENDING] * num_steps
                output_index[row] = first
        launched.output_index = output_index

    def _split_step(self, decision, pair) -> list[RequestOutput]:
        """Starts a DuetServe split iteration: the prefill chunks go to the S_p worker, whose
        step then runs across ``step`` calls, while the S_d worker decodes everyone else, a few
        steps per dispatch, streaming tokens (``_split_stream``). The aggregated pipeline is
        drained first (its in-flight tokens must be on the host before another process
        continues those requests); a decode dispatch carried over from the previous split
        iteration (``duet_carry_stream``) keeps running, and the stream goes on after it. A
        worker that dies loses only its step: its requests are recomputed."""
        started = time.perf_counter()
        outputs: list[RequestOutput] = []
        waited = 0.0
        if self._in_flight is not None:
            drained, waited = self._finish_step(self._in_flight)
            outputs += drained
            self._in_flight = None
            self.duet.stats.switch_seconds.append(time.perf_counter() - started)
        self._last_results = self._in_flight_predicted = None  # the pipeline is drained
        # Every decode dispatch of the split, the first too, runs the stream's k: the tokens
        # of a dispatch reach the client together, so k bounds the gaps it sees.
        stream_k = self.duet.stream_steps(decision)
        carried = self._stream
        # With a decode dispatch still running, only the chunks are scheduled now (and nothing
        # is preempted: a victim's pages could still be written); the decodes follow it.
        batch = self.scheduler.schedule(stream_k, split=True, chunks_only=carried is not None)
        prefill_part, decode_part = split_batch(batch)
        split = _Split(decision, pair, launched_at=time.perf_counter(), stream_k=stream_k,
                       stream_step_seconds=self.duet.stream_step_seconds(decision, stream_k),
                       prefill_tokens=prefill_part.num_tokens,
                       decode_batch=len((carried.batch if carried else decode_part).scheduled))
        if prefill_part.scheduled:
            try:
                split.prefill = pair[0].dispatch(prefill_part, use_previous=False)
                self._mark_launched(prefill_part, split.prefill)
                self.scheduler.commit(prefill_part)
                split.request_ids = {item.request.request_id for item in prefill_part.scheduled}
            except WorkerDied as e:
                self.duet.worker_failed(pair[0], e)
                self._requeue(prefill_part)
        self._split = split
        self.stats.record(time.perf_counter() - started - waited, 0.0, waited, 0)
        if carried is None:
            outputs += self._stream_decodes(decode_part)
        return outputs

    def _split_stream(self) -> list[RequestOutput]:
        """One ``step`` while a split's prefill chunk runs: the decode stream's next dispatch
        (``_stream_decodes``), or the results of whichever of the chunk and the stream's
        dispatch ends first. The split iteration ends with its chunk when ``duet_carry_stream``
        (the stream's dispatch then running carries over), else with a dispatch sized to end
        just after the chunk."""
        split = self._split
        carry = self.config.duet_carry_stream
        if split.prefill is not None and not split.prefill.done():
            if self._stream is None:
                steps = split.stream_k
                if not carry:
                    remaining = (split.decision.t_prefill or 0.0) - (time.perf_counter() - split.launched_at)
                    steps = final_dispatch_steps(remaining, split.stream_step_seconds, steps)
                part = self.scheduler.schedule_decodes(steps, split.request_ids)
                if part.scheduled:
                    outputs = self._stream_decodes(part)
                    if self._stream is None:  # (it ran to the end already, or its worker died)
                        return outputs
            if self._stream is not None:
                if self._wait_for_either(split.prefill, self._stream) is self._stream:
                    return self._finish_stream()
        outputs: list[RequestOutput] = []
        before = time.perf_counter()
        if split.prefill is not None:
            try:
                outputs, _ = self._finish_step(split.prefill)
                split.prefill_seconds = split.prefill.worker_seconds or 0.0
            except WorkerDied as e:
                self.duet.worker_failed(split.pair[0], e)
                self._requeue(split.prefill.batch)
        self.stats.record(0.0, 0.0, time.perf_counter() - before, 0)
        if self._stream is not None:
            if carry and split.prefill is not None:
                self.duet.stats.carried_dispatches += 1
            else:  # (without a chunk, nothing else would ever wait for it)
                outputs += self._finish_stream()
        self._split = None
        self.duet.record_split(split.decision, time.perf_counter() - split.launched_at,
                               (split.prefill_seconds, split.decode_seconds), split.decode_steps,
                               split.stream_k, split.decode_dispatches, split.prefill_tokens,
                               split.decode_batch)
        self._run_deferred_aborts()
        return outputs

    @staticmethod
    def _wait_for_either(chunk: RemoteInFlight, stream: RemoteInFlight) -> RemoteInFlight:
        """Blocks until the chunk's or the stream dispatch's reply is in (or its worker is
        gone); returns which, the chunk when both."""
        while True:
            if chunk.done():
                return chunk
            if stream.done():
                return stream
            conns = [c for c in (chunk.client.conn, stream.client.conn) if c is not None]
            multiprocessing.connection.wait(conns, timeout=0.1)

    def _stream_decodes(self, part: SchedulerOutput) -> list[RequestOutput]:
        """Launches a decode-stream dispatch. Without ``duet_carry_stream`` it also waits for
        it, as the split path every committed GPU figure measured did; with it, the dispatch
        runs beside the chunk (``_split_stream`` waits for either)."""
        self._launch_stream(part)
        if self._stream is None or self.config.duet_carry_stream:
            return []
        return self._finish_stream()

    def _launch_stream(self, part: SchedulerOutput) -> None:
        """Sends a decode dispatch to the split's S_d worker (its results: ``_finish_stream``)."""
        if not part.scheduled:
            return
        split = self._split
        started = time.perf_counter()
        try:
            launched = split.pair[1].dispatch(part, use_previous=False)
        except WorkerDied as e:
            self.duet.worker_failed(split.pair[1], e)
            self._requeue(part)
            return
        self._mark_launched(part, launched)
        self.scheduler.commit(part)
        self._stream = launched
        self.duet.stats.stream_dispatches += 1
        self.stats.record(time.perf_counter() - started, 0.0, 0.0, part.num_steps)

    def _finish_stream(self) -> list[RequestOutput]:
        """The decode stream's dispatch in flight: waits for it and applies its tokens; its
        worker time counts in the split iteration running now, if any."""
        stream, self._stream = self._stream, None
        started = time.perf_counter()
        try:
            outputs, waited = self._finish_step(stream)
        except WorkerDied as e:
            self.duet.worker_failed(stream.client, e)
            self._requeue(stream.batch)
            outputs, waited = [], time.perf_counter() - started
        else:
            split = self._split
            if split is not None:
                split.decode_seconds += stream.worker_seconds or 0.0
                split.decode_steps += stream.batch.num_steps
                split.decode_dispatches += 1
        self.stats.record(time.perf_counter() - started - waited, 0.0, waited, 0)
        self._run_deferred_aborts()
        return outputs

    def _requeue(self, batch: SchedulerOutput) -> None:
        """Sends the requests of a lost step back to the queue: their tokens still on the device
        are dropped and their KV is recomputed, so the output stays complete and unduplicated."""
        for item in batch.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.output_token_ids = request.resolved_output_ids
            self.scheduler.requeue(request)
            self.duet.stats.requeued_requests += 1

    def _finish_step(self, step: InFlight) -> tuple[list[RequestOutput], float]:
        """Reads a finished step's tokens and applies them (detokenize, stop checks)."""
        before = time.perf_counter()
        sampled = step.fetch()
        if step.prompt_logprobs is not None:  # (before the outputs that carry them)
            step.prompt_logprobs.record()
        waited = time.perf_counter() - before
        now = time.time()
        if step.batch.continues is not None:
            return self._finish_continued(step, sampled, now), waited
        rows = sampled.token_ids.T.tolist()  # one conversion per step, not one per token
        outputs = []
        output_index = step.output_index
        every_output = not self._finished_outputs_only
        blocks = self.scheduler.blocks
        page_size = blocks.page_size if blocks.enable_prefix_caching else 1 << 62
        for row, item in enumerate(step.batch.scheduled):
            request = item.request
            if request.status is FINISHED:
                continue  # stopped or aborted meanwhile: this row is overrun
            first = output_index[row]
            known = request.num_computed_tokens  # tokens with KV whose ids the host has
            if first is not None:  # (a prefill chunk's sampled token is not the next one yet)
                tokens = rows[row][:item.num_steps]
                try:
                    self._apply_tokens(request, first, tokens, sampled, row, now)
                except Exception as error:
                    self._fail(request, error)
                    continue
                if every_output or request.status is FINISHED:
                    outputs.append(self._output(request))
                # (the next dispatch, already launched, computes tokens still PENDING here)
                known = min(known, len(request.prompt_token_ids) + first + len(tokens))
            if request.status is FINISHED:
                self._requests.pop(request.request_id, None)
            elif known // page_size > request.num_cached_pages:
                blocks.cache_full_pages(request)  # (a page filled: name it for prefix hits)
        return outputs, waited

    def _finish_continued(self, step: InFlight, sampled, now: float) -> list[RequestOutput]:
        """``_finish_step`` for a batch that ``continues`` a steady decode: every row sampled
        k tokens from its ``output_index`` on. Which rows need more than storing their tokens
        (a stop id, the token limit, text or logprobs, a page to name) is known from a few
        array operations and ``DecodeRows``; those rows take ``_apply_tokens``."""
        rows = step.batch.continues
        requests, k = rows.requests, step.batch.num_steps
        tokens = sampled.token_ids  # [k, n]
        firsts = step.output_index
        special = set(rows.special_rows).union(step.batch.rows_at_limit)
        if len(rows.stop_ids):
            special.update(np.flatnonzero((tokens[..., None] == rows.stop_ids).any(axis=(0, 2))).tolist())
        ended = set()
        if step.finished_at_launch != self.scheduler.num_finished:  # some rows may have ended
            ended = {row for row, r in enumerate(requests) if r.status is FINISHED}
            special -= ended
        columns = tokens.T.tolist() if special or k > 1 else None
        for row in sorted(special):  # (rare) the full treatment
            try:
                self._apply_tokens(requests[row], firsts[row], columns[row], sampled, row, now)
            except Exception as error:
                self._fail(requests[row], error)
                ended.add(row)
        special -= ended
        if special or ended:
            left = [row for row in range(len(requests)) if row not in special and row not in ended]
            triples = [(requests[row], firsts[row], columns[row]) for row in left]
        else:
            triples = zip(requests, firsts, tokens[0].tolist() if k == 1 else columns)
        if k == 1 and not (special or ended):  # (the common case, at a third less per row)
            for request, first, token in triples:
                request.output_token_ids[first] = token
                request.metrics.token_times.append(now)
        else:
            times = [now] * k
            for request, first, column in triples:
                request.output_token_ids[first:first + k] = column
                request.metrics.token_times += times
        blocks = self.scheduler.blocks
        if blocks.enable_prefix_caching:
            for row in rows.rows_filling_a_page(firsts[0], k):
                if requests[row].status is not FINISHED:
                    blocks.cache_full_pages(requests[row])
        outputs = []
        for row in (sorted(special) if self._finished_outputs_only else range(len(requests))):
            request = requests[row]
            if row in ended:
                continue  # it ended before this step: its row is overrun
            if request.status is FINISHED:
                self._requests.pop(request.request_id, None)
            elif self._finished_outputs_only:
                continue
            outputs.append(self._output(request))
        return outputs

    def _apply_tokens(self, request: Request, first: int, tokens: list[int], sampled,
                      row: int, now: float) -> None:
        """Stores the tokens one dispatch sampled for ``request`` (output indices ``first``
        on) and ends it at the first that meets a stop condition: the rest are overrun."""
        # (``_token_stop``'s common outcome inline: no stop id among the tokens, no limit)
        if (request.max_output_tokens - first > len(tokens)
                and (not request.stop_ids or request.stop_ids.isdisjoint(tokens))):
            stop = None
        else:
            stop = self._token_stop(request, first, tokens)
        if request.detokenizer is not None:  # the text, and stop strings, go token by token
            upto = len(tokens) if stop is None else stop[0] + 1
            stop = self._detokenize(request, tokens[:upto]) or stop
        if stop is not None:
            tokens = tokens[:stop[0] + 1]
        if request.matcher is not None and stop is None:
            stop = self._grammar_stop(request, tokens)
        request.output_token_ids[first:first + len(tokens)] = tokens
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.token_times += [now] * len(tokens)
        top_n = request.params.logprobs
        if top_n is not None:
            request.logprobs += [_logprobs_of(sampled, j, row, token, top_n)
                                 for j, token in enumerate(tokens)]
        if stop is not None:
            self._finish(request, first + stop[0], stop[1], stop[2])

    def _fail(self, request: Request, error: Exception) -> None:
        """Ends ``request`` alone after ``error`` in the host work done for it (detokenizing,
        stop checks, its grammar, its slot tables or step inputs): finish reason "error", the
        message in its output's ``error``, its pages freed. Every other request goes on."""
        log.error("request %s failed: %r", request.request_id, error, exc_info=error)
        request.error = f"{type(error).__name__}: {error}"
        request.output_token_ids = request.resolved_output_ids
        request.metrics.finished_time = time.time()
        if request.is_finished:  # (it had just ended: nothing to free twice)
            request.finish_reason = "error"
        else:
            self.scheduler.finish(request, "error")
        self._requests.pop(request.request_id, None)
        self._failed_outputs.append(self._output(request))

    def _fill_slot(self, request: Request) -> None:
        """The scheduler's ``fill_slot``: a request whose slot tables cannot be written fails
        alone (the scheduler then leaves it out)."""
        try:
            self.runner.fill_slot(request)
        except Exception as error:
            self._fail(request, error)

    def _fail_requests_without_inputs(self, batch: SchedulerOutput) -> bool:
        """After a dispatch of ``batch`` failed before launching: fails the requests whose step
        inputs cannot be built on their own, and says whether there were any (the batch was not
        launched; the others are scheduled again next step)."""
        in_flight = self._in_flight.batch.scheduled if self._in_flight is not None else None
        failed = False
        for item in batch.scheduled:
            alone = SchedulerOutput([item], [], batch.num_steps)
            try:
                build_inputs(bucket_for(alone, self.config), alone, self.config.page_size,
                             self.runner.max_pages_per_seq, in_flight=in_flight)
            except Exception as error:
                self._fail(item.request, error)
                failed = True
        return failed

    @staticmethod
    def _grammar_stop(request: Request, tokens: list[int]) -> tuple[int, str, None] | None:
        """Advances a constrained request's grammar over its new tokens (one per dispatch);
        (position, 'stop', None) once the grammar is complete. A token the grammar refuses
        (the mask should rule that out) ends it too, rather than let it go on unconstrained."""
        matcher = request.matcher
        for j, token in enumerate(tokens):
            if not matcher.consume_token(token) or matcher.is_stopped():
                return j, "stop", None
        return None

    def _token_stop(self, request: Request, first: int,
                    tokens: list[int]) -> tuple[int, str, int | None] | None:
        """(position in ``tokens``, finish reason, stop reason) of the first token, placed at
        output index ``first`` on, that ends the request by its id or by a length limit."""
        length_at = max(request.max_output_tokens - first, 1) - 1  # (max_tokens or max_model_len)
        if request.stop_ids and not request.stop_ids.isdisjoint(tokens):
            params = request.params
            for j in range(max(params.min_tokens - first - 1, 0), min(len(tokens), length_at + 1)):
                token = tokens[j]
                if token in request.stop_ids:
                    return j, "stop", token if token in params.stop_token_ids else None
        return (length_at, "length", None) if length_at < len(tokens) else None

    def _detokenize(self, request: Request, tokens: list[int]) -> tuple[int, str, str] | None:
        """Appends the text of ``tokens``; returns (position, 'stop', stop string) when a stop
        string completes (the tokens after it are overrun)."""
        for j, token in enumerate(tokens):
            delta = request.detokenizer.add(token)
            request.text += delta
            found = self._find_stop_string(request, len(delta))
            if found is not None:
                return j, "stop", found
        return None

    def _find_stop_string(self, request: Request, delta_len: int) -> str | None:
        for stop in request.params.stop:
            start = max(0, len(request.text) - delta_len - len(stop) + 1)
            at = request.text.find(stop, start)
            if at >= 0:
                request.text = request.text[:at]
                return stop
        return None

    def _finish(self, request: Request, last: int, reason: str, stop_reason) -> None:
        """Ends ``request`` at output index ``last``; tokens launched past it are dropped."""
        del request.output_token_ids[last + 1:]
        if request.detokenizer is not None and not isinstance(stop_reason, str):
            request.text += request.detokenizer.flush()  # a character held back at the end
        request.stop_reason = stop_reason
        request.metrics.finished_time = time.time()
        self.scheduler.finish(request, reason)

    def _output(self, request: Request) -> RequestOutput:
        # Positional arguments (field order of outputs.py): keywords cost twice as much, and
        # streaming builds one output per running request on every step.
        completion = CompletionOutput(0, request.text, request.resolved_output_ids,
                                      request.finish_reason, request.stop_reason,
                                      list(request.logprobs) if request.params.logprobs is not None
                                      else None)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             [completion], request.status is RequestStatus.FINISHED,
                             request.metrics, request.prompt_logprobs, request.error)

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
        if self.tokenizer is None:
            raise ValueError(f"{self.model.path} ships no tokenizer, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                list(conversation), add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}))
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: Iterable[str], use_tqdm: bool) -> list[RequestOutput]:
        order = {request_id: i for i, request_id in enumerate(request_ids)}
        results: list[RequestOutput | None] = [None] * len(order)
        self._finished_outputs_only = True
        try:
            with tqdm(total=len(order), desc="generate", disable=not use_tqdm) as bar:
                while self.has_unfinished_requests():
                    for output in self.step():
                        if output.finished and output.request_id in order:
                            results[order[output.request_id]] = output
                            bar.update(1)
        finally:
            self._finished_outputs_only = False
        return results
