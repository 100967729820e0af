"""Applying a finished step's sampled tokens to its requests: stop ids, length limits and stop
strings, detokenizing, logprobs, prompt logprobs, grammars, finishing requests (through the
scheduler) and building their ``RequestOutput``s. A request whose processing raises fails
alone (``fail``).

The steady decode's path (``_process_continued``) runs on every step of every decode batch:
its cost per step is measured (``tools/profile_host.py``), so its loops stay lean.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..outputs import CompletionOutput, RequestOutput
from .model_runner import InFlight
from .request import PENDING, Request, RequestStatus
from .scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)

FINISHED = RequestStatus.FINISHED


def _logprobs_of(sampled, step: int, row: int, token: int, top_n: int) -> dict[int, float]:
    """{token id: logprob} for the sampled token and the top-N alternatives of one row."""
    entry = {int(t): float(lp) for t, lp in zip(sampled.top_ids[step, row, :top_n],
                                                 sampled.top_logprobs[step, row, :top_n])}
    entry[token] = float(sampled.logprobs[step, row])
    return entry


class OutputProcessor:
    """Turns the results of launched steps, local or a worker's (any ``InFlight``), into the
    requests' outputs."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.requests: dict[str, Request] = {}
        """The requests not finished yet, or finished with an output still to return, by id."""
        self.finished_only = False
        """Return outputs of finished requests only (``Engine.generate`` needs no others)."""
        self.failed: list[RequestOutput] = []
        """Outputs of requests failed since ``take_failed`` (``fail``)."""

    def add(self, request: Request) -> None:
        self.scheduler.add(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> None:
        """Ends a request now and frees its pages (unknown or finished ids are ignored)."""
        request = self.requests.pop(request_id, None)
        if request is not None and not request.is_finished:
            request.output_token_ids = request.resolved_output_ids
            self.scheduler.finish(request, "abort")

    def take_failed(self) -> list[RequestOutput]:
        failed, self.failed = self.failed, []
        return failed

    def reserve(self, batch: SchedulerOutput, launched: InFlight) -> None:
        """Reserves output slots (PENDING) for the tokens a launched dispatch samples."""
        launched.finished_at_launch = self.scheduler.num_finished
        if batch.continues is not None:  # the previous dispatch again: only what changes
            k = batch.num_steps
            launched.output_index = batch.continues.reserve(k)
            if k == 1:
                for request in batch.continues.requests:
                    request.output_token_ids.append(PENDING)
            else:
                pad = [PENDING] * k
                for request in batch.continues.requests:
                    request.output_token_ids += pad
            return
        now = time.time()
        output_index: list[int | None] = [None] * len(batch.scheduled)
        for row, item in enumerate(batch.scheduled):
            request = item.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            request.penalty_slot_fresh = False  # this step zeroes a fresh slot
            outputs = request.output_token_ids
            first = len(outputs)
            # (``item.completes_sequence``, inlined) the step samples its next token(s)
            if request.num_computed_tokens + item.num_new_tokens == len(request.prompt_token_ids) + first:
                num_steps = item.num_steps
                outputs += [PENDING] * num_steps
                output_index[row] = first
        launched.output_index = output_index

    def process(self, step: InFlight) -> tuple[list[RequestOutput], float]:
        """Reads a launched step's tokens (waiting for them) and applies them: (the outputs of
        the requests they reached, seconds waited)."""
        before = time.perf_counter()
        sampled = step.fetch()
        if step.prompt_logprobs is not None:  # (before the outputs that carry them)
            step.prompt_logprobs.record()
        waited = time.perf_counter() - before
        now = time.time()
        if step.batch.continues is not None:
            return self._process_continued(step, sampled, now), waited
        rows = sampled.token_ids.T.tolist()  # one conversion per step, not one per token
        outputs = []
        output_index = step.output_index
        every_output = not self.finished_only
        blocks = self.scheduler.blocks
        page_size = blocks.page_size if blocks.enable_prefix_caching else 1 << 62
        for row, item in enumerate(step.batch.scheduled):
            request = item.request
            if request.status is FINISHED:
                continue  # stopped or aborted meanwhile: this row is overrun
            first = output_index[row]
            known = request.num_computed_tokens  # tokens with KV whose ids the host has
            if first is not None:  # (a prefill chunk's sampled token is not the next one yet)
                tokens = rows[row][:item.num_steps]
                try:
                    self._apply_tokens(request, first, tokens, sampled, row, now)
                except Exception as error:
                    self.fail(request, error)
                    continue
                if every_output or request.status is FINISHED:
                    outputs.append(self.output(request))
                # (the next dispatch, already launched, computes tokens still PENDING here)
                known = min(known, len(request.prompt_token_ids) + first + len(tokens))
            if request.status is FINISHED:
                self.requests.pop(request.request_id, None)
            elif known // page_size > request.num_cached_pages:
                blocks.cache_full_pages(request)  # (a page filled: name it for prefix hits)
        return outputs, waited

    def _process_continued(self, step: InFlight, sampled, now: float) -> list[RequestOutput]:
        """``process`` for a batch that ``continues`` a steady decode: every row sampled
        k tokens from its ``output_index`` on. Which rows need more than storing their tokens
        (a stop id, the token limit, text or logprobs, a page to name) is known from a few
        array operations and the ``SteadyDecode``; those rows take ``_apply_tokens``."""
        rows = step.batch.continues
        requests, k = rows.requests, step.batch.num_steps
        tokens = sampled.token_ids  # [k, n]
        firsts = step.output_index
        special = set(rows.special_rows).union(step.batch.rows_at_limit)
        if len(rows.stop_ids):
            special.update(np.flatnonzero((tokens[..., None] == rows.stop_ids).any(axis=(0, 2))).tolist())
        ended = set()
        if step.finished_at_launch != self.scheduler.num_finished:  # some rows may have ended
            ended = {row for row, r in enumerate(requests) if r.status is FINISHED}
            special -= ended
        columns = tokens.T.tolist() if special or k > 1 else None
        for row in sorted(special):  # (rare) the full treatment
            try:
                self._apply_tokens(requests[row], firsts[row], columns[row], sampled, row, now)
            except Exception as error:
                self.fail(requests[row], error)
                ended.add(row)
        special -= ended
        if special or ended:
            left = [row for row in range(len(requests)) if row not in special and row not in ended]
            triples = [(requests[row], firsts[row], columns[row]) for row in left]
        else:
            triples = zip(requests, firsts, tokens[0].tolist() if k == 1 else columns)
        if k == 1 and not (special or ended):  # (the common case, at a third less per row)
            for request, first, token in triples:
                request.output_token_ids[first] = token
                request.metrics.token_times.append(now)
        else:
            times = [now] * k
            for request, first, column in triples:
                request.output_token_ids[first:first + k] = column
                request.metrics.token_times += times
        blocks = self.scheduler.blocks
        if blocks.enable_prefix_caching:
            for row in rows.rows_filling_a_page(firsts[0], k):
                if requests[row].status is not FINISHED:
                    blocks.cache_full_pages(requests[row])
        outputs = []
        for row in (sorted(special) if self.finished_only else range(len(requests))):
            request = requests[row]
            if row in ended:
                continue  # it ended before this step: its row is overrun
            if request.status is FINISHED:
                self.requests.pop(request.request_id, None)
            elif self.finished_only:
                continue
            outputs.append(self.output(request))
        return outputs

    def _apply_tokens(self, request: Request, first: int, tokens: list[int], sampled,
                      row: int, now: float) -> None:
        """Stores the tokens one dispatch sampled for ``request`` (output indices ``first``
        on) and ends it at the first that meets a stop condition: the rest are overrun."""
        # (``_token_stop``'s common outcome inline: no stop id among the tokens, no limit)
        if (request.max_output_tokens - first > len(tokens)
                and (not request.stop_ids or request.stop_ids.isdisjoint(tokens))):
            stop = None
        else:
            stop = self._token_stop(request, first, tokens)
        if request.detokenizer is not None:  # the text, and stop strings, go token by token
            upto = len(tokens) if stop is None else stop[0] + 1
            stop = self._detokenize(request, tokens[:upto]) or stop
        if stop is not None:
            tokens = tokens[:stop[0] + 1]
        if request.matcher is not None and stop is None:
            stop = self._grammar_stop(request, tokens)
        request.output_token_ids[first:first + len(tokens)] = tokens
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.token_times += [now] * len(tokens)
        top_n = request.params.logprobs
        if top_n is not None:
            request.logprobs += [_logprobs_of(sampled, j, row, token, top_n)
                                 for j, token in enumerate(tokens)]
        if stop is not None:
            self._finish(request, first + stop[0], stop[1], stop[2])

    def _token_stop(self, request: Request, first: int,
                    tokens: list[int]) -> tuple[int, str, int | None] | None:
        """(position in ``tokens``, finish reason, stop reason) of the first token, placed at
        output index ``first`` on, that ends the request by its id or by a length limit."""
        length_at = max(request.max_output_tokens - first, 1) - 1  # (max_tokens or max_model_len)
        if request.stop_ids and not request.stop_ids.isdisjoint(tokens):
            params = request.params
            for j in range(max(params.min_tokens - first - 1, 0), min(len(tokens), length_at + 1)):
                token = tokens[j]
                if token in request.stop_ids:
                    return j, "stop", token if token in params.stop_token_ids else None
        return (length_at, "length", None) if length_at < len(tokens) else None

    def _detokenize(self, request: Request, tokens: list[int]) -> tuple[int, str, str] | None:
        """Appends the text of ``tokens``; returns (position, 'stop', stop string) when a stop
        string completes (the tokens after it are overrun)."""
        for j, token in enumerate(tokens):
            delta = request.detokenizer.add(token)
            request.text += delta
            found = self._find_stop_string(request, len(delta))
            if found is not None:
                return j, "stop", found
        return None

    def _find_stop_string(self, request: Request, delta_len: int) -> str | None:
        for stop in request.params.stop:
            start = max(0, len(request.text) - delta_len - len(stop) + 1)
            at = request.text.find(stop, start)
            if at >= 0:
                request.text = request.text[:at]
                return stop
        return None

    @staticmethod
    def _grammar_stop(request: Request, tokens: list[int]) -> tuple[int, str, None] | None:
        """Advances a constrained request's grammar over its new tokens (one per dispatch);
        (position, 'stop', None) once the grammar is complete. A token the grammar refuses
        (the mask should rule that out) ends it too, rather than let it go on unconstrained."""
        matcher = request.matcher
        for j, token in enumerate(tokens):
            if not matcher.consume_token(token) or matcher.is_stopped():
                return j, "stop", None
        return None

    def _finish(self, request: Request, last: int, reason: str, stop_reason) -> None:
        """Ends ``request`` at output index ``last``; tokens launched past it are dropped."""
        del request.output_token_ids[last + 1:]
        if request.detokenizer is not None and not isinstance(stop_reason, str):
            request.text += request.detokenizer.flush()  # a character held back at the end
        request.stop_reason = stop_reason
        request.metrics.finished_time = time.time()
        self.scheduler.finish(request, reason)

    def fail(self, request: Request, error: Exception) -> None:
        """Ends ``request`` alone after ``error`` in the host work done for it (detokenizing,
        stop checks, its grammar, its slot tables or step inputs): finish reason "error", the
        message in its output's ``error``, its pages freed. Every other request goes on."""
        log.error("request %s failed: %r", request.request_id, error, exc_info=error)
        request.error = f"{type(error).__name__}: {error}"
        request.output_token_ids = request.resolved_output_ids
        request.metrics.finished_time = time.time()
        if request.is_finished:  # (it had just ended: nothing to free twice)
            request.finish_reason = "error"
        else:
            self.scheduler.finish(request, "error")
        self.requests.pop(request.request_id, None)
        self.failed.append(self.output(request))

    def output(self, request: Request) -> RequestOutput:
        # Positional arguments (field order of outputs.py): keywords cost twice as much, and
        # streaming builds one output per running request on every step.
        completion = CompletionOutput(0, request.text, request.resolved_output_ids,
                                      request.finish_reason, request.stop_reason,
                                      list(request.logprobs) if request.params.logprobs is not None
                                      else None)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             [completion], request.status is RequestStatus.FINISHED,
                             request.metrics, request.prompt_logprobs, request.error)
