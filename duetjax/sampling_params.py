"""Per-request sampling settings, vLLM-shaped."""
from __future__ import annotations

import dataclasses
from typing import Sequence

MAX_LOGPROBS = 20
"""Most alternatives per token that ``logprobs`` may ask for (OpenAI's top_logprobs limit)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Values are checked on construction."""

    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; 0 disables."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's; -2 to 2)."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the generated tokens (OpenAI's; -2 to 2)."""
    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """EOS and stop token ids are ignored until this many tokens exist."""
    stop: Sequence[str] = ()
    """Strings that end generation; the returned text stops before them."""
    stop_token_ids: Sequence[int] = ()
    """Extra token ids that end generation (besides the model's EOS ids)."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks, tests)."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever the batch."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""
    logprobs: int | None = None
    """Return the log-probability of each generated token and of the N most likely
    alternatives (0: the generated token only; None: no log-probabilities)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (or -1 to disable), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (self.seed is None or 0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Needs counts of its generated tokens on the device."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_full_sampler(self) -> bool:
        """Uses a feature outside the sampling built into every step (greedy, temperature,
        min-p): top-k, top-p, penalties or log-probabilities. Steps holding such a request run
        the full sampler and/or the log-probability executable after the step, and decode one
        step per dispatch."""
        return (self.top_k > 0 or self.top_p < 1.0 or self.penalized
                or self.logprobs is not None)
