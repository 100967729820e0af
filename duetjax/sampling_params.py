"""Per-request sampling settings, vLLM-shaped."""
from __future__ import annotations

import dataclasses
import functools
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
INT32_MAX = 2**31 - 1
"""The most top_k, max_tokens, min_tokens and a token id may be: the device holds them as
int32."""
FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a larger temperature would reach the device as infinity."""
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (vLLM's rule): dividing logits by a smaller one could
overflow float32."""
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""repetition_penalty divides or multiplies logits by at most 100, so they stay finite."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Values are checked on construction."""

    temperature: float = 1.0
    """0 means greedy (as does anything below GREEDY_TEMPERATURE); otherwise logits are
    divided by it before sampling. At most FLOAT32_MAX."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p;
    in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) disables. Up to INT32_MAX; a k at least
    the vocabulary's size keeps every token (as vLLM does)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; 0 disables;
    in [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's; -2 to 2)."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the generated tokens (OpenAI's; -2 to 2)."""
    repetition_penalty: float = 1.0
    """For every token in the prompt or generated so far, a positive logit is divided by it and
    a negative one multiplied (vLLM's and Hugging Face's; in REPETITION_PENALTY_RANGE, 1
    disables, > 1 discourages repeats)."""
    logit_bias: Mapping[int, float] | None = dataclasses.field(default=None, hash=False)
    """{token id: bias} added to those tokens' logits before sampling (OpenAI's; biases in
    [-100, 100], at most MAX_LOGIT_BIAS entries; -100 in effect bans a token, +100 forces it).
    The engine checks the ids against the vocabulary when the request is added."""
    max_tokens: int = 16
    """Most tokens to generate, in [1, INT32_MAX] (the context window ends a request sooner)."""
    min_tokens: int = 0
    """EOS and stop token ids are ignored until this many tokens exist (at most max_tokens)."""
    stop: Sequence[str] = ()
    """Strings that end generation; the returned text stops before them."""
    stop_token_ids: Sequence[int] = ()
    """Extra token ids that end generation (besides the model's EOS ids). The engine checks
    them against the vocabulary when the request is added."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks, tests)."""
    seed: int | None = None
    """Per-request seed in [0, 2**32): the same seed gives the same tokens whatever the
    batch."""
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
        set_field = functools.partial(object.__setattr__, self)
        set_field("temperature", _number("temperature", self.temperature, 0.0, FLOAT32_MAX))
        if self.temperature < GREEDY_TEMPERATURE:
            set_field("temperature", 0.0)
        set_field("top_p", _number("top_p", self.top_p, 0.0, 1.0, above_low=True))
        top_k = _integer("top_k", self.top_k, -1, INT32_MAX, " (0 or -1 disables it)")
        set_field("top_k", max(top_k, 0))
        set_field("min_p", _number("min_p", self.min_p, 0.0, 1.0))
        for name in ("presence_penalty", "frequency_penalty"):
            set_field(name, _number(name, getattr(self, name), -2.0, 2.0))
        set_field("repetition_penalty", _number("repetition_penalty", self.repetition_penalty,
                                                *REPETITION_PENALTY_RANGE, " (1 disables it)"))
        set_field("logit_bias", _checked_logit_bias(self.logit_bias))
        set_field("max_tokens", _integer("max_tokens", self.max_tokens, 1, INT32_MAX))
        set_field("min_tokens", _integer("min_tokens", self.min_tokens, 0, INT32_MAX))
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got "
                             f"{self.min_tokens}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got "
                             f"{self.stop!r}")
        set_field("stop", stop)
        set_field("stop_token_ids", tuple(_integer("stop_token_ids", t, 0, INT32_MAX)
                                          for t in self.stop_token_ids or ()))
        if self.seed is not None:
            set_field("seed", _integer("seed", self.seed, 0, 2**32 - 1))
        if self.logprobs is not None:
            set_field("logprobs", _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS))
        if self.prompt_logprobs is not None:
            set_field("prompt_logprobs", _integer("prompt_logprobs", self.prompt_logprobs, 0,
                                                  MAX_LOGPROBS))
        if isinstance(self.structured_outputs, Mapping):
            set_field("structured_outputs", StructuredOutputsParams(**self.structured_outputs))
        elif not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of "
                             f"its fields, got {type(self.structured_outputs).__name__}")

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


def _integer(name: str, value: Any, low: int, high: int, note: str = "") -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{note}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{note}, got {value}")
    return int(value)


def _number(name: str, value: Any, low: float, high: float, note: str = "",
            above_low: bool = False) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite number in
    [low, high] ((low, high] with ``above_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{note}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{note}, got {value!r}")
    if not (low < value if above_low else low <= value) or value > high:
        raise ValueError(f"{name} must be in {'(' if above_low else '['}{low:g}, {high:g}]{note}, "
                         f"got {value!r}")
    return float(value)


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
        if (isinstance(token, bool) or not isinstance(token, numbers.Integral)
                or not 0 <= token <= INT32_MAX):
            raise ValueError(f"logit_bias keys must be token ids (integers in [0, {INT32_MAX}]), "
                             f"got {token!r}")
        if (isinstance(bias, bool) or not isinstance(bias, numbers.Real)
                or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
            raise ValueError(f"logit_bias values must be numbers in [-{LOGIT_BIAS_RANGE:g}, "
                             f"{LOGIT_BIAS_RANGE:g}], got {bias!r} for token {token}")
        checked[int(token)] = float(bias)
    return checked
