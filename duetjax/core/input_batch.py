"""The persistent input batch: one row per running request, kept across steps (plain Python and
numpy, no device arrays; in the spirit of vLLM v1's ``InputBatch``).

The scheduler gives a request a row when it admits it and frees the row when the request ends
or is preempted. The row holds what stays fixed while the request runs (its sampling settings
and penalty slot) and its block table, to which growing pages append only their new ids. A
step's inputs gather their rows from these arrays (``step_inputs.build_inputs``): an arrival or
an end writes one row and rebuilds nothing else.

Freed rows go on a free list rather than being condensed: a row stays where it is for its
request's whole run, so growing pages write straight into it and an end moves nothing; a step
takes its rows by index, one numpy gather per array whatever their order.

While every running request decodes and nobody joins or leaves, each dispatch is the previous
one again, k tokens further along: the batch then holds a ``SteadyDecode``, which the scheduler
continues with array arithmetic, the runner by advancing the previous dispatch's packed inputs
(``step_inputs.continue_packed``) and the output processor from the facts kept in it. A row
that joins or leaves ends it; the next full schedule starts another.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from .request import Request

if TYPE_CHECKING:
    from .scheduler import SchedulerOutput

SETTINGS = {
    # name: (dtype, a padding row's value); padding rows sample greedily, without penalties
    "temperature": (np.float32, 0), "top_k": (np.int32, 0), "top_p": (np.float32, 1),
    "min_p": (np.float32, 0), "seeds": (np.uint32, 0), "want_logprobs": (np.bool_, False),
    "penalty_slots": (np.int32, 0), "presence": (np.float32, 0), "frequency": (np.float32, 0),
    "repetition": (np.float32, 1), "biased": (np.bool_, False),
}
"""The per-row sampling settings, by the names of ``SamplingArrays`` / ``PenaltyArrays``."""


@dataclasses.dataclass(frozen=True)
class GatheredRows:
    """The persistent part of one step's inputs: its rows' arrays, padded to its bucket."""

    block_tables: np.ndarray
    """int32[num_seqs, max_pages_per_seq]."""
    settings: dict[str, np.ndarray]
    """``SETTINGS``' arrays, [num_seqs] each."""
    penalized: list[int]
    """The step's rows that have a penalty slot."""


class InputBatch:
    """The rows of the running requests (at most ``max_rows``), with a padding row at the end
    that a step's padding gathers."""

    def __init__(self, max_rows: int, max_pages_per_seq: int):
        self.pad_row = max_rows
        self.block_tables = np.zeros((max_rows + 1, max_pages_per_seq), np.int32)
        self.num_pages = np.zeros(max_rows + 1, np.int32)
        """Page ids written per row (the length of its request's block table)."""
        self.settings = {name: np.full(max_rows + 1, pad, dtype)
                         for name, (dtype, pad) in SETTINGS.items()}
        self.penalized = np.zeros(max_rows + 1, bool)
        self._row_of: dict[str, int] = {}
        self._free = list(range(max_rows - 1, -1, -1))  # (pop() takes the lowest row)
        self.steady: SteadyDecode | None = None
        """The steady decode over these rows, while there is one (``Scheduler``)."""

    @classmethod
    def of(cls, requests: list[Request], max_pages_per_seq: int) -> "InputBatch":
        """A batch holding ``requests`` alone, for inputs built outside the engine's loop."""
        batch = cls(len(requests), max_pages_per_seq)
        for request in requests:
            batch.add(request)
        return batch

    def __len__(self) -> int:
        return len(self._row_of)

    def row_of(self, request: Request) -> int | None:
        return self._row_of.get(request.request_id)

    def add(self, request: Request) -> None:
        """Gives an admitted request a row: its block table and settings. A setting that does
        not fit its array raises before the row is taken."""
        if not self._free:
            raise RuntimeError(f"no free row for {request}: more running requests than "
                               f"{self.pad_row} (max_num_seqs)")
        row = self._free[-1]  # (taken once everything is written)
        params, slot = request.params, request.penalty_slot
        s = self.settings
        s["temperature"][row], s["top_k"][row] = params.temperature, params.top_k
        s["top_p"][row], s["min_p"][row] = params.top_p, params.min_p
        s["seeds"][row], s["want_logprobs"][row] = request.seed, params.logprobs is not None
        if slot is None:  # (no penalties: as a padding row)
            for name in ("penalty_slots", "presence", "frequency", "repetition", "biased"):
                s[name][row] = SETTINGS[name][1]
        else:
            s["penalty_slots"][row], s["biased"][row] = slot, params.logit_bias is not None
            s["presence"][row], s["frequency"][row] = params.presence_penalty, params.frequency_penalty
            s["repetition"][row] = params.repetition_penalty
        self.penalized[row] = slot is not None
        self._free.pop()
        self._row_of[request.request_id] = row
        self.block_tables[row] = 0
        self.num_pages[row] = 0
        self.write_pages(request)
        self.steady = None

    def write_pages(self, request: Request) -> None:
        """Writes the page ids its block table gained since its row last saw it."""
        row = self._row_of[request.request_id]
        start, table = self.num_pages.item(row), request.block_table
        end = len(table)
        if end == start + 1:  # (a page at a time, as decodes grow: the cheapest write)
            self.block_tables[row, start] = table[start]
        else:
            self.block_tables[row, start:end] = table[start:]
        self.num_pages[row] = end

    def remove(self, request: Request) -> None:
        """Frees the row of a request that ended or was preempted (none: nothing to do)."""
        row = self._row_of.pop(request.request_id, None)
        if row is not None:
            self._free.append(row)
            self.steady = None

    def rows(self, requests: list[Request]) -> np.ndarray:
        """The rows of ``requests``, in order (each must have one)."""
        row_of = self._row_of
        return np.fromiter((row_of[r.request_id] for r in requests), np.intp, len(requests))

    def gather(self, rows: np.ndarray, num_seqs: int) -> GatheredRows:
        """The arrays of ``rows`` as a step's first rows, padding after them to ``num_seqs``."""
        index = np.full(num_seqs, self.pad_row, np.intp)
        index[:len(rows)] = rows
        return GatheredRows(self.block_tables[index],
                            {name: column[index] for name, column in self.settings.items()},
                            np.flatnonzero(self.penalized[rows]).tolist())


@dataclasses.dataclass(slots=True)
class SteadyDecode:
    """A steady decode over the batch's rows and what stays fixed for it, so that the host
    loop's per-step work costs about one operation per step, not one per request."""

    output: "SchedulerOutput"
    """The dispatch it continues (the last one scheduled)."""
    decode_steps: int
    """The ``decode_steps`` it was scheduled with."""
    rows: np.ndarray
    """The input batch's row of each of the dispatch's rows."""
    headroom: np.ndarray
    """int64[n]: tokens each row may still generate before the next dispatch."""
    target: np.ndarray
    """int64[n]: tokens with KV once the next dispatch has run."""
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
        at launch, and by nothing else while the decode stays steady)."""
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
