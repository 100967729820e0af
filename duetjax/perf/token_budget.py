"""SLO-aware token budget of aggregated iterations (plain Python, no jax).

A mixed iteration runs every decoding request's next token beside prefill chunks; its length is
the gap every decoding request sees between two tokens. Sarathi-Serve keeps that gap within a
time-between-tokens (TBT) SLO by choosing one fixed token budget per deployment. ``TokenBudget``
chooses it per iteration instead: the largest compiled token bucket whose mixed step the
roofline (with its online correction) predicts within the SLO, given the decodes running now
and the prefill work waiting. Long contexts get smaller chunks, light decode batches larger
ones, and nothing outside the compiled buckets is ever run.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from .roofline import power_of_two


class MixedStepPredictor(Protocol):
    def predict_mixed(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      sm_share: float = 1.0) -> float: ...


def budget_sizes(max_tokens: int, min_tokens: int) -> tuple[int, ...]:
    """The budgets worth choosing: each mixed bucket size (a power of two from ``min_tokens``)
    below ``max_tokens``, then ``max_tokens``. A budget between two sizes would pad to the
    larger one and cost as much."""
    sizes = []
    size = power_of_two(min_tokens)
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return (*sizes, max_tokens)


def chunks_within(prefill: Sequence[tuple[int, int]], tokens: int) -> list[tuple[int, int]]:
    """The prefill chunks, in scheduling order, that ``tokens`` of budget cover (the scheduler
    fills them first come, first served; the last one may be cut short)."""
    chunks = []
    for new, cached in prefill:
        if tokens <= 0:
            break
        take = min(new, tokens)
        chunks.append((take, cached))
        tokens -= take
    return chunks


def queue_pace(queue: Sequence[tuple[int, float]], ttft_target_s: float) -> float:
    """Prompt tokens a second that serve each queued prompt within ``ttft_target_s`` of its
    arrival, first come first served: the largest (tokens up to and including it) / (time it
    has left). ``queue``: (tokens left, seconds waited) in scheduling order. Prompts with less
    than a tenth of the target left are not paced for (the rate that would still serve them is
    a step far past any SLO); they are computed first all the same."""
    ahead, pace = 0, 0.0
    for tokens, waited in queue:
        ahead += tokens
        left = ttft_target_s - waited
        if left > 0.1 * ttft_target_s:
            pace = max(pace, ahead / left)
    return pace


class TokenBudget:
    """Chooses each aggregated iteration's token budget so that its predicted step fits the
    TBT SLO (``choose``), and learns how far the predictions are off (``observe``)."""

    def __init__(self, roofline: MixedStepPredictor, tbt_slo_s: float, max_tokens: int,
                 min_tokens: int, min_prefill_tokens: int, headroom: float = 0.1,
                 ttft_target_s: float | None = None) -> None:
        if tbt_slo_s <= 0:
            raise ValueError(f"tbt_slo_s must be > 0, got {tbt_slo_s}")
        if ttft_target_s is not None and ttft_target_s <= 0:
            raise ValueError(f"ttft_target_s must be > 0, got {ttft_target_s}")
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.roofline = roofline
        self.tbt_slo_s = tbt_slo_s
        self.target_s = tbt_slo_s * (1 - headroom)
        """The step time a budget must be predicted within: the SLO less a share kept for
        prediction error (a step predicted right at the SLO misses it about half the time)."""
        self.max_tokens = max_tokens
        self.sizes = budget_sizes(max_tokens, min_tokens)
        self.min_prefill_tokens = min_prefill_tokens
        """Prefill tokens every mixed iteration gets whatever the prediction: a budget that
        starves prefill holds the SLO only while the queue, and time to first token, grow."""
        self.ttft_target_s = ttft_target_s
        """Time to first token queued prompts should be served within: where the budget that
        fits the SLO computes prompt tokens more slowly than ``queue_pace`` asks, the smallest
        larger budget that keeps that pace (None: no pace kept)."""
        self.last = max_tokens
        """The last budget chosen for work with prefill."""
        self.last_predicted_s = 0.0
        """The predicted step time at that budget."""

    def choose(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
               queue: Sequence[tuple[int, float]] | None = None) -> int:
        """The largest budget whose mixed step is predicted to fit the SLO (less its headroom).

        ``prefill``: the waiting and unfinished prompts as (tokens left, cached tokens), in
        scheduling order; ``decode_context_lens``: cached tokens of each decoding request (one
        token of budget each); ``queue``: every prompt not yet computed, in scheduling order,
        as (tokens left, seconds it has waited) (default: those of ``prefill``, just arrived).
        With no decodes there is no gap to protect: the full budget. Prefill gets at least
        ``min_prefill_tokens``, and with ``ttft_target_s`` the queue's pace, even where that
        misses the SLO.
        """
        decodes = len(decode_context_lens)
        if not prefill:
            return self.max_tokens
        if not decodes:
            self.last, self.last_predicted_s = self.max_tokens, 0.0
            return self.max_tokens
        wanted = decodes + sum(new for new, _ in prefill)
        floor = decodes + self.min_prefill_tokens
        sizes = [s for s in self.sizes if s >= floor]
        if not sizes:
            sizes = [self.max_tokens]
        # Sizes past the first that holds all the work cost the same as it: stop there.
        cut = next((i for i, s in enumerate(sizes) if s >= wanted), len(sizes) - 1)
        sizes = sizes[:cut + 1]
        # The step grows with the budget: binary search for the last size that fits.
        predicted = {}

        def fits(i: int) -> bool:
            predicted[i] = self.roofline.predict_mixed(
                chunks_within(prefill, sizes[i] - decodes), decode_context_lens, 1.0)
            return predicted[i] <= self.target_s

        low, high = 0, len(sizes) - 1  # the answer is in [low, high]; sizes[0] if none fits
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        if low not in predicted:
            fits(low)
        if self.ttft_target_s is not None:
            if queue is None:
                queue = [(new, 0.0) for new, _ in prefill]
            pace = queue_pace(queue, self.ttft_target_s)

            def rate(i: int) -> float:
                return (min(sizes[i], wanted) - decodes) / predicted[i]

            while low + 1 < len(sizes) and rate(low) < pace:
                low += 1
                fits(low)
        self.last, self.last_predicted_s = sizes[low], predicted[low]
        return self.last

    def observe_aggregated(self, predicted: float, measured: float, num_tokens: int) -> None:
        """A mixed iteration of ``num_tokens`` tokens predicted at ``predicted`` seconds took
        ``measured``: the online correction (when the roofline has one) learns the ratio, for
        that step's bucket and for all sizes."""
        correction = getattr(self.roofline, "correction", None)
        if correction is not None:
            correction.observe("aggregated", predicted, measured,
                               *self.roofline.mixed_key(num_tokens))
