"""duetjax/perf/correction.py: the measured/predicted ratios and the corrected roofline."""
import math

import pytest

from duetjax.perf.correction import (PREFILL_SIZE_BUCKETS_S, RECENT_ERRORS, Correction,
                                     CorrectedRoofline, prefill_size_bucket)


class FakeRoofline:
    profile = "the roofline's own attribute"

    def predict_mixed(self, prefill, decode, sm_share=1.0, **kw):
        return 0.010

    def predict_split(self, prefill, decode, s_p, s_d, **kw):
        return 0.040, 0.005

    def predict_decode(self, context_lens, sm_share=1.0):
        return 0.004


def test_ratio_converges_to_the_measured_bias():
    correction = Correction()
    corrected = CorrectedRoofline(FakeRoofline(), correction)
    for _ in range(60):  # the real steps take 1.2x, 0.8x and 1.5x the raw predictions
        correction.observe("aggregated", corrected.predict_mixed([], []), 1.2 * 0.010)
        t_p, t_d = corrected.predict_split([], [], 0.5, 0.5)
        correction.observe("prefill", t_p, 0.8 * 0.040)
        correction.observe("decode", t_d, 1.5 * 0.005)
    assert correction.ratio[("aggregated",)] == pytest.approx(1.2, rel=1e-3)
    assert corrected.predict_split([], [], 0.5, 0.5) == pytest.approx((0.032, 0.0075), rel=1e-3)
    assert corrected.predict_decode([10]) == pytest.approx(0.006, rel=1e-3)
    assert corrected.last_raw == {(0.5, 0.5): (0.040, 0.005)}
    assert corrected.profile == "the roofline's own attribute"
    assert correction.observations == {("aggregated",): 60, ("prefill",): 60, ("decode",): 60}


def test_finer_keys_learn_their_own_ratio_and_fall_back_to_their_parent():
    correction = Correction()
    for _ in range(30):  # small prefill chunks at s_p 0.5 take 1.4x, large ones 0.9x
        correction.observe("prefill", 0.010 * correction.factor("prefill", 0.5, 0), 0.014, 0.5, 0)
        correction.observe("prefill", 0.100 * correction.factor("prefill", 0.5, 5), 0.090, 0.5, 5)
    assert correction.factor("prefill", 0.5, 0) == pytest.approx(1.4, rel=1e-3)
    assert correction.factor("prefill", 0.5, 5) == pytest.approx(0.9, rel=1e-3)
    # An unseen size falls back to its share's ratio, an unseen share to the kind's.
    assert correction.factor("prefill", 0.5, 3) == correction.ratio[("prefill", 0.5)]
    assert correction.factor("prefill", 0.7, 0) == correction.ratio[("prefill",)]
    assert 0.9 < correction.ratio[("prefill",)] < 1.4
    # A new key starts from its parent's ratio and is used from its second observation.
    correction.observe("prefill", 0.030 * correction.factor("prefill", 0.5, 2), 0.030, 0.5, 2)
    assert correction.factor("prefill", 0.5, 2) == correction.ratio[("prefill", 0.5)]
    correction.observe("prefill", 0.030 * correction.factor("prefill", 0.5, 2), 0.030, 0.5, 2)
    assert correction.factor("prefill", 0.5, 2) == correction.ratio[("prefill", 0.5, 2)]
    assert prefill_size_bucket(0.010) == 0 and prefill_size_bucket(0.200) == len(PREFILL_SIZE_BUCKETS_S)


def test_one_stall_moves_a_ratio_by_a_bounded_step():
    correction = Correction()
    for _ in range(20):
        correction.observe("decode", 0.010 * correction.factor("decode"), 0.012)
    before = correction.factor("decode")
    correction.observe("decode", 0.010 * before, 0.499)  # a 499 ms step among 12 ms ones
    assert before * 1.0 < correction.factor("decode") <= before * 1.3 ** correction.weight + 1e-12
    for _ in range(3):
        correction.observe("decode", 0.010 * correction.factor("decode"), 0.012)
    assert correction.factor("decode") == pytest.approx(1.2, rel=0.05)


def test_outliers_are_bounded_and_nonsense_is_ignored():
    correction = Correction(bounds=(0.5, 4.0))
    for _ in range(100):
        correction.observe("decode", 0.001 * correction.factor("decode"), 10.0)
    assert correction.factor("decode") == 4.0
    for bad in (0.0, -1.0, math.nan, math.inf):
        correction.observe("prefill", 0.01, bad)
    assert correction.factor("prefill") == 1.0 and correction.observations[("prefill",)] == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        correction.observe("mixed", 0.01, 0.01)
    with pytest.raises(ValueError, match="kind must be one of"):
        correction.factor("mixed")


def test_step_overhead_learns_the_mean_and_clips_stalls():
    from duetjax.perf.correction import StepOverhead

    overhead = StepOverhead()
    for seconds in (0.002, 0.004, 0.003):  # the first observations weigh 1/(n+1): their mean
        overhead.observe(seconds)
    assert overhead.seconds == pytest.approx(0.003)
    overhead.observe(0.500)  # a stall counts as max_seconds at most
    assert overhead.seconds == pytest.approx(0.003 + 0.25 * (0.020 - 0.003))
    before = overhead.seconds
    overhead.observe(float("nan"))
    overhead.observe(-0.001)  # (clock noise: no negative overhead)
    assert overhead.seconds == pytest.approx(before + 0.2 * (0.0 - before))


def test_error_quantiles_measure_the_corrected_predictions_spread():
    """Once the ratio has learned a steady bias, what is left is the spread around it: the
    errors of the predictions as corrected when they were made, the last RECENT_ERRORS kept."""
    correction = Correction()
    corrected = CorrectedRoofline(FakeRoofline(), correction)
    assert correction.error_quantiles("aggregated", (0.5,)) == ()
    for _ in range(RECENT_ERRORS):  # 1.3x the raw prediction: learned, then no error left
        correction.observe("aggregated", corrected.predict_mixed([], []), 1.3 * 0.010)
    spread = [0.95, 1.0, 1.05, 1.1] * 50  # then around the learned bias, +-5 % and a 10 % tail
    for factor in spread * (RECENT_ERRORS // len(spread)):
        correction.observe("aggregated", 1.3 * 0.010, factor * 1.3 * 0.010)
    p50, p90, p99 = correction.error_quantiles("aggregated", (0.5, 0.9, 0.99))
    assert (p50, p90, p99) == pytest.approx((1.05, 1.1, 1.1))
    assert len(correction.recent_errors["aggregated"]) == RECENT_ERRORS
    with pytest.raises(ValueError, match="kind"):
        correction.error_quantiles("mixed", (0.5,))
