"""What ``Engine.generate`` returns, vLLM-shaped."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    """Position among the request's outputs."""
    text: str
    """Detokenized text (stop strings excluded)."""
    token_ids: list[int]
    """Generated token ids."""
    finish_reason: str | None
    """'stop' (EOS, stop string or stop token), 'length' (max_tokens or context), 'abort',
    'error' (the engine failed this request alone: ``RequestOutput.error`` says why), or None
    while running."""
    stop_reason: int | str | None = None
    """The stop string or token id that ended generation, if any."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token id: log-probability} for the sampled token and the top-N
    alternatives (when SamplingParams.logprobs is set)."""


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished_time: float | None = None


@dataclasses.dataclass
class RequestOutput:
    """The result of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token: None for the first, then {token id: log-probability} for the prompt
    token given the tokens before it and the top-N alternatives there (when
    SamplingParams.prompt_logprobs is set)."""
    error: str | None = None
    """Why the engine failed this request (finish reason 'error'); None otherwise."""
