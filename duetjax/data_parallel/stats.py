"""Engine statistics across replicas: what crosses the pipe, and one snapshot of them all."""
from __future__ import annotations

import collections
import dataclasses
from types import MappingProxyType
from typing import Sequence

from ..engine_stats import EngineStats
from ..loop_stats import LoopStats

SUMMED = ("num_running", "num_waiting", "num_free_pages", "num_pages", "prefix_cache_hit_tokens",
          "prefix_cache_query_tokens", "num_steps", "num_preemptions", "num_constrained",
          "num_prompt_logprobs", "compile_seconds")
"""Fields whose total over the replicas is the whole engine's."""

IDLE = {"num_running": 0, "num_waiting": 0, "num_constrained": 0, "num_prompt_logprobs": 0}
"""What a replica that died still runs: nothing (its counters stay, so totals never drop)."""


def portable(stats: EngineStats) -> EngineStats:
    """``stats`` in a form that pickles (a mapping proxy does not)."""
    return dataclasses.replace(stats, token_budget_choices=dict(stats.token_budget_choices))


def combine(replicas: Sequence[EngineStats]) -> EngineStats:
    """One snapshot of every replica's: the counts of ``SUMMED``, the loop's times and the
    token budgets' choices added up; KV cache usage and prefix cache hit rate recomputed from
    the totals; the rest (page size, mode, the last token budget, the mixed steps' correction,
    its observations and their errors) the first replica's, which every replica shares but the
    last budget and the correction."""
    first = replicas[0]
    totals = {name: sum(getattr(s, name) for s in replicas) for name in SUMMED}
    loop = LoopStats(**{f.name: sum(getattr(s.loop, f.name) for s in replicas)
                        for f in dataclasses.fields(LoopStats)})
    choices: collections.Counter[int] = collections.Counter()
    for s in replicas:
        choices.update(s.token_budget_choices)
    pages, free = totals["num_pages"], totals["num_free_pages"]
    queried, hits = totals["prefix_cache_query_tokens"], totals["prefix_cache_hit_tokens"]
    return dataclasses.replace(
        first, **totals, loop=loop, token_budget_choices=MappingProxyType(dict(choices)),
        kv_cache_usage=1.0 - free / pages if pages else 0.0,
        prefix_cache_hit_rate=hits / queried if queried else 0.0)
