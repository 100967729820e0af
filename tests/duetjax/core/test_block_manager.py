"""Page allocation, reference counts and the prefix cache (no device needed)."""
from duetjax.core.block_manager import BlockManager
from duetjax.core.request import Request
from duetjax.sampling_params import SamplingParams


def request(tokens, name="r"):
    return Request(name, list(tokens), SamplingParams(), seed=0)


def compute_all(blocks, r):
    """What a step does: give pages, mark everything computed, name the full pages."""
    blocks.grow(r, r.num_tokens)
    r.num_computed_tokens = r.num_tokens
    blocks.cache_full_pages(r)


def test_grow_and_free_return_every_page():
    blocks = BlockManager(num_pages=8, page_size=4)
    r = request(range(10))
    assert blocks.can_hold(r, 10) and not blocks.can_hold(r, 33)
    blocks.grow(r, 10)
    assert len(r.block_table) == 3 and blocks.num_free_pages == 5
    blocks.free(r)
    assert blocks.num_free_pages == 8 and r.block_table == []


def test_shared_prefix_is_reused_and_reference_counted():
    blocks = BlockManager(num_pages=8, page_size=4)
    first = request(range(10), "a")
    compute_all(blocks, first)
    second = request(list(range(8)) + [99, 98, 97], "b")
    blocks.match_prefix(second)
    assert second.block_table == first.block_table[:2] and second.num_computed_tokens == 8
    blocks.free(first)
    assert blocks.num_free_pages == 8 - 2  # the two shared pages are still held by `second`
    blocks.free(second)
    assert blocks.num_free_pages == 8


def test_at_least_one_token_is_left_to_compute():
    blocks = BlockManager(num_pages=8, page_size=4)
    compute_all(blocks, request(range(8), "a"))
    again = request(range(8), "b")
    blocks.match_prefix(again)
    assert again.num_computed_tokens == 4  # not 8: the last page must be recomputed for logits


def test_freed_cached_pages_survive_until_evicted_lru():
    blocks = BlockManager(num_pages=4, page_size=4)
    old = request(range(8), "old")
    compute_all(blocks, old)
    blocks.free(old)
    hit = request(list(range(8)) + [1], "hit")
    blocks.match_prefix(hit)
    assert hit.num_computed_tokens == 8  # still cached after free
    blocks.free(hit)
    filler = request(range(100, 116), "filler")  # needs all 4 pages: evicts everything
    compute_all(blocks, filler)
    blocks.free(filler)
    miss = request(list(range(8)) + [1], "miss")
    blocks.match_prefix(miss)
    assert miss.num_computed_tokens == 0


def test_disabled_prefix_caching_never_matches():
    blocks = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    compute_all(blocks, request(range(10), "a"))
    other = request(range(10), "b")
    blocks.match_prefix(other)
    assert other.num_computed_tokens == 0
