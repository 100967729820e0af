"""Prompt logprobs (``SamplingParams.prompt_logprobs``): for every prompt token after the
first, its log-probability given the tokens before it and the most likely tokens there.

A step's executable samples from the logits of one token per sequence only; it also returns
the hidden states of all its tokens, and a step holding prompt positions of such a request
runs a second executable over them (``compute``, one per token bucket, compiled at start-up):
the LM head and ``with_logprobs`` at every token of the step. Steps without such a request
never launch it. On the host, ``chunks_of`` finds the positions a step computes,
``targets_of`` names the prompt token each one predicts, and ``PromptLogprobsInFlight.record``
appends the entries to the requests once the step is read.

The position of the last prompt token predicts the first generated token, not a prompt
token, so a chunk that holds only it needs nothing here (k-step decodes never do).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from .request import Request
from .sampler import SampledTokens, with_logprobs
from .scheduler import SchedulerOutput

BLOCK_TOKENS = 128
"""Tokens whose logits ``compute`` holds at once: the float32 [tokens, vocab] logits of a
whole 8k-token step would take 4 GiB at a 128k vocabulary, a block of 128 takes 64 MiB."""


@dataclasses.dataclass(frozen=True)
class PromptChunk:
    """The prompt positions of one request in a step whose next token is a prompt token."""

    request: Request
    start: int
    """Index of the first of them among the step's tokens."""
    position: int
    """Its position in the prompt (the entry it gives is for prompt token ``position + 1``)."""
    count: int


def chunks_of(batch: SchedulerOutput) -> list[PromptChunk]:
    """The ``PromptChunk`` of each request in ``batch`` (before it is committed) that asked for
    prompt logprobs and has positions there that predict a prompt token."""
    chunks, start = [], 0
    for item in batch.scheduled:
        request = item.request
        if request.params.prompt_logprobs is not None:
            position = request.num_computed_tokens
            count = min(position + item.num_new_tokens, len(request.prompt_token_ids) - 1) - position
            if count > 0:
                chunks.append(PromptChunk(request, start, position, count))
        start += item.num_new_tokens
    return chunks


def targets_of(chunks: list[PromptChunk], num_tokens: int) -> np.ndarray:
    """int32[num_tokens]: the prompt token each chunk position predicts (0 elsewhere)."""
    targets = np.zeros(num_tokens, np.int32)
    for c in chunks:
        first = c.position + 1
        targets[c.start:c.start + c.count] = c.request.prompt_token_ids[first:first + c.count]
    return targets


def compute(logits_of: Callable[[jax.Array], jax.Array], hidden: jax.Array,
            targets: jax.Array) -> SampledTokens:
    """``with_logprobs`` of ``targets`` at every row of ``hidden`` ([tokens, hidden size]),
    ``logits_of`` giving a block of rows' logits, in blocks of at most ``BLOCK_TOKENS``."""
    n = hidden.shape[0]
    block = math.gcd(n, BLOCK_TOKENS)
    blocks = (hidden.reshape(n // block, block, hidden.shape[1]), targets.reshape(n // block, block))
    out = jax.lax.map(lambda b: with_logprobs(logits_of(b[0]), b[1]), blocks)
    return jax.tree_util.tree_map(lambda a: a.reshape(n, *a.shape[2:]), out)


@dataclasses.dataclass
class PromptLogprobsInFlight:
    """A launched ``compute`` and the chunks it serves."""

    chunks: list[PromptChunk]
    results: SampledTokens
    """Device arrays (futures), one row per token of the step."""

    def record(self) -> None:
        """Waits for the results and appends each chunk's entries to its request's
        ``prompt_logprobs``. Entries a request already has are skipped: a preempted request
        recomputes its prompt."""
        results = jax.tree_util.tree_map(np.asarray, self.results)
        for c in self.chunks:
            entries, top_n = c.request.prompt_logprobs, c.request.params.prompt_logprobs
            skip = len(entries) - (c.position + 1)
            if skip >= c.count:
                continue
            if skip < 0:
                raise RuntimeError(f"{c.request} misses prompt logprobs before position "
                                   f"{c.position}: an engine bug")
            rows = slice(c.start + skip, c.start + c.count)
            for token, logprob, top_ids, top_logprobs in zip(
                    results.token_ids[rows].tolist(), results.logprobs[rows].tolist(),
                    results.top_ids[rows, :top_n].tolist(),
                    results.top_logprobs[rows, :top_n].tolist()):
                entry = dict(zip(top_ids, top_logprobs))
                entry[token] = logprob
                entries.append(entry)
