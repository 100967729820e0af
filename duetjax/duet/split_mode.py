"""DuetServe's split mode: MPS workers, the partition optimizer, worker failures.

The engine runs aggregated (one mixed batch on the whole GPU, in its own process) while the
roofline predicts that the mixed iteration fits the TBT SLO. When it predicts a miss, the
``ModeController`` picks a worker pair (S_p, S_d) and k: the prefill worker (an MPS client
limited to S_p of the SMs) runs the prefill chunks while the decode worker (S_d) runs k decode
steps, both on the one shared copy of weights and KV pool (``shared_state``).

Process start-up order matters on a GPU: the MPS daemon must run, and XLA must not preallocate
most of the memory, before this process creates its CUDA context. ``prepare_process`` does
both and must run before JAX touches the GPU (``Engine`` calls it first thing).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import jax

from ..config import ConfigError
from ..core.shared_state import SharedState
from ..core.step_inputs import MIN_MIXED_TOKENS, decode_step_choices, step_padding
from ..perf.correction import Correction, CorrectedRoofline, StepOverhead
from ..perf.optimizer import AGGREGATED, Decision, ModeController, OptimizerConfig, StaticController
from ..perf.roofline import DeviceProfile, ModelShape, Roofline, load_profile
from ..perf.token_budget import TokenBudget
from . import mps
from .worker import DECODE, PREFILL, WorkerSetup
from .worker_client import WorkerClient, WorkerDied

log = logging.getLogger(__name__)

MODES = ("aggregated", "duet", "auto")


@dataclasses.dataclass
class DuetStats:
    """What split mode did (for logs and metrics)."""

    split_iterations: int = 0
    aggregated_iterations: int = 0
    mode_switches: int = 0
    worker_failures: int = 0
    requeued_requests: int = 0
    last_decision: Decision | None = None
    split_k: list[int] = dataclasses.field(default_factory=list)
    """Decode steps of each split iteration."""
    predicted_seconds: list[float] = dataclasses.field(default_factory=list)
    """Predicted time of each split iteration as the engine runs it (``split_seconds``, or
    ``carried_split_seconds``)."""
    split_stream_k: list[int] = dataclasses.field(default_factory=list)
    """Decode steps per decode-worker dispatch of each split iteration (``stream_steps``)."""
    predicted_prefill_seconds: list[float] = dataclasses.field(default_factory=list)
    """Predicted t_p of each split iteration (against ``prefill_worker_seconds``)."""
    predicted_decode_step_seconds: list[float] = dataclasses.field(default_factory=list)
    """Predicted t_d of each split iteration (against decode_worker_seconds / steps)."""
    split_shares: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    """(S_p, S_d) of each split iteration."""
    measured_seconds: list[float] = dataclasses.field(default_factory=list)
    """Measured dispatch-to-results time of the same iterations."""
    prefill_worker_seconds: list[float] = dataclasses.field(default_factory=list)
    """The prefill worker's own time per split iteration (0 when it had nothing)."""
    decode_worker_seconds: list[float] = dataclasses.field(default_factory=list)
    """The decode worker's own time on the dispatches that finished during each split
    iteration (one carried over from the iteration before counts in the one it ends in)."""
    decode_worker_steps: list[int] = dataclasses.field(default_factory=list)
    """Decode steps of those dispatches (the stream runs more than k)."""
    decode_worker_dispatches: list[int] = dataclasses.field(default_factory=list)
    """Dispatches those steps took."""
    split_prefill_tokens: list[int] = dataclasses.field(default_factory=list)
    """Tokens of the prefill chunks of each split iteration."""
    split_decode_batch: list[int] = dataclasses.field(default_factory=list)
    """Requests in the first decode dispatch of each split iteration (the carried one, if
    any)."""
    switch_seconds: list[float] = dataclasses.field(default_factory=list)
    """Time spent draining the other mode's step in flight when switching: the aggregated
    pipeline before a split, the decode stream's dispatch before an aggregated step."""
    stream_dispatches: int = 0
    """Decode dispatches launched while a split's prefill chunk was running."""
    carried_dispatches: int = 0
    """Decode dispatches still running when their split iteration ended (its chunk did not
    wait for them)."""
    decisions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """Judged iterations by what decided them (``decision_class``)."""

    @property
    def mode(self) -> str:
        d = self.last_decision
        return d.mode if d is not None else AGGREGATED

    def counters(self) -> dict[str, Any]:
        """The counters and the last split's figures, as ``EngineStats`` fields."""
        last = self.last_decision
        return dict(split_iterations=self.split_iterations,
                    aggregated_iterations=self.aggregated_iterations,
                    mode_switches=self.mode_switches, worker_failures=self.worker_failures,
                    requeued_requests=self.requeued_requests,
                    stream_dispatches=self.stream_dispatches,
                    carried_dispatches=self.carried_dispatches,
                    decode_steps=last.k if last is not None else 1,
                    predicted_ms=1e3 * self.predicted_seconds[-1] if self.predicted_seconds else 0.0,
                    measured_ms=1e3 * self.measured_seconds[-1] if self.measured_seconds else 0.0)


def _jax_backends_initialized() -> bool:
    """Whether JAX has created its backends (and so its CUDA context) yet.

    JAX's public API cannot ask without creating them (``jax.devices()`` and
    ``jax.default_backend()`` do), so this reads JAX's own flag. Should a JAX version move it,
    the answer is "not yet": the GPU is then found from the configuration alone, and a late
    ``mode='duet'`` is not caught here."""
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        return False
    return backends_are_initialized()


def prepare_process(mode: str) -> tuple[str, mps.MPSDaemon | None, str]:
    """Resolves ``mode`` and readies this process for it; returns (mode, daemon, why).

    'auto' is duet when a GPU with MPS (and CuPy) is usable, else aggregated. On a GPU, duet
    starts (or finds) the MPS daemon and turns XLA preallocation off before JAX creates its
    CUDA context. On CPU, 'duet' runs the workers as plain processes (tests): nothing limits
    their cores. What 'duet' lacks here is a ConfigError naming the option.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "aggregated":
        return mode, None, "requested"
    on_gpu = _jax_uses_gpu()
    if not on_gpu:
        if mode == "auto":
            return "aggregated", None, "no GPU: SM partitioning needs one"
        return "duet", None, "CPU: worker processes without SM limits (for tests)"
    status = mps.mps_status()
    if not status.startswith("MPS available"):
        if mode == "auto":
            return "aggregated", None, status
        raise ConfigError("mode", f"duet needs MPS on the GPU ({status}); mode auto runs "
                                  "aggregated where it is missing")
    if importlib.util.find_spec("cupy") is None:
        why = ("CuPy is missing (duet mode shares the weights and KV pool through its CUDA IPC): "
               "install duetjax's cuda12 or cuda13 extra")
        if mode == "auto":
            return "aggregated", None, why
        raise ConfigError("mode", f"duet cannot run: {why}")
    if _jax_backends_initialized():
        raise ValueError("mode='duet' must be chosen before JAX initializes the GPU (the MPS "
                           "daemon and XLA_PYTHON_CLIENT_PREALLOCATE=false must be in place "
                           "first): create the Engine before any other JAX call")
    daemon = mps.find_running_daemon() or mps.start_private_daemon()
    daemon.stop_after_exit()  # this process is a client too: quit only once it has exited
    os.environ.update({k: v for k, v in daemon.client_env(100).items()
                       if k != "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"})
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return "duet", daemon, status


def weights_loading_device(mode: str) -> contextlib.AbstractContextManager:
    """Where the engine loads its weights. Duet mode on a GPU: the host, because the weights
    then go into buffers the workers share, and a copy loaded on the GPU first would leave its
    memory in the engine process's XLA allocator (which keeps what it once held) where no worker
    and no KV page can use it. Elsewhere: JAX's default device."""
    if mode == "duet" and _jax_uses_gpu():
        return jax.default_device(jax.devices("cpu")[0])
    return contextlib.nullcontext()


def _jax_uses_gpu() -> bool:
    """Whether JAX runs (or will run) on a GPU, without initializing a backend."""
    if _jax_backends_initialized():
        return jax.default_backend() == "gpu"
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
    if platforms:
        return any(p.strip() in ("cuda", "gpu") for p in platforms.split(","))
    for version in (12, 13):
        try:
            if importlib.util.find_spec(f"jax_plugins.xla_cuda{version}") is not None:
                return True
        except ImportError:
            pass
    return False


def build_roofline(model_config: Any, dtype: Any, engine_config: Any, max_model_len: int,
                   profile: DeviceProfile, correction: Correction | None,
                   quantization: Any = None) -> Roofline | CorrectedRoofline:
    """The roofline of this model as the engine pads its steps (with its weights' FP8
    ``quantization``, if any, and ``engine_config.kv_cache_dtype``), scaled by ``correction``
    when given."""
    shape = ModelShape.from_config(model_config, dtype_bytes=jax.numpy.dtype(dtype).itemsize,
                                   quantization=quantization,
                                   kv_dtype_bytes=1 if engine_config.kv_cache_dtype == "fp8" else None)
    roofline = Roofline(shape, profile, step_padding(engine_config, max_model_len))
    return CorrectedRoofline(roofline, correction) if correction is not None else roofline


def slo_token_budget(roofline: Roofline | CorrectedRoofline, engine_config: Any,
                     tbt_slo_ms: float) -> TokenBudget:
    """The SLO-aware token budget ``engine_config`` asks for, protecting ``tbt_slo_ms``."""
    ttft_ms = engine_config.slo_ttft_ms
    return TokenBudget(roofline, tbt_slo_ms / 1e3, engine_config.max_num_batched_tokens,
                       min_tokens=MIN_MIXED_TOKENS,
                       min_prefill_tokens=engine_config.slo_min_prefill_tokens,
                       ttft_target_s=None if ttft_ms is None else ttft_ms / 1e3)


NOT_READY = "split wanted, workers not ready"


def decision_class(decision: Decision) -> str:
    """What decided an iteration, in a few words: the full mixed step fits the SLO (or the
    hysteresis kept it), a smaller token budget (beating the best split, or with no split
    that fits), a split, or the full step with no plan that fits."""
    if decision.mode != AGGREGATED:
        return "split"
    if decision.token_budget is not None:
        return "smaller budget"
    return "full step" if decision.slo_met else "full step, nothing fits"


def stream_steps(k: int, t_decode: float, tbt_slo_s: float) -> int:
    """Decode steps per decode-worker dispatch while a split's prefill chunk runs: the largest
    power of two up to the decision's k whose predicted steps fit half the TBT SLO (a
    dispatch's tokens reach the host together, so a client sees a gap of that many steps)."""
    budget = tbt_slo_s / 2
    steps = 1
    while 2 * steps <= k and 2 * steps * t_decode <= budget:
        steps *= 2
    return steps


def final_dispatch_steps(remaining: float, t_decode: float, stream_k: int) -> int:
    """Steps of the next decode-stream dispatch when the chunk is predicted to end in
    ``remaining`` seconds: ``stream_k``, or the fewest (a power of two) that outlast the
    chunk, so that the iteration does not outlast it by up to a whole dispatch."""
    steps = stream_k
    while steps > 1 and (steps // 2) * t_decode >= remaining:
        steps //= 2
    return steps


def split_seconds(t_prefill: float, t_decode: float, stream_k: int) -> float:
    """Expected time of a split iteration that ends with the first decode dispatch to finish
    after the chunk: dispatches of ``stream_k`` steps run back to back while the chunk runs,
    the last one sized to end just after the chunk's predicted end (``final_dispatch_steps``):
    on average half a step after it, and no sooner than one dispatch. Which part of a step the
    stream is in when the chunk ends, no prediction made beforehand can know
    (``carried_split_seconds`` ends the iteration with the chunk instead; docs/design.md,
    "Timing a split iteration")."""
    if t_prefill <= 0:
        return stream_k * t_decode
    return max(t_prefill + t_decode / 2, stream_k * t_decode)


def carried_split_seconds(t_prefill: float, overhead: float) -> float:
    """Expected time of a split iteration that ends with its chunk
    (``EngineConfig.duet_carry_stream``): the chunk on its worker plus the engine-side cost
    of a worker step (``StepOverhead``)."""
    return t_prefill + overhead


def device_profile(config: Any, needed_by: str = "duet mode") -> DeviceProfile:
    """The roofline profile ``needed_by`` predicts with: the ``device_profile`` file, else the
    one duetjax ships for this GPU model; ConfigError naming device_profile when there is none.
    (Call it before loading or compiling anything; in duet mode after ``prepare_process``.)"""
    path = config.device_profile
    if path is not None:
        try:
            return DeviceProfile.from_json(Path(path).expanduser())
        except (OSError, ValueError) as error:
            raise ConfigError("device_profile", f"{path!r} cannot be read as a roofline "
                              f"profile ({error}); make one with tools/calibrate.py") from None
    if jax.default_backend() != "gpu":
        raise ConfigError("device_profile", f"is needed for {needed_by} on CPU: a roofline "
                                            "profile JSON (there is no GPU model to look one up "
                                            "for); make one with tools/calibrate.py")
    try:
        return load_profile(jax.devices()[0].device_kind)
    except LookupError as e:
        raise ConfigError("device_profile", f"is needed for {needed_by}: {e}") from None


class SplitPlanner:
    """What decides split mode's iterations, without the processes that run them: the
    controller (aggregated, a smaller budget, or which split), its online correction, and
    what the engine expects and learns of each split iteration. ``Duet`` adds the workers;
    a planner alone judges every split runnable (what a simulation of the engine needs)."""

    def __init__(self, model_config: Any, dtype: Any, quantization: Any, engine_config: Any,
                 max_model_len: int, profile: DeviceProfile):
        self.config = engine_config
        self.stats = DuetStats()
        pairs = tuple((p / 100, d / 100) for p, d in engine_config.active_duet_pairs)
        self.correction = Correction()
        self.step_overhead = StepOverhead()
        roofline = build_roofline(model_config, dtype, engine_config, max_model_len, profile,
                                  self.correction if engine_config.duet_online_correction else None,
                                  quantization)
        self.corrected = roofline if isinstance(roofline, CorrectedRoofline) else None
        self._split_raw: tuple[float, float] | None = None
        """(t_p, t_d) of the last split decision before correction (None: uncorrected)."""
        optimizer = OptimizerConfig(
            tbt_slo_s=engine_config.duet_tbt_slo_ms / 1e3, pairs=pairs,
            k_max=engine_config.max_decode_steps, k_values=decode_step_choices(engine_config))
        if engine_config.duet_policy == "static":
            self.controller = StaticController(roofline, optimizer)
        else:
            self.controller = ModeController(
                roofline, optimizer,
                token_budget=slo_token_budget(roofline, engine_config,
                                              engine_config.duet_tbt_slo_ms),
                split_seconds=self.expected_split_seconds)

    def _pair(self, decision: Decision) -> tuple[Any, Any] | None:
        """The workers that run ``decision``'s split when they are ready, else None (a planner
        alone has no workers: every split is runnable)."""
        return ()

    def decide(self, prefill: list[tuple[int, int]], decode_context_lens: list[int],
               queue: list[tuple[int, float]] | None = None,
               ) -> tuple[Decision, tuple[WorkerClient, WorkerClient] | None]:
        """This iteration's decision and, when split, its ready worker pair (``queue``: the
        queued prompts, ``Scheduler.queue_to_pace``, when the SLO-aware budget paces them)."""
        before = self.stats.mode
        decision = self.controller.step(prefill, decode_context_lens, queue)
        pair = self._pair(decision) if decision.mode != AGGREGATED else None
        if decision.mode != AGGREGATED and pair is None:
            decision = dataclasses.replace(decision, mode=AGGREGATED, s_p=1.0, s_d=1.0, k=1,
                                           reason="split wanted but its workers are not ready")
            self.stats.decisions[NOT_READY] += 1
        else:
            self.stats.decisions[decision_class(decision)] += 1
        self.stats.last_decision = decision
        if pair is not None and self.corrected is not None:
            self._split_raw = self.corrected.last_raw.get((decision.s_p, decision.s_d))
        if decision.mode != before:
            self.stats.mode_switches += 1
            log.info("mode %s -> %s: %s", before, decision.mode, decision.reason)
        if decision.mode == AGGREGATED:
            self.stats.aggregated_iterations += 1
        else:
            self.stats.split_iterations += 1
        return decision, pair

    def stream_steps(self, decision: Decision) -> int:
        """Decode steps per decode-worker dispatch while this split's prefill chunk runs."""
        return stream_steps(decision.k, decision.t_decode or 0.0, self.config.duet_tbt_slo_ms / 1e3)

    def expected_split_seconds(self, decision: Decision, stream_k: int | None = None,
                               t_decode: float | None = None) -> float:
        """How long ``decision``'s split iteration is expected to last as this engine runs it
        (what ``record_split`` compares with the measured time), with dispatches of
        ``stream_k`` decode steps of ``t_decode`` seconds (None: the decision's)."""
        if self.config.duet_carry_stream:
            return carried_split_seconds(decision.t_prefill or 0.0, self.step_overhead.seconds)
        return split_seconds(decision.t_prefill or 0.0,
                             (decision.t_decode or 0.0) if t_decode is None else t_decode,
                             self.stream_steps(decision) if stream_k is None else stream_k)

    def stream_step_seconds(self, decision: Decision, stream_k: int) -> float:
        """Predicted time of one decode step in dispatches of ``stream_k`` steps (a dispatch's
        fixed cost weighs more on short ones: the correction learns each size apart)."""
        if self._split_raw is None:
            return decision.t_decode or 0.0
        return self._split_raw[1] * self.correction.factor("decode", decision.s_d, stream_k)

    def observe_aggregated(self, predicted: float, measured: float, num_tokens: int) -> None:
        """A judged mixed iteration of ``num_tokens`` tokens ran aggregated in ``measured``
        seconds (the correction learns it for that step's bucket and for all sizes)."""
        key = self.corrected.mixed_key(num_tokens) if self.corrected is not None else ()
        self.correction.observe("aggregated", predicted, measured, *key)

    def record_split(self, decision: Decision, seconds: float,
                     worker_seconds: tuple[float, float] = (0.0, 0.0), decode_steps: int = 0,
                     stream_k: int | None = None, decode_dispatches: int = 0,
                     prefill_tokens: int = 0, decode_batch: int = 0) -> None:
        stream_k = self.stream_steps(decision) if stream_k is None else stream_k
        t_decode = self.stream_step_seconds(decision, stream_k)
        predicted = self.expected_split_seconds(decision, stream_k, t_decode)
        self.stats.split_k.append(decision.k)
        self.stats.split_stream_k.append(stream_k)
        self.stats.predicted_seconds.append(predicted)
        self.stats.predicted_prefill_seconds.append(decision.t_prefill or 0.0)
        self.stats.predicted_decode_step_seconds.append(t_decode)
        self.stats.split_shares.append((decision.s_p, decision.s_d))
        self.stats.measured_seconds.append(seconds)
        self.stats.prefill_worker_seconds.append(worker_seconds[0])
        self.stats.decode_worker_seconds.append(worker_seconds[1])
        self.stats.decode_worker_steps.append(decode_steps)
        self.stats.decode_worker_dispatches.append(decode_dispatches)
        self.stats.split_prefill_tokens.append(prefill_tokens)
        self.stats.split_decode_batch.append(decode_batch)
        raw = self._split_raw
        if worker_seconds[0] > 0:
            self.step_overhead.observe(seconds - worker_seconds[0])
        if worker_seconds[0] > 0 and decision.t_prefill:
            key = CorrectedRoofline.prefill_key(raw[0], decision.s_p) if raw else ()
            self.correction.observe("prefill", decision.t_prefill, worker_seconds[0], *key)
        if decode_steps and t_decode:
            key = (decision.s_d, stream_k) if raw else ()
            self.correction.observe("decode", t_decode, worker_seconds[1] / decode_steps, *key)
        log.debug("split %.0f/%.0f k=%d: predicted %.2f ms, measured %.2f ms",
                  100 * decision.s_p, 100 * decision.s_d, decision.k, 1e3 * predicted, 1e3 * seconds)
        self._split_raw = None


class Duet(SplitPlanner):
    """The split-mode machinery of one engine: the planner, shared state and workers."""

    def __init__(self, model: Any, engine_config: Any, max_model_len: int, num_pages: int,
                 shared: SharedState, daemon: mps.MPSDaemon | None, profile: DeviceProfile):
        super().__init__(model.config, model.dtype, model.quantization, engine_config,
                         max_model_len, profile)
        self.shared = shared
        self.daemon = daemon
        used = engine_config.active_duet_pairs
        layout = shared.layout()
        self.workers: dict[tuple[str, int], WorkerClient] = {}
        for role, share in sorted({(PREFILL, p) for p, _ in used} | {(DECODE, d) for _, d in used}):
            setup = WorkerSetup(role=role, sm_percentage=share, model_config=model.config,
                                dtype=jax.numpy.dtype(model.dtype).name,
                                quantization=model.quantization, kv_scales=model.kv_scales,
                                engine_config=engine_config, max_model_len=max_model_len,
                                num_pages=num_pages, layout=layout,
                                compilation_cache_dir=engine_config.compilation_cache_dir)
            env = dict(os.environ)
            if daemon is not None:
                env.update(daemon.client_env(share))
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            client = WorkerClient(setup, env, f"{role}@{share}%")
            client.start()
            self.workers[(role, share)] = client

    def wait_ready(self, timeout: float) -> None:
        for client in self.workers.values():
            client.wait_ready(timeout)

    def _pair(self, decision: Decision) -> tuple[WorkerClient, WorkerClient] | None:
        """The decision's workers when both are ready (polling restarts), else None."""
        pair = []
        for role, share in ((PREFILL, decision.s_p), (DECODE, decision.s_d)):
            client = self.workers[(role, round(share * 100))]
            try:
                if not client.poll_ready():
                    return None
            except WorkerDied as e:
                self.worker_failed(client, e)
                return None
            pair.append(client)
        return pair[0], pair[1]

    def worker_failed(self, client: WorkerClient, error: Exception) -> None:
        """Counts the failure and restarts the worker (it serves again once compiled)."""
        self.stats.worker_failures += 1
        log.error("worker %s failed, restarting it; serving aggregated meanwhile: %s",
                  client.name, error)
        client.restart()

    def close(self) -> None:
        for client in self.workers.values():
            client.kill()
        self.shared.close()
        # A daemon we started quits when this process exits (``prepare_process``).
