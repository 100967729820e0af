"""The persistent batch of a steady decode (plain Python and numpy, no device arrays).

When every running request decodes in a dispatch and nobody waits, the next dispatch is the
same rows again, each one token (or k) further along. ``Scheduler.schedule`` then forms a
``PersistentBatch`` and continues it with array arithmetic instead of a pass over its requests
(``Scheduler._continue``); every continuation carries it (``SchedulerOutput.continues``): the
runner derives its inputs from the previous dispatch's (``step_inputs.continue_packed``), and
the output processor reserves and applies its tokens from the facts kept here. Any change to
its rows (an arrival, an end, a preemption, a failed launch) drops it; the next full schedule
forms a new one.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from .request import Request

if TYPE_CHECKING:
    from .scheduler import SchedulerOutput


@dataclasses.dataclass(slots=True)
class PersistentBatch:
    """The rows of a steady decode and what stays fixed for them, so that the host loop's
    per-step work costs about one operation per step, not one per request."""

    output: "SchedulerOutput"
    """The dispatch it continues (the last one scheduled)."""
    decode_steps: int
    """The ``decode_steps`` it was scheduled with."""
    headroom: np.ndarray
    """int64[n]: tokens each row may still generate before the next dispatch."""
    target: np.ndarray
    """int64[n]: tokens with KV once the next dispatch has run."""
    capacity: np.ndarray
    """int64[n]: tokens its pages hold."""
    launched: bool = False
    """``output`` was launched (``Scheduler.commit``)."""
    requests: list[Request] = dataclasses.field(default_factory=list)
    """The requests in row order (the facts below are gathered at the first continuation)."""
    special_rows: list[int] = dataclasses.field(default_factory=list)
    """Rows whose requests are not ``plain`` (text or logprobs to produce)."""
    stop_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    """int64[m]: every row's stop ids together (a row that samples one is checked exactly)."""
    first_output: int = 0
    """Row 0's output index of the first token the first continuation samples."""
    rows_by_phase: list[list[int]] = dataclasses.field(default_factory=list)
    """Rows by (prompt + outputs) % page_size at the first continuation: which rows' known
    tokens fill a page in a later continuation follows from it (``rows_filling_a_page``)."""
    next_output: list[int] = dataclasses.field(default_factory=list)
    """Per row, the output index of the first token the next launched continuation samples
    (``reserve``)."""

    @property
    def gathered(self) -> bool:
        return bool(self.requests)

    def gather(self, page_size: int) -> None:
        """Gathers the rows' fixed facts (at the first continuation)."""
        requests = [item.request for item in self.output.scheduled]
        stop_ids = frozenset().union(*(r.stop_ids for r in requests))
        by_phase: list[list[int]] = [[] for _ in range(page_size)]
        for row, r in enumerate(requests):
            by_phase[(len(r.prompt_token_ids) + len(r.output_token_ids)) % page_size].append(row)
        self.requests = requests
        self.special_rows = [row for row, r in enumerate(requests) if not r.plain]
        self.stop_ids = np.fromiter(stop_ids, np.int64, len(stop_ids))
        self.first_output = len(requests[0].output_token_ids)
        self.rows_by_phase = by_phase
        self.next_output = [len(r.output_token_ids) for r in requests]

    def reserve(self, num_steps: int) -> list[int]:
        """The rows' output indices of the first token a launched continuation samples; the
        next one's are ``num_steps`` further (each output grows by that many PENDING tokens
        at launch, and by nothing else while the batch persists)."""
        firsts = self.next_output
        self.next_output = [first + num_steps for first in firsts]
        return firsts

    def rows_filling_a_page(self, first_output: int, num_steps: int) -> list[int]:
        """Rows whose known tokens fill a page once the dispatch that samples ``num_steps``
        tokens from row 0's output index ``first_output`` on is read (the page then gets its
        prefix-cache name)."""
        page_size = len(self.rows_by_phase)
        if num_steps > page_size:
            raise ValueError("more steps per dispatch than tokens per page")
        shift = first_output - self.first_output  # (every row moved on as far as row 0)
        return [row for t in range(num_steps)
                for row in self.rows_by_phase[(page_size - num_steps + t - shift) % page_size]]
