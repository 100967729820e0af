"""Partition optimizer: aggregated or split, and which SM shares and look-ahead when split.

DuetServe runs prefill and decode in one mixed batch on the whole GPU while that meets the
time-between-tokens (TBT) SLO, because that uses the GPU best. Only when the roofline predicts a
miss does it split the SMs: prefill on an S_p client, decode on an S_d client, with k decode steps
run back to back while one prefill batch runs. The split maximises tokens per second,

    (k·T_decode + T_prefill) / max(k·t_d(S_d), t_p(S_p))   subject to   t_d(S_d) <= SLO,

over the worker pairs that exist and k in 1..k_max. ``decide`` is the pure decision;
``ModeController`` adds hysteresis so the mode does not flap between iterations, and weighs
the best split against aggregated at a smaller token budget, judging the split by its
iteration as the engine runs it (``split_seconds``).

Plain Python, no jax: it runs on the host every scheduling iteration.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from .roofline import Roofline
from .token_budget import TokenBudget, chunks_within

AGGREGATED = "aggregated"
SPLIT = "split"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What the partition optimizer may choose from, and the SLO it protects."""

    tbt_slo_s: float
    """Time-between-tokens SLO, seconds: every decode step must be predicted to fit it."""
    pairs: tuple[tuple[float, float], ...] = ((0.8, 0.2), (0.7, 0.3), (0.6, 0.4), (0.5, 0.5))
    """(S_p, S_d) shares of the MPS worker pairs that exist; only these are considered."""
    k_max: int = 8
    """Most decode steps launched while one prefill batch runs (the look-ahead)."""
    k_values: tuple[int, ...] | None = None
    """The k the decode workers have executables for; None: every k in 1..k_max."""

    def __post_init__(self) -> None:
        if self.tbt_slo_s <= 0:
            raise ValueError("tbt_slo_s must be > 0")
        if self.k_max < 1:
            raise ValueError("k_max must be >= 1")
        for s_p, s_d in self.pairs:
            if not (0 < s_p <= 1 and 0 < s_d <= 1):
                raise ValueError(f"SM shares must be in (0, 1], got pair {(s_p, s_d)}")


@dataclasses.dataclass(frozen=True)
class Decision:
    """One iteration's choice, with the predictions behind it (for logs and metrics)."""

    mode: str
    """'aggregated' (one mixed batch on the full GPU) or 'split'."""
    s_p: float
    """SM share of the prefill worker (1.0 when aggregated)."""
    s_d: float
    """SM share of the decode worker (1.0 when aggregated)."""
    k: int
    """Decode steps per prefill batch (1 when aggregated)."""
    t_aggregated: float
    """Predicted time of the mixed iteration on the full GPU, seconds."""
    t_prefill: float | None
    """Predicted t_p(S_p) of the chosen split, seconds; None when aggregated."""
    t_decode: float | None
    """Predicted t_d(S_d) of one decode step of the chosen split, seconds; None when aggregated."""
    objective: float
    """Predicted throughput of the choice, tokens/s: (k·T_decode + T_prefill) / max(k·t_d, t_p)
    when split, (T_decode + T_prefill) / t_aggregated when aggregated."""
    slo_met: bool
    """Whether the chosen plan's decode step is predicted to fit the TBT SLO."""
    reason: str
    """Why this choice, in words."""
    token_budget: int | None = None
    """Aggregated at a smaller token budget than the engine's (the SLO-aware budget, which
    shortens the prefill chunk until the mixed step fits the SLO); None: the engine's own."""


def _prefill_tokens(prefill: Sequence[tuple[int, int]]) -> int:
    return sum(q for q, _ in prefill)


def predict_aggregated(roofline: Roofline, prefill: Sequence[tuple[int, int]],
                       decode_context_lens: Sequence[int]) -> float:
    """Time of the mixed batch (prefill chunks and one token per decode) on the full GPU."""
    return roofline.predict_mixed(prefill, decode_context_lens, 1.0)


def aggregated(roofline: Roofline, prefill: Sequence[tuple[int, int]],
               decode_context_lens: Sequence[int], config: OptimizerConfig, reason: str,
               t_aggregated: float | None = None) -> Decision:
    """The aggregated decision for this batch, with ``reason``."""
    if t_aggregated is None:
        t_aggregated = predict_aggregated(roofline, prefill, decode_context_lens)
    tokens = len(decode_context_lens) + _prefill_tokens(prefill)
    return Decision(mode=AGGREGATED, s_p=1.0, s_d=1.0, k=1, t_aggregated=t_aggregated,
                    t_prefill=None, t_decode=None,
                    objective=tokens / t_aggregated if t_aggregated > 0 else 0.0,
                    slo_met=t_aggregated <= config.tbt_slo_s or not decode_context_lens,
                    reason=reason)


def _best_k(t_p: float, t_d: float, decodes: int, prefill_tokens: int,
            config: OptimizerConfig) -> tuple[int, float]:
    """(k, objective) maximising (k·decodes + prefill tokens) / max(k·t_d, t_p); ties keep the
    smaller k."""
    best_k, best = 1, -1.0
    for k in config.k_values or range(1, config.k_max + 1):
        objective = (k * decodes + prefill_tokens) / max(k * t_d, t_p)
        if objective > best:
            best_k, best = k, objective
    return best_k, best


def best_split(roofline: Roofline, prefill: Sequence[tuple[int, int]],
               decode_context_lens: Sequence[int], config: OptimizerConfig,
               t_aggregated: float) -> Decision | None:
    """The feasible (S_p, S_d, k) with the highest objective, or None if no pair's decode step
    fits the SLO. Ties keep the earlier pair in ``config.pairs`` and the smaller k."""
    t_decode_tokens = len(decode_context_lens)
    t_prefill_tokens = _prefill_tokens(prefill)
    best: Decision | None = None
    for s_p, s_d in config.pairs:
        t_p, t_d = roofline.predict_split(prefill, decode_context_lens, s_p, s_d)
        if t_d > config.tbt_slo_s:
            continue
        k, objective = _best_k(t_p, t_d, t_decode_tokens, t_prefill_tokens, config)
        if best is None or objective > best.objective:
            best = Decision(
                mode=SPLIT, s_p=s_p, s_d=s_d, k=k, t_aggregated=t_aggregated, t_prefill=t_p,
                t_decode=t_d, objective=objective, slo_met=True,
                reason=f"aggregated {t_aggregated * 1e3:.3f} ms > SLO "
                       f"{config.tbt_slo_s * 1e3:.3f} ms; best split")
    return best


def decide(roofline: Roofline, prefill: Sequence[tuple[int, int]],
           decode_context_lens: Sequence[int], config: OptimizerConfig) -> Decision:
    """The pure decision for one iteration.

    ``prefill``: the pending prefill batch as (chunk tokens, cached tokens) per request;
    ``decode_context_lens``: cached tokens of each running decode (each adds one token).

    Aggregated when it fits the SLO, or when there is nothing to split (no prefill or no
    decode). Otherwise the best feasible split. If no pair's decode step fits the SLO, the
    fallback is aggregated with ``slo_met=False``: even when decode alone on the full GPU would
    fit, pausing prefill is not an option here, because an SLO that holds only by starving
    prefill would hold forever under steady load (TTFT unbounded). The remedy is a smaller
    prefill chunk, which is the scheduler's knob; the reason says whether decode alone fits,
    so the scheduler can tell the two cases apart.
    """
    t_agg = predict_aggregated(roofline, prefill, decode_context_lens)
    slo_ms = config.tbt_slo_s * 1e3
    if not decode_context_lens:
        return aggregated(roofline, prefill, decode_context_lens, config,
                          "no decode running: nothing to protect", t_agg)
    if not prefill:
        return aggregated(roofline, prefill, decode_context_lens, config,
                          "no prefill pending: nothing to split", t_agg)
    if t_agg <= config.tbt_slo_s:
        return aggregated(roofline, prefill, decode_context_lens, config,
                          f"aggregated {t_agg * 1e3:.3f} ms fits SLO {slo_ms:.3f} ms", t_agg)
    split = best_split(roofline, prefill, decode_context_lens, config, t_agg)
    if split is not None:
        return split
    return fallback(roofline, prefill, decode_context_lens, config, t_agg)


def fallback(roofline: Roofline, prefill: Sequence[tuple[int, int]],
             decode_context_lens: Sequence[int], config: OptimizerConfig,
             t_aggregated: float) -> Decision:
    """Aggregated, because no split pair meets the SLO (see ``decide`` for why)."""
    t_alone = roofline.predict_decode(decode_context_lens, 1.0)
    alone = ("decode alone on the full GPU would fit "
             if t_alone <= config.tbt_slo_s else "decode alone on the full GPU misses it too ")
    return aggregated(roofline, prefill, decode_context_lens, config,
                      f"fallback: no split pair meets SLO {config.tbt_slo_s * 1e3:.3f} ms "
                      f"(aggregated {t_aggregated * 1e3:.3f} ms); {alone}"
                      f"({t_alone * 1e3:.3f} ms): shrink the prefill chunk", t_aggregated)


@dataclasses.dataclass(frozen=True)
class HysteresisConfig:
    """When ``ModeController`` switches modes; margins are fractions of the SLO."""

    headroom: float = 0.1
    """Share of the SLO kept free for prediction error: an aggregated iteration predicted
    above SLO·(1 − headroom) counts as a miss. A mixed iteration that really misses breaks the
    SLO for every running request, so the controller must not wait to be sure (the roofline's
    error: docs/design.md, "Measured facts")."""
    enter_after: int = 1
    """Consecutive predicted misses before going split. 1: at once, since every mixed iteration
    let through over the SLO is a gap all running requests see."""
    enter_margin: float = 0.05
    """A miss by more than this (t_agg > SLO·(1 − headroom)·(1 + margin)) goes split at once
    when ``enter_after`` > 1: waiting would miss the SLO for sure."""
    exit_after: int = 4
    """Consecutive iterations whose aggregated prediction fits with ``exit_margin`` before
    going back to aggregated."""
    exit_margin: float = 0.2
    """Back to aggregated only when t_agg <= SLO·(1 − margin), so a batch hovering at the
    SLO stays split (at least ``headroom``)."""

    def __post_init__(self) -> None:
        if self.enter_after < 1 or self.exit_after < 1:
            raise ValueError("enter_after and exit_after must be >= 1")
        if self.enter_margin < 0 or not 0 <= self.exit_margin < 1 or not 0 <= self.headroom < 1:
            raise ValueError("enter_margin must be >= 0, exit_margin and headroom in [0, 1)")
        if self.exit_margin < self.headroom:
            raise ValueError("exit_margin must be >= headroom, or the mode flaps at the SLO")


class ModeController:
    """The optimizer with memory: the pure decision, smoothed so the mode does not flap.

    In aggregated mode it goes split after ``enter_after`` consecutive predicted misses of the
    SLO less its headroom (or one large miss); in split mode it goes back after ``exit_after`` consecutive comfortable fits.
    While split it re-optimises (S_p, S_d, k) every iteration. Nothing to split (no prefill or
    no decode) and no feasible split both force aggregated and reset the counters.
    """

    def __init__(self, roofline: Roofline, config: OptimizerConfig,
                 hysteresis: HysteresisConfig = HysteresisConfig(),
                 token_budget: TokenBudget | None = None,
                 split_seconds: Callable[[Decision], float] | None = None) -> None:
        self.roofline = roofline
        self.config = config
        self.hysteresis = hysteresis
        self.token_budget = token_budget
        """The SLO-aware aggregated alternative: where the full mixed step misses the SLO, a
        smaller prefill chunk on the whole GPU competes with the best split (and replaces the
        full step when no split fits)."""
        self.split_seconds = split_seconds
        """Expected length of a split iteration as the engine runs it (the chunk, the decode
        stream's ending, the engine's own work), for the comparison with the smaller budget;
        None: the optimizer's max(k·t_d, t_p). That max leaves out what a split iteration
        costs beyond its chunk, and with it the split wins comparisons it loses in service."""
        self.mode = AGGREGATED
        self._misses = 0
        self._fits = 0

    def step(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
             queue: Sequence[tuple[int, float]] | None = None) -> Decision:
        """The decision for this iteration; updates the mode. ``queue``: the queued prompts
        the SLO-aware budget keeps pace with (``TokenBudget.choose``)."""
        roofline, config, hyst = self.roofline, self.config, self.hysteresis
        slo = config.tbt_slo_s
        if not prefill or not decode_context_lens:
            self._reset(AGGREGATED)
            return decide(roofline, prefill, decode_context_lens, config)
        t_agg = predict_aggregated(roofline, prefill, decode_context_lens)
        budget = slo * (1 - hyst.headroom)
        if self.mode == AGGREGATED:
            self._misses = self._misses + 1 if t_agg > budget else 0
            if self._misses < hyst.enter_after and t_agg <= budget * (1 + hyst.enter_margin):
                reason = (f"aggregated {t_agg * 1e3:.3f} ms fits SLO {slo * 1e3:.3f} ms "
                          f"less {100 * hyst.headroom:.0f} % headroom"
                          if t_agg <= budget else
                          f"hysteresis: miss {self._misses} of {hyst.enter_after} before split")
                return aggregated(roofline, prefill, decode_context_lens, config, reason, t_agg)
        else:
            self._fits = self._fits + 1 if t_agg <= slo * (1 - hyst.exit_margin) else 0
            if self._fits >= hyst.exit_after:
                self._reset(AGGREGATED)
                return aggregated(roofline, prefill, decode_context_lens, config,
                                  f"back to aggregated after {hyst.exit_after} comfortable fits",
                                  t_agg)
        split = best_split(roofline, prefill, decode_context_lens, config, t_agg)
        smaller = self._smaller_budget(prefill, decode_context_lens, split, queue)
        if smaller is not None:
            self._reset(AGGREGATED)
            return smaller
        if split is None:
            self._reset(AGGREGATED)
            return fallback(roofline, prefill, decode_context_lens, config, t_agg)
        if self.mode == AGGREGATED:
            self._reset(SPLIT)
        elif t_agg <= budget:
            split = dataclasses.replace(
                split, reason=f"hysteresis: aggregated fits ({t_agg * 1e3:.3f} ms), staying split "
                              f"({self._fits} of {hyst.exit_after} comfortable fits)")
        return split

    def _smaller_budget(self, prefill: Sequence[tuple[int, int]],
                        decode_context_lens: Sequence[int], split: Decision | None,
                        queue: Sequence[tuple[int, float]] | None) -> Decision | None:
        """Aggregated at the SLO-aware budget, when it beats ``split`` in predicted tokens per
        second within the SLO (or when there is no feasible split); else None."""
        if self.token_budget is None:
            return None
        budget = self.token_budget.choose(prefill, decode_context_lens, queue)
        t = self.token_budget.last_predicted_s
        slo = self.config.tbt_slo_s
        if t <= 0 or (split is not None and t > self.token_budget.target_s):
            return None
        decodes = len(decode_context_lens)
        tokens = decodes + _prefill_tokens(chunks_within(prefill, budget - decodes))
        objective = tokens / t
        split_rate = None if split is None else self.split_rate(split, decodes,
                                                                 _prefill_tokens(prefill))
        if split_rate is not None and objective < split_rate:
            return None
        versus = (f"beats the best split ({split_rate:.0f} tokens/s)" if split_rate is not None
                  else "no split pair meets the SLO")
        return Decision(mode=AGGREGATED, s_p=1.0, s_d=1.0, k=1, t_aggregated=t, t_prefill=None,
                        t_decode=None, objective=objective, slo_met=t <= slo,
                        reason=f"aggregated at a {budget}-token budget ({t * 1e3:.3f} ms, "
                               f"{objective:.0f} tokens/s) {versus}", token_budget=budget)

    def split_rate(self, split: Decision, decodes: int, prefill_tokens: int) -> float:
        """``split``'s predicted tokens per second as the engine runs it: the decode stream's
        rate (it steps on through the whole iteration) plus the chunk's tokens over the
        iteration's expected length (``split_seconds``); without that, its objective."""
        if self.split_seconds is None or not split.t_decode:
            return split.objective
        return decodes / split.t_decode + prefill_tokens / self.split_seconds(split)

    def _reset(self, mode: str) -> None:
        self.mode = mode
        self._misses = 0
        self._fits = 0


class StaticController:
    """A fixed SM partition, the baseline DuetServe is measured against (same ``step`` as
    ``ModeController``): every iteration that holds both prefill and decode work is split at
    the first pair of ``config.pairs``, with the k of the best objective; the SLO is not
    consulted. Iterations with one kind of work run aggregated: there is nothing to split."""

    def __init__(self, roofline: Roofline, config: OptimizerConfig) -> None:
        self.roofline = roofline
        self.config = config
        self.mode = AGGREGATED

    def step(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
             queue: Sequence[tuple[int, float]] | None = None) -> Decision:
        roofline, config = self.roofline, self.config
        t_agg = predict_aggregated(roofline, prefill, decode_context_lens)
        if not prefill or not decode_context_lens:
            self.mode = AGGREGATED
            return aggregated(roofline, prefill, decode_context_lens, config,
                              "static: nothing to split", t_agg)
        s_p, s_d = config.pairs[0]
        t_p, t_d = roofline.predict_split(prefill, decode_context_lens, s_p, s_d)
        k, objective = _best_k(t_p, t_d, len(decode_context_lens), _prefill_tokens(prefill), config)
        self.mode = SPLIT
        return Decision(mode=SPLIT, s_p=s_p, s_d=s_d, k=k, t_aggregated=t_agg, t_prefill=t_p,
                        t_decode=t_d, objective=objective, slo_met=t_d <= config.tbt_slo_s,
                        reason=f"static {round(100 * s_p)}/{round(100 * s_d)} split")
