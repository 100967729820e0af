"""Which replica serves a request: load-aware, and prefix-cache-aware within a balance bound.

Each replica's engine keeps the KV pages of prompts it served (its prefix cache), so a request
that starts like an earlier one runs its prefill faster where that one ran. The router keeps,
per replica, the chained hashes of the full page-size blocks of the prompts it sent there
(the engine's own page hashes, ``core.block_manager.page_hash``), least recently used first
and bounded like a KV pool. A request goes to the replica that most recently served the
longest prefix of its prompt, unless that replica has more than ``balance_threshold``
requests in flight beyond the least loaded one: then, and when no replica served any of its
prefix, it goes to the least loaded replica (fewest requests in flight, then fewest prompt
tokens in flight, then the one chosen least recently, so that equal replicas take turns).

Plain Python and no locking: its owner serializes the calls.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Sequence

from ..core.block_manager import PageHash, page_hash

CACHE, LOAD = "cache", "load"
"""Why a replica was chosen: it served the longest prefix, or it was the least loaded."""


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one request went, and the load it adds there until ``Router.release``."""

    replica: int
    reason: str
    """CACHE or LOAD."""
    cached_blocks: int
    """Leading blocks of the prompt that the chosen replica served before."""
    num_tokens: int
    """Prompt tokens (the request's share of the replica's load)."""


@dataclasses.dataclass(frozen=True)
class RouterSnapshot:
    """The router's state at one moment (for metrics)."""

    num_requests: tuple[int, ...]
    """Requests in flight per replica."""
    alive: tuple[bool, ...]
    decisions: dict[str, int]
    """Requests routed so far for each reason (CACHE, LOAD)."""


class Router:
    """Chooses replicas for requests and counts their load.

    block_size: tokens per hashed block (the engines' page size). balance_threshold: most
    requests in flight that prefix affinity may put on a replica beyond the least loaded one.
    max_blocks: prefix blocks remembered per replica (a replica's KV pool cannot hold more
    pages than it has).
    """

    def __init__(self, num_replicas: int, block_size: int, *, balance_threshold: int = 16,
                 max_blocks: int = 1 << 16):
        if num_replicas < 1 or block_size < 1 or balance_threshold < 0 or max_blocks < 1:
            raise ValueError("a router needs num_replicas, block_size and max_blocks >= 1 and "
                             "balance_threshold >= 0")
        self.block_size = block_size
        self.balance_threshold = balance_threshold
        self.max_blocks = max_blocks
        self.num_requests = [0] * num_replicas
        """Requests in flight per replica."""
        self.num_tokens = [0] * num_replicas
        """Prompt tokens in flight per replica."""
        self.alive = [True] * num_replicas
        self.decisions: collections.Counter[str] = collections.Counter()
        """Requests routed for each reason (CACHE, LOAD)."""
        self._blocks: list[collections.OrderedDict[PageHash, int]] = [
            collections.OrderedDict() for _ in range(num_replicas)]
        """Per replica: block hash -> when it was last routed there, least recent first."""
        self._clock = itertools.count(1)
        self._last_chosen = [0] * num_replicas

    def block_hashes(self, token_ids: Sequence[int]) -> list[PageHash]:
        """The chained hashes of the prompt's full blocks, as the engines name its pages."""
        hashes: list[PageHash] = []
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            hashes.append(page_hash(hashes[-1] if hashes else None,
                                    list(token_ids[start:start + size])))
        return hashes

    def route(self, token_ids: Sequence[int]) -> Route:
        """Picks the replica of a prompt and adds the request to its load."""
        live = [r for r, alive in enumerate(self.alive) if alive]
        if not live:
            raise RuntimeError("no replica is alive")
        hashes = self.block_hashes(token_ids)
        least = min(live, key=lambda r: (self.num_requests[r], self.num_tokens[r],
                                         self._last_chosen[r]))
        matched, best = max((self._match(r, hashes), r) for r in live)
        if matched[0] and self.num_requests[best] - self.num_requests[least] <= self.balance_threshold:
            replica, reason, cached = best, CACHE, matched[0]
        else:
            replica, reason = least, LOAD
            cached = self._match(least, hashes)[0]
        now = next(self._clock)
        self._last_chosen[replica] = now
        self._remember(replica, hashes, now)
        self.num_requests[replica] += 1
        self.num_tokens[replica] += len(token_ids)
        self.decisions[reason] += 1
        return Route(replica, reason, cached, len(token_ids))

    def release(self, route: Route) -> None:
        """The request of ``route`` finished (or failed, or was aborted)."""
        self.num_requests[route.replica] -= 1
        self.num_tokens[route.replica] -= route.num_tokens

    def remove(self, replica: int) -> None:
        """Stops routing to ``replica`` (it died) and forgets what it cached."""
        self.alive[replica] = False
        self._blocks[replica].clear()

    def snapshot(self) -> RouterSnapshot:
        return RouterSnapshot(tuple(self.num_requests), tuple(self.alive),
                              {reason: self.decisions[reason] for reason in (CACHE, LOAD)})

    def _match(self, replica: int, hashes: list[PageHash]) -> tuple[int, int]:
        """(leading blocks of ``hashes`` that ``replica`` served, when it last served the
        deepest of them): the larger, the better a home for the prompt."""
        blocks = self._blocks[replica]
        matched, when = 0, 0
        for h in hashes:
            if h not in blocks:
                break
            matched, when = matched + 1, blocks[h]
        return matched, when

    def _remember(self, replica: int, hashes: list[PageHash], now: int) -> None:
        blocks = self._blocks[replica]
        for h in reversed(hashes):  # the first blocks most recent: evicted last
            blocks[h] = now
            blocks.move_to_end(h)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)
