"""Paged KV allocation with automatic prefix caching (plain Python, no device arrays).

Every page a request fills completely is named by a hash chained over all tokens up to its end,
so two requests that share a prefix share its pages. Pages are reference counted; a page whose
count drops to zero keeps its content and its hash and joins the free list in least recently
used order: a later request with the same prefix takes it back for free, and allocation evicts
(from the front of that list) only when it needs the space.
"""
from __future__ import annotations

import array
import hashlib
from collections import OrderedDict

from .request import Request

PageHash = bytes


def page_hash(parent: PageHash | None, tokens: list[int]) -> PageHash:
    """Hash of a full page given its predecessor's hash (a collision-resistant digest, since a
    collision would serve one request's KV to another)."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array.array("q", tokens).tobytes())  # (int64, as a list converts fastest)
    return digest.digest()


class BlockManager:
    """Hands out pages of ``page_size`` tokens from a pool of ``num_pages``."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_pages
        self._hash_of: list[PageHash | None] = [None] * num_pages
        self._page_of: dict[PageHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))  # LRU order
        self.prefix_queries = 0
        """Prompt tokens looked up in the prefix cache."""
        self.prefix_hits = 0
        """Prompt tokens found there (their KV was not recomputed)."""

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _take(self, page: int) -> None:
        if self._ref_count[page] == 0:
            del self._free[page]
        self._ref_count[page] += 1

    def match_prefix(self, request: Request) -> None:
        """Gives a request that has no pages yet the cached pages of its longest cached prefix
        and marks those tokens computed. At least one token is always left to compute, since
        the step that computes it produces the logits of the next token."""
        assert not request.block_table and request.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        usable = (request.num_tokens - 1) // self.page_size
        hashes = request.page_hashes
        parent = None
        for index in range(usable):
            if index == len(hashes):
                hashes.append(page_hash(parent, request.token_slice(
                    index * self.page_size, (index + 1) * self.page_size)))
            parent = hashes[index]
            page = self._page_of.get(parent)
            if page is None:
                break
            self._take(page)
            request.block_table.append(page)
        request.num_computed_tokens = len(request.block_table) * self.page_size
        request.num_cached_pages = len(request.block_table)

    def record_lookup(self, request: Request) -> None:
        """Counts an admitted request's prefix lookup in the hit-rate statistics."""
        self.prefix_queries += request.num_tokens
        self.prefix_hits += request.num_computed_tokens

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        """Whether ``request`` can grow to ``num_tokens`` tokens of KV."""
        return self.pages_needed(num_tokens) - len(request.block_table) <= len(self._free)

    def grow(self, request: Request, num_tokens: int) -> None:
        """Gives ``request`` enough pages for ``num_tokens`` tokens (call can_hold first)."""
        missing = self.pages_needed(num_tokens) - len(request.block_table)
        if missing > len(self._free):
            raise RuntimeError(f"{request} needs {missing} pages, {len(self._free)} are free")
        for _ in range(missing):
            page, _ = self._free.popitem(last=False)  # least recently used
            old = self._hash_of[page]
            if old is not None:  # evict its cached content
                del self._page_of[old]
                self._hash_of[page] = None
            self._ref_count[page] = 1
            request.block_table.append(page)

    def cache_full_pages(self, request: Request) -> None:
        """Names the pages that the request's computed tokens now fill completely."""
        if (not self.enable_prefix_caching
                or request.num_computed_tokens // self.page_size <= request.num_cached_pages):
            return  # (the usual case: called for every request on every step)
        # Only tokens the host knows: a k-step decode in flight has computed PENDING ones.
        known = len(request.prompt_token_ids) + request.num_resolved_outputs
        full = min(request.num_computed_tokens, known) // self.page_size
        hashes = request.page_hashes
        for index in range(request.num_cached_pages, full):
            if index == len(hashes):
                parent = hashes[index - 1] if index else None
                hashes.append(page_hash(parent, request.token_slice(
                    index * self.page_size, (index + 1) * self.page_size)))
            page = request.block_table[index]
            if hashes[index] not in self._page_of and self._hash_of[page] is None:
                self._page_of[hashes[index]] = page
                self._hash_of[page] = hashes[index]
        request.num_cached_pages = max(request.num_cached_pages, full)

    def free(self, request: Request) -> None:
        """Drops ``request``'s references; pages nobody uses join the LRU free list, tail pages
        first so that a shared prefix outlives the private ends of the requests using it."""
        for page in reversed(request.block_table):
            self._ref_count[page] -= 1
            if self._ref_count[page] == 0:
                self._free[page] = None
        request.block_table = []
        request.num_cached_pages = 0
