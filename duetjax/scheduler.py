"""Continuous batching with a token budget per step (plain Python, no device arrays).

Each step: running requests first (a decode token each, or the next chunk of an unfinished
prefill), then waiting requests in arrival order (FCFS) while budget, sequence slots and pages
last. A request whose pages cannot grow preempts the most recently admitted running request,
which frees its pages and goes back to the front of the queue to be recomputed later: running
out of pages never loses a request.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from .block_manager import BlockManager
from .config import EngineConfig
from .request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens computed for it in this step (starting at its num_computed_tokens)."""

    @property
    def completes_sequence(self) -> bool:
        """After this step all its known tokens have KV, so the step samples its next token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Rows of the device's token-count table, one per request with penalties, held from
        # its first admission to its end (a preempted request keeps its counts).
        self.free_penalty_slots: deque[int] = deque(range(config.max_num_seqs))
        self.num_preemptions = 0
        """Requests sent back to the queue for lack of KV pages (they are recomputed later)."""

    def add(self, request: Request) -> None:
        needed = self.blocks.pages_needed(len(request.prompt_token_ids) + 1)
        if needed > self.blocks.num_pages:
            raise ValueError(f"prompt of {len(request.prompt_token_ids)} tokens needs {needed} KV "
                             f"pages but the pool has {self.blocks.num_pages}; raise kv_cache_tokens")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._at_length_limit(request):
                index += 1  # its last token is still on the device; it finishes on arrival
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            while not self.blocks.can_hold(request, target):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            self.blocks.grow(request, target)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            index += 1

        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.params.penalized and request.penalty_slot is None:
                if not self.free_penalty_slots:
                    break
                request.penalty_slot = self.free_penalty_slots.popleft()
                request.penalty_slot_fresh = True
            self.blocks.match_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            if not self.blocks.can_hold(request, target):
                self.blocks.free(request)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.blocks.record_lookup(request)
            self.blocks.grow(request, target)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def _at_length_limit(self, request: Request) -> bool:
        return (len(request.output_token_ids) >= request.params.max_tokens
                or request.num_tokens >= self.max_model_len)

    def commit(self, batch: SchedulerOutput) -> None:
        """Records that a step was launched: its tokens count as computed from now on."""
        for item in batch.scheduled:
            item.request.num_computed_tokens += item.num_new_tokens

    def _preempt(self, request: Request) -> None:
        self.num_preemptions += 1
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request (stopped, length, or aborted) and frees its pages."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.blocks.free(request)
        if request.penalty_slot is not None:
            self.free_penalty_slots.append(request.penalty_slot)
            request.penalty_slot = None
