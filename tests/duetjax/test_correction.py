"""duetjax/correction.py: the measured/predicted ratios and the corrected roofline."""
import math

import pytest

from duetjax.correction import Correction, CorrectedRoofline


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
    for _ in range(60):  # the real steps take 1.5x the raw prediction
        correction.observe("aggregated", corrected.predict_mixed([], []), 1.5 * 0.010)
        t_p, t_d = corrected.predict_split([], [], 0.5, 0.5)
        correction.observe("prefill", t_p, 0.8 * 0.040)
        correction.observe("decode", t_d, 2.0 * 0.005)
    assert correction.ratio["aggregated"] == pytest.approx(1.5, rel=1e-3)
    assert corrected.predict_split([], [], 0.5, 0.5) == pytest.approx((0.032, 0.010), rel=1e-3)
    assert corrected.predict_decode([10]) == pytest.approx(0.008, rel=1e-3)
    assert corrected.profile == "the roofline's own attribute"
    assert correction.observations == {"aggregated": 60, "prefill": 60, "decode": 60}


def test_outliers_are_bounded_and_nonsense_is_ignored():
    correction = Correction(bounds=(0.5, 4.0))
    for _ in range(100):
        correction.observe("decode", 0.001, 10.0)
    assert correction.ratio["decode"] == 4.0
    for bad in (0.0, -1.0, math.nan, math.inf):
        correction.observe("prefill", 0.01, bad)
    assert correction.ratio["prefill"] == 1.0 and correction.observations["prefill"] == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        correction.observe("mixed", 0.01, 0.01)
