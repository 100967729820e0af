"""Host-side state of one request (no device arrays)."""
from __future__ import annotations

import enum
import time

from ..outputs import RequestMetrics
from ..sampling_params import SamplingParams


PENDING = -1
"""Placeholder for a token sampled by a step that is still running on the device."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A prompt being served. Its tokens are ``prompt_token_ids + output_token_ids``; the
    first ``num_computed_tokens`` of them have KV in the pool (vLLM v1's bookkeeping, which
    makes chunked prefill, decode and recompute after preemption one mechanism)."""

    # Slots: the host loop reads a few of these per request on every step.
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "needs_full_sampler",
                 "max_output_tokens", "seed", "output_token_ids",
                 "num_computed_tokens", "block_table", "page_hashes", "num_cached_pages",
                 "penalty_slot", "penalty_slot_fresh", "status", "finish_reason", "stop_reason",
                 "text", "logprobs", "prompt_logprobs", "detokenizer", "stop_ids", "plain", "matcher",
                 "metrics", "error")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, prompt: str | None = None, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.needs_full_sampler = params.needs_full_sampler  # (asked on every step)
        # Most tokens it may generate: max_tokens, fewer where max_model_len ends it sooner
        # (``Scheduler.add`` knows that length).
        self.max_output_tokens = params.max_tokens
        self.seed = seed
        self.output_token_ids: list[int] = []  # PENDING where a token is still on the device
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.page_hashes: list[bytes] = []  # prefix-cache names of its full pages, in order
        self.num_cached_pages = 0  # leading pages already registered in the prefix cache
        self.penalty_slot: int | None = None  # row of the device's token counts (penalties)
        self.penalty_slot_fresh = False  # the row still holds a previous request's counts
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.logprobs: list[dict[int, float]] = []
        # Per prompt token: None for the first, then {token id: logprob} as steps compute them
        # (None when not asked for).
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            None if params.prompt_logprobs is None else [None])
        self.detokenizer = None  # set by the engine when the model has a tokenizer
        self.stop_ids: frozenset[int] = frozenset()  # ids that end it (set by the engine)
        # No text and no logprobs to produce: its tokens take the engine's short path.
        self.plain = False
        # Structured outputs: its grammar's state (``llguidance.LLMatcher``) after the tokens
        # the host has seen; it samples only when none is on the device (``Scheduler``).
        self.matcher = None
        self.metrics = RequestMetrics(
            arrival_time=time.time() if arrival_time is None else arrival_time)
        self.error: str | None = None  # why the engine failed it (finish reason "error")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_resolved_outputs(self) -> int:
        """Generated tokens the host has seen (the ones still on the device come last)."""
        ids = self.output_token_ids
        end = len(ids)
        while end and ids[end - 1] == PENDING:
            end -= 1
        return end

    @property
    def resolved_output_ids(self) -> list[int]:
        """Generated tokens the host has seen (without the ones still on the device)."""
        return self.output_token_ids[:self.num_resolved_outputs]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without concatenating the whole sequence."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
