"""tools/roofline_fit.py: the fit recovers known factors; the tool runs end to end on CPU."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import roofline_fit as rf  # noqa: E402
from duetjax.roofline import DeviceProfile, Efficiency, ModelShape, Roofline, SMLevel  # noqa: E402


@pytest.fixture(scope="module")
def shape() -> ModelShape:
    from models.config import ModelConfig
    config = json.loads((REPO / "models/configs/llama-3-8b/config.json").read_text())
    return ModelShape.from_config(ModelConfig.from_hf(config))


BASE = DeviceProfile("test GPU", (SMLevel(0.5, 400e12, 3.5e12), SMLevel(1.0, 800e12, 4.0e12)))


def test_fit_recovers_known_efficiencies_and_overhead(shape):
    truth = DeviceProfile("test GPU", BASE.levels, overhead_s=2e-3,
                          efficiency=Efficiency(gemm=0.7, attention=0.5, elementwise=0.8))
    compositions = rf.sample_compositions(np.random.default_rng(1), 200, 2048, 64, 4096)
    assert any(all(q == 1 for q, _ in c) for c in compositions)  # decode-only iterations
    assert any(q > 1 for c in compositions for q, _ in c)  # and prefill chunks
    measured = np.array([Roofline(shape, truth).predict(c) for c in compositions])
    profile, report = rf.evaluate(BASE, shape, compositions, measured)
    assert profile.efficiency.gemm == pytest.approx(0.7, rel=1e-6)
    assert profile.efficiency.attention == pytest.approx(0.5, rel=1e-6)
    assert profile.efficiency.elementwise == pytest.approx(0.8, rel=1e-6)
    assert profile.overhead_s == pytest.approx(2e-3, rel=1e-6)
    assert report["error_before"]["median"] > 0.1 and report["error_after"]["median"] < 1e-6
    assert report["test"] == 100


def test_efficiencies_are_bounded_in_the_solve(shape):
    """Steps faster than the measured rates allow: the fit stops at efficiency 1 and the other
    factors absorb the rest, so the profile predicts what the fit solved for."""
    compositions = rf.sample_compositions(np.random.default_rng(2), 120, 2048, 64, 4096)
    fast = DeviceProfile("test GPU", BASE.levels, overhead_s=1e-3,
                         efficiency=Efficiency(gemm=1.0, attention=0.6, elementwise=1.0))
    measured = 0.8 * np.array([Roofline(shape, fast).predict(c) for c in compositions])
    profile, report = rf.evaluate(BASE, shape, compositions, measured)
    assert profile.efficiency.gemm == pytest.approx(1.0) and profile.overhead_s >= 0
    assert all(0 < profile.efficiency.of(name) <= 1 for name in ("gemm", "attention", "elementwise"))
    test = compositions[report["train"]:]
    predicted = [Roofline(shape, profile).predict(c) for c in test]
    assert report["error_after"]["median"] == pytest.approx(
        float(np.median(np.abs(np.array(predicted) - measured[report["train"]:])
                        / measured[report["train"]:])))


def test_end_to_end_on_cpu(tiny_llama_dir, tmp_path):
    base = tmp_path / "base.json"
    BASE.save(base)
    out, report = tmp_path / "fitted.json", tmp_path / "report.json"
    assert rf.main(["--model", str(tiny_llama_dir), "--load-format", "auto", "--dtype", "float32",
                    "--iterations", "12", "--reps", "1", "--max-num-seqs", "4",
                    "--max-num-batched-tokens", "32", "--max-context", "64",
                    "--profile", str(base), "--out", str(out), "--report", str(report)]) == 0
    fitted = DeviceProfile.from_json(out)
    assert 0 < fitted.efficiency.gemm <= 1 and "roofline_fit.py" in fitted.notes[-1]
    data = json.loads(report.read_text())
    assert len(data["iterations"]) == 12 and all(it["measured_s"] > 0 for it in data["iterations"])
    assert data["error_after"]["n"] == 6
