"""tools/roofline_fit.py: the fit recovers known factors, the error is cross-validated, a report
re-fits without a GPU, and the tool runs end to end on CPU."""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import roofline_fit as rf  # noqa: E402
from duetjax.perf.roofline import (DeviceProfile, Efficiency, ModelShape, Roofline,  # noqa: E402
                                   SMLevel, StepPadding)


@pytest.fixture(scope="module")
def shape() -> ModelShape:
    from models.config import ModelConfig
    config = json.loads((REPO / "models/configs/llama-3-8b/config.json").read_text())
    return ModelShape.from_config(ModelConfig.from_hf(config))


BASE = DeviceProfile("test GPU", (SMLevel(0.5, 400e12, 3.5e12), SMLevel(1.0, 800e12, 4.0e12)))
PADDING = StepPadding(max_seqs=64, min_tokens=16, max_context=6144)


def test_fit_recovers_known_efficiencies_overhead_and_program_slots(shape):
    truth = DeviceProfile("test GPU", BASE.levels, overhead_s=2e-3, program_slots=120.0,
                          prefill_program_slots=330.0,
                          efficiency=Efficiency(gemm=0.7, attention=0.5, elementwise=0.8))
    compositions = rf.sample_compositions(np.random.default_rng(1), 200, 2048, 64, 4096)
    assert any(all(q == 1 for q, _ in c) for c in compositions)  # decode-only iterations
    assert any(q > 1 for c in compositions for q, _ in c)  # and prefill chunks
    measured = np.array([Roofline(shape, truth, PADDING).predict(c) for c in compositions])
    profile, report = rf.evaluate(BASE, shape, compositions, measured, padding=PADDING)
    assert profile.efficiency.gemm == pytest.approx(0.7, rel=1e-6)
    assert profile.efficiency.attention == pytest.approx(0.5, rel=1e-6)
    assert profile.efficiency.elementwise == pytest.approx(0.8, rel=1e-6)
    assert profile.overhead_s == pytest.approx(2e-3, rel=1e-6)
    assert profile.program_slots == pytest.approx(120.0, rel=1e-6)
    assert profile.prefill_program_slots == pytest.approx(330.0, rel=1e-6)
    assert report["error_before"]["median"] > 0.1 and report["error_after"]["median"] < 1e-6
    assert report["folds"] == 2 and report["error_after"]["n"] == 200
    assert report["coefficient_names"][-2:] == ["program_slots", "prefill_program_slots"]


def test_every_iteration_is_held_out_once(shape):
    """One iteration timed at twice its true time: a fit that had seen it would pull towards
    it; held out, it is predicted by the fit on the clean folds, at its true time (error 1/2)."""
    truth = DeviceProfile("test GPU", BASE.levels, overhead_s=1e-3, program_slots=100.0,
                          efficiency=Efficiency(gemm=0.8, attention=0.6, elementwise=0.5))
    compositions = rf.sample_compositions(np.random.default_rng(3), 90, 2048, 64, 4096)
    measured = np.array([Roofline(shape, truth, PADDING).predict(c) for c in compositions])
    measured[70] *= 2
    for folds in (2, 3, 9):
        _, report = rf.evaluate(BASE, shape, compositions, measured, folds=folds, padding=PADDING)
        assert report["error_after"]["n"] == 90 and len(report["error_per_fold"]) == folds
        assert [f["n"] for f in report["error_per_fold"]] == [90 // folds] * folds
        assert report["error_per_fold"][70 * folds // 90]["max"] == pytest.approx(0.5, rel=1e-6)
        assert report["error_after"]["max"] == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="folds"):
        rf.evaluate(BASE, shape, compositions, measured, folds=1, padding=PADDING)


def test_efficiencies_are_bounded_in_the_solve(shape):
    """Steps faster than the measured rates allow: the fit stops at efficiency 1 and the other
    factors absorb the rest, so the profile predicts what the fit solved for."""
    compositions = rf.sample_compositions(np.random.default_rng(2), 120, 2048, 64, 4096)
    fast = DeviceProfile("test GPU", BASE.levels, overhead_s=1e-3,
                         efficiency=Efficiency(gemm=1.0, attention=0.6, elementwise=1.0))
    measured = 0.8 * np.array([Roofline(shape, fast).predict(c) for c in compositions])
    profile, report = rf.evaluate(BASE, shape, compositions, measured)
    assert profile.efficiency.gemm == pytest.approx(1.0) and profile.overhead_s >= 0
    assert profile.program_slots >= 0 and profile.prefill_program_slots >= 0
    assert all(0 < profile.efficiency.of(name) <= 1 for name in ("gemm", "attention", "elementwise"))
    # the second fold: fitted on the first half, held out on the second
    second = rf.fitted_profile(BASE, np.array(report["fold_coefficients"][1]), "")
    predicted = [Roofline(shape, second).predict(c) for c in compositions[60:]]
    assert report["error_per_fold"][1]["median"] == pytest.approx(
        float(np.median(np.abs(np.array(predicted) - measured[60:]) / measured[60:])))


def test_refit_from_a_report_written_before_the_block_table_width(shape, tmp_path):
    """An older report's padding lacks max_context: --max-context and
    --max-num-batched-tokens give it (4096 + 2048 keys by default), and the re-fit finds the
    factors of the profile that made the timings."""
    truth = DeviceProfile("test GPU", BASE.levels, overhead_s=2e-3, program_slots=110.0,
                          prefill_program_slots=300.0,
                          efficiency=Efficiency(gemm=0.9, attention=0.7, elementwise=0.2))
    compositions = rf.sample_compositions(np.random.default_rng(4), 60, 2048, 64, 4096)
    measured = [Roofline(shape, truth, PADDING).predict(c) for c in compositions]
    old = {"padding": {"max_seqs": 64, "min_tokens": 16}, "model": "llama-3-8b",
           "device": "test GPU", "jax": "0.0", "command": "tools/roofline_fit.py ...",
           "date": "2026-11-21",
           "iterations": [{"composition": c, "measured_s": m} for c, m in zip(compositions, measured)]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    BASE.save(tmp_path / "base.json")
    out, report = tmp_path / "fitted.json", tmp_path / "refit.json"
    assert rf.main(["--from-report", str(tmp_path / "old.json"), "--profile", str(tmp_path / "base.json"),
                    "--folds", "3", "--out", str(out), "--report", str(report)]) == 0
    fitted = DeviceProfile.from_json(out)
    assert fitted.program_slots == pytest.approx(110.0, rel=1e-6)
    assert fitted.prefill_program_slots == pytest.approx(300.0, rel=1e-6)
    assert fitted.efficiency.elementwise == pytest.approx(0.2, rel=1e-6)
    data = json.loads(report.read_text())
    assert data["padding"]["max_context"] == 6144 and data["folds"] == 3
    assert data["error_after"]["n"] == 60 and data["error_after"]["max"] < 1e-6
    assert data["date"] == "2026-11-21" and "--from-report" in data["refit"]
    assert len(data["iterations"]) == 60


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
    assert data["error_after"]["n"] == 12  # both folds held out
    assert data["padding"]["max_context"] == 96 and data["dtype_bytes"] == 4  # 64 + 32 keys
    # the report re-fits to the same profile without the engine
    again, refit = tmp_path / "again.json", tmp_path / "refit.json"
    assert rf.main(["--from-report", str(report), "--profile", str(base), "--out", str(again),
                    "--report", str(refit)]) == 0
    refitted = DeviceProfile.from_json(again)
    assert dataclasses.replace(refitted, notes=()) == dataclasses.replace(fitted, notes=())
