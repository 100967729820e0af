"""Online correction of the roofline's predictions from the iterations the engine measures.

The calibrated roofline underestimated real Llama-3-8B iterations on an H200 by 25-35 %
(benchmarks/results/duet-h200-2026-11-21.md): launch gaps, skinny GEMMs and the sampler are not
in its rates. The optimizer decides on those predictions (split when the aggregated step misses
the SLO; which pair; k), so a steady bias means steady wrong decisions. ``Correction`` keeps
one measured/predicted ratio per kind of work, a geometric moving average of what the engine
observed, and ``CorrectedRoofline`` scales the roofline's answers by it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

KINDS = ("aggregated", "prefill", "decode")
"""A mixed step on the whole GPU; a prefill-worker step; one decode step on a decode worker."""


@dataclasses.dataclass
class Correction:
    """measured / predicted per kind, learned online."""

    weight: float = 0.2
    """Weight of each new observation in the (log-space) moving average."""
    bounds: tuple[float, float] = (0.25, 8.0)
    """Ratios stay within these: one absurd measurement (a page fault, a restart) must not
    make every later prediction absurd."""
    ratio: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 1.0))
    observations: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def observe(self, kind: str, predicted: float, measured: float) -> None:
        """One measured time of work the corrected roofline predicted at ``predicted``."""
        if kind not in self.ratio:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not (predicted > 0 and measured > 0 and math.isfinite(predicted) and math.isfinite(measured)):
            return
        low, high = self.bounds
        # predicted = raw · ratio, so ratio · (measured/predicted)^w = ratio^(1-w) · (measured/raw)^w.
        updated = self.ratio[kind] * (measured / predicted) ** self.weight
        self.ratio[kind] = min(high, max(low, updated))
        self.observations[kind] += 1


class CorrectedRoofline:
    """A ``Roofline`` whose iteration predictions are scaled by a ``Correction`` (the methods
    the optimizer calls); everything else is the roofline's own."""

    def __init__(self, roofline: Any, correction: Correction) -> None:
        self.roofline = roofline
        self.correction = correction

    def predict_mixed(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      sm_share: float = 1.0, **kw: Any) -> float:
        return self.roofline.predict_mixed(prefill, decode_context_lens, sm_share, **kw) * \
            self.correction.ratio["aggregated"]

    def predict_split(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      s_p: float, s_d: float, **kw: Any) -> tuple[float, float]:
        t_p, t_d = self.roofline.predict_split(prefill, decode_context_lens, s_p, s_d, **kw)
        return t_p * self.correction.ratio["prefill"], t_d * self.correction.ratio["decode"]

    def predict_decode(self, context_lens: Sequence[int], sm_share: float = 1.0) -> float:
        return self.roofline.predict_decode(context_lens, sm_share) * self.correction.ratio["decode"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.roofline, name)
