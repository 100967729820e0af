"""Continuous batching with a token budget per step (plain Python, no device arrays).

Each step: running requests first (a decode token each, or the next chunk of an unfinished
prefill), then waiting requests in arrival order (FCFS) while budget, sequence slots and pages
last. A request whose pages cannot grow preempts the most recently admitted running request,
which frees its pages and goes back to the front of the queue to be recomputed later: running
out of pages never loses a request. Every running request has a row of the ``InputBatch``,
which the scheduler writes as requests join, grow and leave.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from ..config import EngineConfig
from .block_manager import BlockManager
from .input_batch import InputBatch, SteadyDecode
from .request import PENDING, Request, RequestStatus


@dataclasses.dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens computed for it in this step (starting at its num_computed_tokens)."""
    num_steps: int = 1
    """Decode steps that count for it in a k-step decode (fewer than k where its token limit
    ends it sooner); 1 otherwise."""

    @property
    def num_computed_after(self) -> int:
        """Tokens that have KV once the dispatch has run."""
        return self.request.num_computed_tokens + self.num_new_tokens + self.num_steps - 1

    @property
    def completes_sequence(self) -> bool:
        """After this step all its known tokens have KV, so the step samples its next token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_steps: int = 1
    """Decode steps run by this dispatch (k > 1: a k-step decode of every scheduled request)."""
    continues: SteadyDecode | None = None
    """Set when this is the previous dispatch again, one decode dispatch later: the same
    ``scheduled`` list (the same requests in the same rows, every one decoding ``num_steps``
    tokens), nothing else changed in between. Its inputs follow from the previous dispatch's
    by arithmetic, and its rows' fixed facts are kept in the steady decode."""
    rows_at_limit: list[int] = dataclasses.field(default_factory=list)
    """Of a continuing dispatch: the rows whose token limit its tokens reach."""
    grown_rows: list[int] = dataclasses.field(default_factory=list)
    """Of a continuing dispatch: the rows whose block tables grew since the previous one."""
    grown_tables: np.ndarray | None = None
    """Of a continuing dispatch: the block tables of ``grown_rows`` now (their input batch
    rows)."""
    slots_to_fill: list[Request] = dataclasses.field(default_factory=list)
    """Requests admitted with a fresh penalty slot whose slot tables (prompt tokens, logit
    biases) must be written before any step of theirs is launched (``LocalExecutor.launch``)."""
    rows: InputBatch | None = None
    """The input batch holding its requests' rows, which its step inputs are gathered from
    (None: they are built from the requests alone)."""
    unadmitted: list[tuple[Request, Exception]] = dataclasses.field(default_factory=list)
    """Requests taken from the queue whose input batch row could not be written, with why:
    they are not scheduled, and the executor fails them alone (``LocalExecutor.admit``)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.scheduled)


def _decoding(request: Request) -> bool:
    """All its tokens but the newest have KV: its next step is a decode step."""
    return request.num_tokens - request.num_computed_tokens == 1


def split_batch(batch: SchedulerOutput) -> tuple[SchedulerOutput, SchedulerOutput]:
    """(prefill chunks, k-step decodes) of a batch scheduled with ``split=True``."""
    decode = [s for s in batch.scheduled if _decoding(s.request) and s.num_new_tokens == 1]
    prefill = [s for s in batch.scheduled if not (_decoding(s.request) and s.num_new_tokens == 1)]
    return (SchedulerOutput(prefill, batch.preempted, slots_to_fill=batch.slots_to_fill,
                            rows=batch.rows, unadmitted=batch.unadmitted),
            SchedulerOutput(decode, [], batch.num_steps if decode else 1, rows=batch.rows))


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Rows of the device's token-count and slot tables, one per request with penalties or
        # logit biases, held from its first admission to its end (a preempted request keeps
        # its counts).
        self.free_penalty_slots: deque[int] = deque(range(config.max_num_seqs))
        self.num_preemptions = 0
        """Requests sent back to the queue for lack of KV pages (they are recomputed later)."""
        self.num_finished = 0
        """Requests ended so far (the host loop checks rows for ends only when it changed)."""
        self.num_constrained = 0
        """Unfinished requests with structured outputs (a ``matcher``): while there are any,
        the engine looks for them in each batch to build its token mask."""
        self.num_prompt_logprobs = 0
        """Unfinished requests with prompt logprobs whose prompt is not all computed (launched)
        yet: while there are any, the engine looks for their positions in each batch, and duet
        mode stays aggregated (workers compute no prompt logprobs)."""
        self.input_batch = InputBatch(config.max_num_seqs, -(-max_model_len // config.page_size))
        """A row per running request: what its steps' inputs are gathered from."""

    def add(self, request: Request) -> None:
        needed = self.blocks.pages_needed(len(request.prompt_token_ids) + 1)
        if needed > self.blocks.num_pages:
            raise ValueError(f"prompt of {len(request.prompt_token_ids)} tokens needs {needed} KV "
                             f"pages but the pool has {self.blocks.num_pages}; raise kv_cache_tokens")
        request.max_output_tokens = min(request.params.max_tokens,
                                        self.max_model_len - len(request.prompt_token_ids))
        self.waiting.append(request)
        if request.matcher is not None:
            self.num_constrained += 1
        if request.prompt_logprobs is not None:
            self.num_prompt_logprobs += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_prefill_work(self) -> bool:
        """A request waits, or a running one has prompt tokens left (a steady decode batch,
        where every running request decodes, answers without a pass over them)."""
        if self.waiting:
            return True
        if self.input_batch.steady is not None:
            return False
        return any(not _decoding(r) for r in self.running)

    def schedule(self, decode_steps: int = 1, split: bool = False,
                 chunks_only: bool = False, budget: int | None = None) -> SchedulerOutput:
        """The next step's batch. ``decode_steps`` > 1 asks for a k-step decode, granted when
        every running request is decoding and nobody waits (a newcomer would wait k steps), and
        none needs the full sampler (which runs between steps, not inside the k-step loop).
        ``split``: DuetServe's split mode, where decoding requests get k steps on the decode
        worker while the prefill worker runs the chunks (``split_batch`` separates them).
        ``chunks_only`` (with ``split``): prefill chunks only, while a decode dispatch of the
        previous split still runs: decoding requests keep their token of the budget but are
        left to the decode stream, and nothing is preempted (a victim's pages could be in that
        dispatch); a chunk whose pages cannot grow waits. ``budget``: this step's token budget
        (None: ``max_num_batched_tokens``; the SLO-aware budget passes a smaller one)."""
        steady, self.input_batch.steady = self.input_batch.steady, None
        if (steady is not None and steady.launched and not split and not self.waiting
                and steady.decode_steps == decode_steps):
            output = self._continue(steady)
            if output is not None:
                return output
        if budget is None:
            budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        k = decode_steps if decode_steps > 1 and (split or (not self.waiting and self.running and all(
            r.num_tokens - r.num_computed_tokens == 1 for r in self.running))) and not any(
            r.needs_full_sampler for r in self.running) else 1

        # Every running request passes here on every step: the common case (a decode whose
        # pages already hold the new token) costs no call into the block manager.
        page_size = self.blocks.page_size
        index = 0
        running = self.running
        stalled = False
        while index < len(running) and budget > 0:
            request = running[index]
            num_outputs = len(request.output_token_ids)
            if num_outputs >= request.max_output_tokens:  # (_at_length_limit, inlined)
                index += 1  # its last token is still on the device; it finishes on arrival
                continue
            uncomputed = len(request.prompt_token_ids) + num_outputs - request.num_computed_tokens
            if (request.matcher is not None and uncomputed == 1 and num_outputs
                    and request.output_token_ids[-1] == PENDING):
                index += 1  # its next token's mask follows the one still on the device
                continue
            if chunks_only and uncomputed == 1:
                budget -= 1
                index += 1
                continue
            num_new = uncomputed if uncomputed < budget else budget
            steps = 1
            if k > 1 and uncomputed == 1:  # _steps_allowed, inlined (its length limit is ahead)
                steps = min(k, request.max_output_tokens - num_outputs)
            target = request.num_computed_tokens + num_new + steps - 1
            if target > len(request.block_table) * page_size:
                if chunks_only and not self.blocks.can_hold(request, target):
                    stalled = True  # (and nobody is admitted past it)
                    break
                while not self.blocks.can_hold(request, target):
                    victim = self.running.pop()  # the most recently admitted
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is request:
                        break
                if request.status is not RequestStatus.RUNNING:
                    break
                self._grow(request, target)
            scheduled.append(ScheduledRequest(request, num_new, steps))
            budget -= num_new
            index += 1

        num_running = len(scheduled)
        slots_to_fill: list[Request] = []
        unadmitted: list[tuple[Request, Exception]] = []
        while (self.waiting and budget > 0 and not preempted and not stalled
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.params.penalized and request.penalty_slot is None:
                if not self.free_penalty_slots:
                    break
                request.penalty_slot = self.free_penalty_slots.popleft()
                request.penalty_slot_fresh = True
            if request.prompt_logprobs is None:  # (prompt logprobs need every position computed)
                self.blocks.match_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            if not self.blocks.can_hold(request, target):
                self.blocks.free(request)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.blocks.grow(request, target)
            try:
                self.input_batch.add(request)
            except Exception as error:  # (its settings do not fit the step's arrays)
                self.blocks.free(request)
                unadmitted.append((request, error))
                continue
            self.blocks.record_lookup(request)
            if request.penalty_slot_fresh and request.params.fills_slot:  # (no step of it ran yet)
                slots_to_fill.append(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        if k > 1 and any(item.request.needs_full_sampler for item in scheduled[num_running:]):
            # A newcomer (split mode admits while decodes take k steps) needs the full sampler,
            # which runs between steps: one step for everyone (the extra pages stay theirs).
            k = 1
            for item in scheduled:
                item.num_steps = 1
        output = SchedulerOutput(scheduled, preempted, k if scheduled else 1,
                                 slots_to_fill=slots_to_fill, rows=self.input_batch,
                                 unadmitted=unadmitted)
        if (scheduled and not split and not preempted and not self.waiting
                and len(scheduled) == len(self.running)):
            self.input_batch.steady = self._steady_after(output, decode_steps)
        return output

    def _steady_after(self, output: SchedulerOutput, decode_steps: int) -> SteadyDecode | None:
        """The steady decode that continues ``output``: when every running request decodes
        ``num_steps`` tokens in it."""
        k, n = output.num_steps, len(output.scheduled)
        if k > self.blocks.page_size or self.num_constrained:
            # (``SteadyDecode`` tracks pages filled by at most one page of tokens; a constrained
            # request sits out every other step)
            return None
        for item in output.scheduled:
            r = item.request
            if (item.num_new_tokens != 1 or item.num_steps != k
                    or r.num_computed_tokens + 1 != len(r.prompt_token_ids) + len(r.output_token_ids)):
                return None
        requests = [item.request for item in output.scheduled]
        headroom = np.fromiter((r.max_output_tokens - len(r.output_token_ids) - k for r in requests),
                               np.int64, n)
        target = np.fromiter((r.num_computed_tokens for r in requests), np.int64, n) + 2 * k
        return SteadyDecode(output, decode_steps, self.input_batch.rows(requests), headroom, target)

    def _continue(self, steady: SteadyDecode) -> SchedulerOutput | None:
        """The steady decode's next dispatch, or None where a row reaches its token limit or
        needs pages that are not free (the full ``schedule`` then handles it). Only rows whose
        next tokens cross into a new page are visited."""
        k = steady.output.num_steps
        scheduled = steady.output.scheduled
        least = int(steady.headroom.min())
        if least < k:
            return None
        page_size = self.blocks.page_size
        rows = self.input_batch
        grown = np.flatnonzero(steady.target > rows.num_pages[steady.rows] * page_size).tolist()
        for row in grown:
            request, target = scheduled[row].request, int(steady.target[row])
            if not self.blocks.can_hold(request, target):
                return None
            self._grow(request, target)
        at_limit = np.flatnonzero(steady.headroom == k).tolist() if least == k else []
        steady.headroom -= k
        steady.target += k
        if not steady.gathered:
            steady.gather(page_size)
        steady.output = SchedulerOutput(
            scheduled, [], k, continues=steady, rows=rows, rows_at_limit=at_limit,
            grown_rows=grown, grown_tables=rows.block_tables[steady.rows[grown]] if grown else None)
        steady.launched = False
        rows.steady = steady
        return steady.output

    def schedule_decodes(self, k: int, exclude: set[str]) -> SchedulerOutput:
        """A decode-only batch of the running requests that are decoding, except the ids in
        ``exclude`` (their prefill chunk still runs on another worker): split mode's decode
        stream. Nothing is preempted here (a victim's pages could still be written by that
        chunk): a request whose pages cannot grow waits for the next full ``schedule``."""
        if any(r.needs_full_sampler for r in self.running):
            k = 1
        scheduled = []
        for request in self.running:
            if (request.request_id in exclude or not _decoding(request)
                    or self._at_length_limit(request)):
                continue
            steps = self._steps_allowed(request, k)
            target = request.num_computed_tokens + steps
            if not self.blocks.can_hold(request, target):
                continue
            self._grow(request, target)
            scheduled.append(ScheduledRequest(request, 1, steps))
        return SchedulerOutput(scheduled, [], k if scheduled else 1, rows=self.input_batch)

    def _grow(self, request: Request, num_tokens: int) -> None:
        """Gives a running request pages for ``num_tokens`` tokens, and its row their ids."""
        self.blocks.grow(request, num_tokens)
        self.input_batch.write_pages(request)

    def _steps_allowed(self, request: Request, k: int) -> int:
        """Steps of a k-step decode before ``request`` reaches max_tokens or max_model_len."""
        if k == 1:
            return 1
        return max(1, min(k, request.max_output_tokens - len(request.output_token_ids)))

    def _at_length_limit(self, request: Request) -> bool:
        return len(request.output_token_ids) >= request.max_output_tokens

    def commit(self, batch: SchedulerOutput) -> None:
        """Records that a step was launched: its tokens count as computed from now on."""
        steady = self.input_batch.steady
        if steady is not None:
            if batch is steady.output:
                steady.launched = True
            else:  # (another dispatch ran meanwhile: the next one is scheduled in full)
                self.input_batch.steady = None
        if batch.continues is not None:
            k = batch.num_steps
            for request in batch.continues.requests:
                request.num_computed_tokens += k
            return
        if self.num_prompt_logprobs:  # (the prompts this step completes leave the count)
            self.num_prompt_logprobs -= sum(
                self._prefilling_prompt_logprobs(item.request)
                and item.num_computed_after >= len(item.request.prompt_token_ids)
                for item in batch.scheduled)
        for item in batch.scheduled:
            item.request.num_computed_tokens = item.num_computed_after

    def preview(self) -> tuple[list[tuple[int, int]], list[int]]:
        """What the next step would run, without allocating anything (the optimizer's input):
        (prefill chunks as (new tokens, cached tokens), context lengths of the decodes)."""
        budget = self.config.max_num_batched_tokens
        prefill: list[tuple[int, int]] = []
        decode: list[int] = []
        for request in self.running:
            if self._at_length_limit(request):
                continue
            if _decoding(request):
                decode.append(request.num_computed_tokens)
                budget -= 1
        for request in self.running:
            if budget > 0 and not _decoding(request):
                n = min(request.num_tokens - request.num_computed_tokens, budget)
                prefill.append((n, request.num_computed_tokens))
                budget -= n
        seqs = len(self.running)
        for request in self.waiting:
            if budget <= 0 or seqs >= self.config.max_num_seqs:
                break
            n = min(request.num_tokens, budget)
            prefill.append((n, 0))
            budget -= n
            seqs += 1
        return prefill, decode

    def queue_to_pace(self, now: float) -> list[tuple[int, float]] | None:
        """The queue an SLO-aware budget keeps pace with (``slo_ttft_ms``; None without it):
        every prompt not yet computed, in scheduling order, as (tokens left, seconds waited at
        ``now``, a ``time.time()``), running requests still in their prompt first."""
        if self.config.slo_ttft_ms is None:
            return None
        # (more than one token left: the next step is not a decode, and no token is in flight)
        return ([(r.num_tokens - r.num_computed_tokens, now - r.metrics.arrival_time)
                 for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
                + [(r.num_tokens, now - r.metrics.arrival_time) for r in self.waiting])

    def requeue(self, request: Request) -> None:
        """Back to the front of the queue, to be recomputed (its step was lost)."""
        if request in self.running:
            self.running.remove(request)
        self.input_batch.remove(request)
        if request.prompt_logprobs is not None and not self._prefilling_prompt_logprobs(request):
            self.num_prompt_logprobs += 1  # (its prompt is computed again)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    @staticmethod
    def _prefilling_prompt_logprobs(request: Request) -> bool:
        """Counted in ``num_prompt_logprobs``: it asks for prompt logprobs and its prompt is
        not all computed."""
        return (request.prompt_logprobs is not None
                and request.num_computed_tokens < len(request.prompt_token_ids))

    def _preempt(self, request: Request) -> None:
        self.num_preemptions += 1
        self.requeue(request)

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request (stopped, length, or aborted) and frees its pages."""
        self.num_finished += 1
        self.input_batch.remove(request)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request.matcher is not None:
            self.num_constrained -= 1
        if self._prefilling_prompt_logprobs(request):
            self.num_prompt_logprobs -= 1
        self.blocks.free(request)
        if request.penalty_slot is not None:
            self.free_penalty_slots.append(request.penalty_slot)
            request.penalty_slot = None
