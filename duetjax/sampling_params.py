"""Per-request sampling settings, vLLM-shaped."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

from .structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
"""Most alternatives per token that ``logprobs`` may ask for (OpenAI's top_logprobs limit)."""
MAX_LOGIT_BIAS = 300
"""Most entries of ``logit_bias`` (OpenAI's limit): the device keeps this many per request."""
LOGIT_BIAS_RANGE = 100.0
"""A bias is in [-LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE] (OpenAI's range)."""


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
    repetition_penalty: float = 1.0
    """For every token in the prompt or generated so far, a positive logit is divided by it and
    a negative one multiplied (vLLM's and Hugging Face's; > 0, 1 disables, > 1 discourages
    repeats)."""
    logit_bias: Mapping[int, float] | None = dataclasses.field(default=None, hash=False)
    """{token id: bias} added to those tokens' logits before sampling (OpenAI's; biases in
    [-100, 100], at most MAX_LOGIT_BIAS entries; -100 in effect bans a token, +100 forces it).
    The engine checks the ids against the vocabulary when the request is added."""
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
    prompt_logprobs: int | None = None
    """Return, for every prompt token after the first, its log-probability given the tokens
    before it and the N most likely alternatives there (0: the prompt token only; None: none).
    Such a request computes its whole prompt: it takes no prefix-cache hits."""
    structured_outputs: StructuredOutputsParams | Mapping[str, Any] | None = None
    """Constrain the output to a JSON schema, a regex, a list of choices or a grammar
    (``StructuredOutputsParams``, or a dict of its fields). The request ends when the
    constraint is complete. In duet mode, iterations run aggregated while such a request waits
    or runs."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if isinstance(self.structured_outputs, Mapping):
            object.__setattr__(self, "structured_outputs",
                               StructuredOutputsParams(**self.structured_outputs))
        elif not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of "
                             f"its fields, got {type(self.structured_outputs).__name__}")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (or -1 to disable), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be a finite number > 0 (1 disables it), got "
             f"{self.repetition_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
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
        """Adjusts logits on the device (penalties or logit_bias), so it holds a penalty slot:
        a row of generated-token counts and of ``fills_slot``'s tables."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.fills_slot)

    @property
    def fills_slot(self) -> bool:
        """Uses repetition_penalty or logit_bias: its prompt's tokens and its biases are
        written into its penalty slot once, when it gets the slot."""
        return self.repetition_penalty != 1.0 or self.logit_bias is not None

    @property
    def needs_full_sampler(self) -> bool:
        """Uses a feature outside the sampling built into every step (greedy, temperature,
        min-p): top-k, top-p, penalties, logit_bias, log-probabilities or structured outputs.
        Steps holding such a request run the full sampler and/or the log-probability
        executable after the step, and decode one step per dispatch."""
        return (self.top_k > 0 or self.top_p < 1.0 or self.penalized
                or self.logprobs is not None or self.structured_outputs is not None)


def _checked_logit_bias(logit_bias: Mapping[int, float] | None) -> dict[int, float] | None:
    """A copy of ``logit_bias`` with int keys and float values (None when empty); ValueError
    naming the first bad entry."""
    if not logit_bias:
        return None
    if not isinstance(logit_bias, Mapping):
        raise ValueError(f"logit_bias must map token ids to biases, got {type(logit_bias).__name__}")
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS} "
                         "are allowed")
    checked = {}
    for token, bias in logit_bias.items():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if (isinstance(bias, bool) or not isinstance(bias, numbers.Real)
                or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
            raise ValueError(f"logit_bias values must be numbers in [-{LOGIT_BIAS_RANGE:g}, "
                             f"{LOGIT_BIAS_RANGE:g}], got {bias!r} for token {token}")
        checked[int(token)] = float(bias)
    return checked
