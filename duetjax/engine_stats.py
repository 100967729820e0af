"""``EngineStats``: a frozen snapshot of what the engine is doing (``Engine.stats()``).

One value holds everything the server's metrics, ``AsyncEngine`` and the benchmark tools read,
so none of them reaches into the scheduler, the runner or the duet controller, and another
thread can keep a snapshot without touching the Engine.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

from .loop_stats import LoopStats


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """The engine's state and counters at one moment (counters count from its creation)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    """Fraction of KV pages in use, 0..1."""
    num_free_pages: int = 0
    num_pages: int = 0
    page_size: int = 0
    """Tokens per KV page (``num_pages * page_size`` tokens fit in the KV cache)."""
    prefix_cache_hit_rate: float = 0.0
    """Prompt tokens served from the prefix cache / prompt tokens looked up."""
    prefix_cache_hit_tokens: int = 0
    """Prompt tokens served from the prefix cache so far."""
    prefix_cache_query_tokens: int = 0
    """Prompt tokens looked up in the prefix cache so far (the hit rate's denominator)."""
    mode: str = "aggregated"
    """Execution mode: 'aggregated' (one mixed batch on the whole GPU) or 'duet'."""
    sm_share: tuple[float, float] = (1.0, 1.0)
    """(prefill, decode) share of the GPU's SMs in the last step; aggregated mode gives each
    phase the whole device."""
    num_steps: int = 0
    """``Engine.step()`` calls that had work."""
    num_preemptions: int = 0
    """Requests sent back to the queue for lack of KV pages so far (recomputed later)."""
    num_constrained: int = 0
    """Requests waiting or running under a structured-output constraint."""
    num_prompt_logprobs: int = 0
    """Requests waiting or running that still compute prompt logprobs."""
    token_budget: int = 0
    """The last SLO-aware token budget an aggregated iteration ran with (a TBT SLO in
    aggregated mode, or duet mode preferring a smaller chunk to a split), else
    ``max_num_batched_tokens``."""
    token_budget_choices: Mapping[int, int] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    """How often each SLO-aware token budget ran."""
    mixed_step_correction: float = 1.0
    """Measured / predicted time of the mixed steps whose budget the roofline chose (the
    SLO-aware budget, or duet mode's controller), as its online correction has learned it: above
    1 the roofline under-predicts them and the budgets shrink. 1.0 while nothing was learned."""
    mixed_step_observations: int = 0
    """Mixed steps that correction has learned from."""
    mixed_step_errors: tuple[float, ...] = ()
    """(p50, p90, p99) of measured / predicted over the last 1,000 of those mixed steps, each
    prediction as corrected when it was made: the spread the SLO's headroom has to cover
    (the SLO-aware budget aims at the SLO less 10 %). Empty while nothing was learned."""
    split_iterations: int = 0
    """Duet mode: iterations run split on a worker pair."""
    aggregated_iterations: int = 0
    """Duet mode: iterations the optimizer kept aggregated."""
    mode_switches: int = 0
    """Duet mode: changes between aggregated and split iterations."""
    worker_failures: int = 0
    """Duet mode: worker processes lost (and restarted)."""
    requeued_requests: int = 0
    """Duet mode: requests sent back to the queue when a worker was lost."""
    stream_dispatches: int = 0
    """Duet mode: decode dispatches launched while a split's prefill chunk was running."""
    carried_dispatches: int = 0
    """Duet mode: decode dispatches still running when their split iteration ended."""
    decode_steps: int = 1
    """Duet mode: k of the last decision."""
    predicted_ms: float = 0.0
    """Duet mode: the roofline's time of the last split iteration."""
    measured_ms: float = 0.0
    """Duet mode: the measured time of the last split iteration."""
    loop: LoopStats = dataclasses.field(default_factory=LoopStats)
    """Where the host loop's time went (a copy)."""
    compile_seconds: float = 0.0
    """Time spent compiling step executables so far (all of it at start unless
    ``compile_on_start`` is off)."""
