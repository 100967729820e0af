"""Online correction of the roofline's predictions from the iterations the engine measures.

The calibrated roofline alone underestimated real Llama-3-8B split iterations on an H200 by
about a third (docs/design.md, "Measured facts"): launch gaps, skinny GEMMs and the sampler are
not in its rates. The optimizer decides on those predictions (split when the aggregated step
misses the SLO; which pair; k), so a steady bias means steady wrong decisions. ``Correction`` keeps
one measured/predicted ratio per kind of work, a geometric moving average of what the engine
observed, and ``CorrectedRoofline`` scales the roofline's answers by it.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

KINDS = ("aggregated", "prefill", "decode")
"""A mixed step on the whole GPU; a prefill-worker step; one decode step on a decode worker."""

Key = tuple
"""(kind, *details): ("prefill", s_p, size bucket) is a finer key than ("prefill", s_p), which
is finer than ("prefill",)."""
RECENT_ERRORS = 1000
"""Observations of each kind whose prediction errors are kept (``Correction.recent_errors``)."""


@dataclasses.dataclass
class Correction:
    """measured / predicted, learned online per kind of work and, finer, per detail of it
    (a mixed step's bucket; a worker's SM share; a chunk's size; the steps per decode
    dispatch).

    A worker's error depends on its share and on the size of its work (a fixed cost per
    dispatch weighs most on small ones), and a single ratio per kind would carry what it
    learned on one pair over to the other. Keyed ratios, each starting from its parent's, fit
    those (docs/design.md, "The online correction")."""

    weight: float = 0.3
    """Weight of each new observation in the (log-space) moving average (a key's first few
    observations weigh 1/(n+1), more: a new key learns fast)."""
    max_step: float = 1.3
    """An observation moves a ratio toward at most this factor of it: one stall (a 499 ms step
    among 12 ms ones, on an H200 under MPS) must not inflate the next predictions for many
    iterations."""
    bounds: tuple[float, float] = (0.25, 8.0)
    """Ratios stay within these."""
    min_observations: int = 2
    """A key's own ratio is used once it has this many observations (its parent's before)."""
    ratio: dict[Key, float] = dataclasses.field(
        default_factory=lambda: {(kind,): 1.0 for kind in KINDS})
    observations: dict[Key, int] = dataclasses.field(
        default_factory=lambda: {(kind,): 0 for kind in KINDS})
    recent_errors: dict[str, collections.deque] = dataclasses.field(
        default_factory=lambda: {kind: collections.deque(maxlen=RECENT_ERRORS) for kind in KINDS})
    """Per kind, measured / predicted of the last ``RECENT_ERRORS`` observations, the
    prediction as corrected when it was made: the spread any headroom on the SLO must cover."""

    def factor(self, kind: str, *details: Any) -> float:
        """The ratio of the finest key of ``(kind, *details)`` that has been observed enough."""
        self._check(kind)
        key = (kind, *details)
        while len(key) > 1 and self.observations.get(key, 0) < self.min_observations:
            key = key[:-1]
        return self.ratio[key]

    def observe(self, kind: str, predicted: float, measured: float, *details: Any) -> None:
        """One measured time of work predicted at ``predicted`` (corrected with
        ``factor(kind, *details)``): every key from ``(kind,)`` to ``(kind, *details)`` learns."""
        self._check(kind)
        if not (predicted > 0 and measured > 0 and math.isfinite(predicted) and math.isfinite(measured)):
            return
        self.recent_errors[kind].append(measured / predicted)
        raw_ratio = measured / (predicted / self.factor(kind, *details))
        low, high = self.bounds
        for end in range(1, len(details) + 2):
            key = (kind, *details[:end - 1])
            current = self.ratio.get(key, self.ratio[key[:-1]] if len(key) > 1 else 1.0)
            target = min(current * self.max_step, max(current / self.max_step, raw_ratio))
            n = self.observations.get(key, 0)
            w = max(self.weight, 1 / (n + 1))
            self.ratio[key] = min(high, max(low, current ** (1 - w) * target ** w))
            self.observations[key] = n + 1

    def error_quantiles(self, kind: str, quantiles: Sequence[float]) -> tuple[float, ...]:
        """Quantiles of ``kind``'s recent measured / predicted ratios (empty before any)."""
        self._check(kind)
        errors = sorted(self.recent_errors[kind])
        if not errors:
            return ()
        return tuple(errors[min(len(errors) - 1, int(q * len(errors)))] for q in quantiles)

    @staticmethod
    def _check(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@dataclasses.dataclass
class StepOverhead:
    """What a worker step costs the engine beyond the worker's own time (sending its inputs,
    the reply, the engine noticing it), as a moving mean of what the engine measured: the
    additive part of a split iteration's time, which a ratio would misjudge on small chunks."""

    weight: float = 0.1
    """Weight of each new observation (the first few weigh 1/(n+1): a fast start)."""
    max_seconds: float = 0.020
    """Observations are clipped to this: a stall is not overhead to expect next time."""
    seconds: float = 0.0
    observations: int = 0

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        w = max(self.weight, 1 / (self.observations + 1))
        self.seconds += w * (min(self.max_seconds, max(0.0, seconds)) - self.seconds)
        self.observations += 1


PREFILL_SIZE_BUCKETS_S = (0.020, 0.040, 0.060, 0.080, 0.100, 0.120, 0.150)
"""Edges of the prefill chunk-size keys, by predicted seconds (small chunks carry the fixed
cost of a dispatch; long-context ones more attention than the roofline's)."""


def prefill_size_bucket(t_prefill_raw: float) -> int:
    return sum(t_prefill_raw >= edge for edge in PREFILL_SIZE_BUCKETS_S)


class CorrectedRoofline:
    """A ``Roofline`` whose iteration predictions are scaled by a ``Correction`` (the methods
    the optimizer calls); everything else is the roofline's own."""

    def __init__(self, roofline: Any, correction: Correction) -> None:
        self.roofline = roofline
        self.correction = correction
        self.last_raw: dict[tuple[float, float], tuple[float, float]] = {}
        """(s_p, s_d) -> the last (t_p, t_d) ``predict_split`` made for that pair, before
        correction (the keys of what the workers measure follow from them)."""

    def predict_mixed(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      sm_share: float = 1.0, **kw: Any) -> float:
        tokens = len(decode_context_lens) + sum(new for new, _ in prefill)
        return self.roofline.predict_mixed(prefill, decode_context_lens, sm_share, **kw) * \
            self.correction.factor("aggregated", *self.mixed_key(tokens))

    def mixed_key(self, num_tokens: int) -> tuple[int, ...]:
        """The details of a mixed step's key: the compiled bucket its ``num_tokens`` pad to.

        Each bucket learns its own ratio: a step's fixed costs weigh most on small ones, so
        one ratio over every size is pulled up by the small steps, and a budget choosing
        between sizes would then overrate the large ones the more small ones it chose (a
        feedback toward ever smaller budgets)."""
        padding = getattr(self.roofline, "padding", None)
        if padding is None or num_tokens <= 0:
            return ()
        return (padding.padded(num_tokens, num_tokens, False)[0],)

    def predict_split(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      s_p: float, s_d: float, **kw: Any) -> tuple[float, float]:
        t_p, t_d = self.roofline.predict_split(prefill, decode_context_lens, s_p, s_d, **kw)
        self.last_raw[(s_p, s_d)] = (t_p, t_d)
        return (t_p * self.correction.factor("prefill", *self.prefill_key(t_p, s_p)),
                t_d * self.correction.factor("decode", s_d))

    @staticmethod
    def prefill_key(t_prefill_raw: float, s_p: float) -> tuple[float, int]:
        """The details of a prefill-worker step's key: its share and size bucket."""
        return s_p, prefill_size_bucket(t_prefill_raw)

    def predict_decode(self, context_lens: Sequence[int], sm_share: float = 1.0) -> float:
        return self.roofline.predict_decode(context_lens, sm_share) * self.correction.factor("decode")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.roofline, name)
