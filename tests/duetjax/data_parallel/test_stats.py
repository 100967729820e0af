"""One EngineStats of every replica's: sums, recomputed ratios, and what crosses the pipe."""
from __future__ import annotations

import pickle
from types import MappingProxyType

from duetjax.data_parallel.stats import combine, portable
from duetjax.engine_stats import EngineStats
from duetjax.loop_stats import LoopStats


def test_counts_add_up_and_ratios_come_from_the_totals():
    a = EngineStats(num_running=2, num_waiting=1, num_free_pages=30, num_pages=100, page_size=16,
                    prefix_cache_hit_tokens=10, prefix_cache_query_tokens=100, num_steps=5,
                    kv_cache_usage=0.7, prefix_cache_hit_rate=0.1, compile_seconds=2.0,
                    token_budget_choices=MappingProxyType({64: 2}), loop=LoopStats(steps=5))
    b = EngineStats(num_running=1, num_free_pages=50, num_pages=100, page_size=16,
                    prefix_cache_hit_tokens=90, prefix_cache_query_tokens=100, num_steps=7,
                    kv_cache_usage=0.5, prefix_cache_hit_rate=0.9, compile_seconds=3.0,
                    token_budget_choices=MappingProxyType({64: 1, 32: 4}), loop=LoopStats(steps=7))
    both = combine([a, b])
    assert (both.num_running, both.num_waiting, both.num_pages, both.num_steps) == (3, 1, 200, 12)
    assert both.kv_cache_usage == 1 - 80 / 200 and both.prefix_cache_hit_rate == 0.5
    assert both.compile_seconds == 5.0 and both.loop.steps == 12 and both.page_size == 16
    assert dict(both.token_budget_choices) == {64: 3, 32: 4}
    assert combine([EngineStats()]).kv_cache_usage == 0.0


def test_portable_stats_pickle():
    stats = EngineStats(token_budget_choices=MappingProxyType({64: 2}))
    assert pickle.loads(pickle.dumps(portable(stats))).token_budget_choices == {64: 2}
