"""The router alone: load balance, prefix affinity, the balance threshold, its LRU bound, ties."""
from __future__ import annotations

import pytest

from duetjax.data_parallel.router import CACHE, LOAD, Router

BLOCK = 4


def prompt(start: int, blocks: int, tail: int = 0) -> list[int]:
    """``blocks`` full blocks of tokens counted from ``start``, then ``tail`` more."""
    return list(range(start, start + blocks * BLOCK + tail))


def test_requests_go_to_the_least_loaded_replica():
    router = Router(3, BLOCK)
    routes = [router.route(prompt(100 * i, 1)) for i in range(6)]
    assert [r.replica for r in routes] == [0, 1, 2, 0, 1, 2]
    assert {r.reason for r in routes} == {LOAD}
    router.release(routes[1])
    router.release(routes[4])
    assert router.route(prompt(900, 1)).replica == 1  # the only one with fewer requests


def test_ties_in_requests_go_to_fewest_prompt_tokens_then_the_least_recently_chosen():
    router = Router(2, BLOCK)
    long = router.route(prompt(0, 10))
    short = router.route(prompt(500, 1))
    assert (long.replica, short.replica) == (0, 1)
    assert router.route(prompt(900, 2)).replica == 1  # 1 request each; fewer tokens on 1
    router = Router(2, BLOCK)
    for expected in (0, 1, 0, 1):  # idle and equal: they take turns
        route = router.route([7, 7])
        assert route.replica == expected
        router.release(route)


def test_a_shared_prefix_goes_where_it_went_before():
    router = Router(2, BLOCK)
    first = router.route(prompt(0, 3))
    other = router.route(prompt(1000, 3))
    assert first.replica != other.replica
    again = router.route(prompt(0, 2, tail=3))  # the first 2 blocks match
    assert (again.replica, again.reason, again.cached_blocks) == (first.replica, CACHE, 2)
    assert router.decisions == {LOAD: 2, CACHE: 1}


def test_the_longest_match_wins():
    router = Router(3, BLOCK, balance_threshold=1)
    router.route(prompt(0, 1))                 # replica 0 holds block 0
    router.route(prompt(0, 1))                 # and stays its home (1 request more: allowed)
    moved = router.route(prompt(0, 2))         # 2 more than the idle ones: to replica 1
    assert (moved.replica, moved.reason) == (1, LOAD)
    route = router.route(prompt(0, 2, tail=1))  # replica 1 holds 2 blocks, 0 only one
    assert (route.replica, route.reason, route.cached_blocks) == (1, CACHE, 2)


def test_among_equal_matches_the_most_recent_home_wins():
    router = Router(2, BLOCK, balance_threshold=0)
    shared = prompt(0, 1)
    a, b = router.route(shared), router.route(shared)  # the second overflows to replica 1
    assert (a.replica, b.replica, b.reason) == (0, 1, LOAD)
    router.release(a)
    router.release(b)
    c = router.route(shared)
    assert (c.replica, c.reason) == (1, CACHE)  # both hold it; replica 1 served it last
    d = router.route(shared)                    # overflows to replica 0, now the latest
    assert d.replica == 0
    router.release(c)
    router.release(d)
    assert router.route(shared).replica == 0


def test_the_balance_threshold_overrides_affinity():
    router = Router(2, BLOCK, balance_threshold=2)
    shared = prompt(0, 2)
    routes = [router.route(shared) for _ in range(4)]
    # Affinity keeps it on replica 0 while 0 has at most 2 requests more than 1.
    assert [r.replica for r in routes] == [0, 0, 0, 1]
    assert [r.reason for r in routes] == [LOAD, CACHE, CACHE, LOAD]
    # Now both hold the prefix: the match ties, and replica 1 served it last.
    assert router.route(shared).replica == 1


def test_prefix_memory_is_bounded_least_recently_used_first():
    router = Router(2, BLOCK, max_blocks=4)
    kept = router.route(prompt(0, 2))
    router.release(kept)
    router.release(router.route(prompt(100, 2)))  # replica 1 (turns)
    router.release(router.route(prompt(200, 2)))  # replica 0: 4 blocks, full
    router.release(router.route(prompt(0, 1)))    # touches block 0 of `kept`
    router.release(router.route(prompt(300, 2)))  # replica 1
    router.release(router.route(prompt(400, 2)))  # replica 0: evicts 2 blocks
    assert all(len(blocks) <= 4 for blocks in router._blocks)
    # Block 0 of `kept` was used recently and stays; its block 1 went.
    assert router.route(prompt(0, 2)).cached_blocks == 1
    evicted = router.route(prompt(200, 2))
    assert evicted.reason == LOAD and evicted.cached_blocks == 0


def test_the_first_blocks_of_a_prompt_are_evicted_last():
    router = Router(1, BLOCK, max_blocks=3)
    router.route(prompt(0, 5))
    assert router.route(prompt(0, 5)).cached_blocks == 3


def test_a_removed_replica_takes_no_requests_and_forgets_its_prefixes():
    router = Router(2, BLOCK)
    first = router.route(prompt(0, 2))
    router.remove(first.replica)
    assert {router.route(prompt(0, 2)).replica for _ in range(3)} == {1 - first.replica}
    router.remove(1 - first.replica)
    with pytest.raises(RuntimeError, match="no replica"):
        router.route(prompt(0, 2))


def test_blocks_are_the_engines_page_hashes():
    from duetjax.core.block_manager import page_hash

    router = Router(1, BLOCK)
    ids = prompt(0, 2, tail=3)
    first = page_hash(None, ids[:BLOCK])
    assert router.block_hashes(ids) == [first, page_hash(first, ids[BLOCK:2 * BLOCK])]
    assert router.block_hashes(ids[:BLOCK - 1]) == []
