"""tools/duet_bound.py: the capacity bound's steady state and its comparison."""
import json

import pytest

from duetjax.perf.roofline import DeviceProfile, InterferencePoint, ModelShape, Roofline, SMLevel
from tools.duet_bound import (Limits, Workload, aggregated_point, best_aggregated, best_split,
                              main, prefill_chunks)

SHAPE = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
                   num_kv_heads=8, head_dim=128, vocab_size=128256, dtype_bytes=2)
# Bandwidth saturates at a fifth of the SMs (decode needs few of them); FLOP/s scale with SMs.
LEVELS = tuple(SMLevel(share, 800e12 * share, min(3e12, 15e12 * share))
               for share in (0.2, 0.5, 0.8, 1.0))
LONG_DECODES = Workload("long", prompt=4000, output=1000, decode_context=4500)


def roofline(interference: float | None) -> Roofline:
    points = () if interference is None else tuple(
        InterferencePoint(s_p, 1 - s_p, interference, interference, interference, interference)
        for s_p in (0.8, 0.5))
    profile = DeviceProfile(gpu_name="test", levels=LEVELS, interference=points)
    return Roofline(SHAPE, profile)


def test_prefill_chunks_are_whole_prompts_then_a_chunk_at_its_average_prefix():
    assert prefill_chunks(2500, 1000) == [(1000, 0), (1000, 0), (500, 250)]
    assert prefill_chunks(300, 1000) == [(300, 350)]


def test_aggregated_capacity_follows_littles_law():
    point = aggregated_point(roofline(None), LONG_DECODES, Limits(256, 10**7), 1024)
    # B = b·D/(P + D) decodes, and then prefill and decode pace agree.
    assert point["decodes"] == round(1024 * 1000 / 5000)
    assert point["req_s"] == pytest.approx(1024 / (5000 * point["step_ms"] / 1e3), rel=0.01)


def test_a_capped_decode_batch_binds_the_aggregated_capacity():
    free = aggregated_point(roofline(None), LONG_DECODES, Limits(256, 10**7), 1024)
    capped = aggregated_point(roofline(None), LONG_DECODES, Limits(16, 10**7), 1024)
    assert capped["decodes"] == 16
    assert capped["req_s"] == pytest.approx(16 / (1000 * capped["step_ms"] / 1e3))
    assert capped["req_s"] < free["req_s"]


def test_the_best_aggregated_budget_fits_the_slo():
    best = best_aggregated(roofline(None), LONG_DECODES, Limits(256, 10**7), 0.030,
                           (256, 512, 1024, 2048, 4096))
    assert best is not None and best["step_ms"] <= 30
    assert best_aggregated(roofline(None), LONG_DECODES, Limits(256, 10**7), 1e-4, (256,)) is None


def test_split_wins_on_long_decodes_without_interference_and_loses_with_heavy_interference():
    limits, pairs = Limits(256, 10**7), ((0.8, 0.2), (0.5, 0.5))
    budgets = (256, 512, 1024, 2048)
    aggregated = best_aggregated(roofline(None), LONG_DECODES, limits, 0.025, budgets)
    ideal = best_split(roofline(None), LONG_DECODES, limits, 0.025, pairs, 2048)
    contended = best_split(roofline(0.5), LONG_DECODES, limits, 0.025, pairs, 2048)
    assert ideal["req_s"] > 1.2 * aggregated["req_s"]
    assert contended["req_s"] < aggregated["req_s"]
    # The decode worker's batch is as large as its step allows within the SLO.
    assert ideal["decode_step_ms"] <= 25


def test_main_writes_a_report_for_each_workload_and_slo(tmp_path):
    profile = DeviceProfile(gpu_name="test", levels=LEVELS,
                            interference=(InterferencePoint(0.8, 0.2, 0.9, 0.9, 0.9, 0.9),))
    profile.save(tmp_path / "profile.json")
    out, table = tmp_path / "bound.json", tmp_path / "bound.md"
    assert main(["--profile", str(tmp_path / "profile.json"), "--datasets", "azure-code",
                 "--workloads", "long:4000:1000", "--tbt-slos-ms", "50,25", "--pairs", "80/20",
                 "--samples", "50", "--out", str(out), "--table", str(table)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"]["name"], r["tbt_slo_ms"]) for r in rows] == [
        ("azure-code", 50), ("azure-code", 25), ("long", 50), ("long", 25)]
    assert all(r["split"]["pair"] == "80/20" for r in rows)
    assert "| long (4000 / 1000) | 25 |" in table.read_text()
