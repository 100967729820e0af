"""tools/split_error.py on a constructed split record."""
import pytest

from tools.split_error import errors, summary


def test_errors_compare_both_forms_and_each_worker():
    # One split: a 70 ms chunk beside 10 ms decode steps, k = 4 (stream_k 2 at a 50 ms SLO:
    # 4 steps would take 40 ms, more than half the SLO), measured 80 ms in all.
    records = {"measured_seconds": [0.080], "predicted_seconds": [0.076], "split_k": [4],
               "predicted_prefill_seconds": [0.070],
               "predicted_decode_step_seconds": [0.010], "prefill_worker_seconds": [0.0725],
               "decode_worker_steps": [8], "decode_worker_seconds": [0.080]}
    results = {"engine_tbt_slo_ms": 50.0,
               "modes": {"duet": {"points": [{"duet": {"records": records}}, {"duet": None}]}}}
    got = errors(results)
    assert got["max(t_p, k*t_d)"] == pytest.approx([0.070 / 0.080 - 1])
    assert got["t_p + half a dispatch"] == pytest.approx([(0.070 + 0.010) / 0.080 - 1])  # +1 step
    assert got["engine's prediction"] == pytest.approx([0.076 / 0.080 - 1])
    assert got["prefill worker"] == pytest.approx([0.070 / 0.0725 - 1])
    assert got["decode worker"] == pytest.approx([0.0])
    assert summary([0.1, -0.3])["signed_mean"] == pytest.approx(-0.1)
