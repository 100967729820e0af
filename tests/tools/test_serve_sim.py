"""tools/serve_sim.py: the engine's scheduler and policies on a virtual clock."""
import json
from pathlib import Path

import numpy as np
import pytest

from duetjax.config import EngineConfig
from duetjax.duet.split_mode import SplitPlanner, build_roofline
from duetjax.perf.roofline import DeviceProfile
from models.config import ModelConfig
from tools.bench_duet import WorkItem, engine_kwargs, tbt_gaps
from tools.serve_sim import (SimulatedDevice, SimulatedEngine, bucket_factors, main, parse_args,
                             run_point, simulate_mode, summary)

REPO = Path(__file__).resolve().parents[2]
H100 = str(REPO / "duetjax/perf/profiles/nvidia-h100-80gb-hbm3.json")
H200 = str(REPO / "duetjax/perf/profiles/nvidia-h200.json")
LLAMA = ModelConfig.from_hf(json.loads((REPO / "models/configs/llama-3-8b/config.json").read_text()))


def engine(mode: str, *argv: str, profile: str = H100, **device: float) -> SimulatedEngine:
    args = parse_args(["--profile", profile, *argv])
    config = EngineConfig(**engine_kwargs(args, mode))
    prof = DeviceProfile.from_json(profile)
    roofline = build_roofline(LLAMA, "bfloat16", config, args.max_model_len, prof, None)
    return SimulatedEngine(mode, config, LLAMA, prof, SimulatedDevice(roofline, **device),
                           args.kv_cache_tokens // config.page_size, args.max_model_len)


def items(lengths, gap_s: float) -> list[WorkItem]:
    rng = np.random.default_rng(0)
    return [WorkItem(rng.integers(100, 1000, p).tolist(), d, i * gap_s)
            for i, (p, d) in enumerate(lengths)]


LENGTHS = [(3000, 40), (200, 80), (6000, 20), (900, 60), (4000, 50), (150, 120)] * 4


@pytest.mark.parametrize("mode", ["aggregated@512", "slo", "duet"])
def test_every_request_gets_all_its_tokens_in_time_order(mode):
    sim = engine(mode, "--tbt-slos-ms", "25")
    records, duration = run_point(sim, items(LENGTHS, 0.05), drain_timeout_s=600)
    assert len(records) == len(LENGTHS)
    for record, (_, d) in zip(sorted(records, key=lambda r: r.arrival), LENGTHS):
        assert record.completed and record.output_len == d == len(record.token_times)
        assert record.token_times[0] > record.arrival
        assert record.token_times == sorted(record.token_times)
    assert duration == max(r.finished for r in records)
    assert not sim.scheduler.has_work() and sim.scheduler.blocks.num_free_pages == sim.scheduler.blocks.num_pages


def test_a_lone_request_takes_what_the_roofline_predicts():
    sim = engine("aggregated@2048", mixed_factor=1.5)
    (record,), _ = run_point(sim, items([(1000, 11)], 1.0), drain_timeout_s=60)
    roofline = sim.device.roofline
    assert record.ttft == pytest.approx(1.5 * roofline.predict_mixed([(1000, 0)], [], 1.0))
    gaps = tbt_gaps(record.token_times)
    assert gaps[0] == pytest.approx(1.5 * roofline.predict_decode([1000], 1.0))
    assert gaps[-1] == pytest.approx(1.5 * roofline.predict_decode([1009], 1.0))


def test_bucket_factors_and_overhead_price_the_mixed_steps_by_their_padded_size():
    base = engine("aggregated@2048").device
    priced = engine("aggregated@2048", bucket_factors=((512, 2.0),), step_overhead_s=0.001).device
    assert priced.aggregated([(400, 0)], [100] * 8) == pytest.approx(
        2 * base.aggregated([(400, 0)], [100] * 8) + 0.001)  # 408 tokens pad to 512
    assert priced.aggregated([(600, 0)], []) == pytest.approx(base.aggregated([(600, 0)], []) + 0.001)
    assert bucket_factors("512:1.25,1024:1.1") == ((512, 1.25), (1024, 1.1))


def test_the_slo_aware_budget_keeps_every_gap_within_the_slo_on_the_roofline_device():
    # Short contexts: every budget down to the floor fits, so only a wrong choice could miss.
    lengths = [(1500, 60), (800, 100), (2500, 40), (300, 150)] * 8
    sim = engine("slo", "--tbt-slos-ms", "20")
    records, _ = run_point(sim, items(lengths, 0.02), drain_timeout_s=600)
    gaps = [g for r in records for g in tbt_gaps(r.token_times)]
    assert max(gaps) <= 0.020 * 0.9 + 1e-9  # the SLO less the budget's headroom
    fixed, _ = run_point(engine("aggregated@2048"), items(lengths, 0.02), drain_timeout_s=600)
    assert max(g for r in fixed for g in tbt_gaps(r.token_times)) > 0.020  # (so the test can fail)
    assert len(sim.budgets) > 1


def test_duet_splits_where_no_aggregated_step_fits_and_holds_the_slo():
    lengths = [(7000, 200)] * 24
    duet = engine("duet", "--tbt-slos-ms", "25", "--duet-pairs", "80/20,70/30", profile=H200)
    records, _ = run_point(duet, items(lengths, 0.4), drain_timeout_s=600)
    assert duet.planner.stats.split_iterations > 0
    assert float(np.percentile([g for r in records for g in tbt_gaps(r.token_times)], 99)) <= 0.025
    fixed, _ = run_point(engine("aggregated@2048", profile=H200), items(lengths, 0.4),
                         drain_timeout_s=600)
    assert float(np.percentile([g for r in fixed for g in tbt_gaps(r.token_times)], 99)) > 0.025


def test_requests_still_running_after_the_drain_timeout_are_aborted():
    sim = engine("aggregated@512")
    records, duration = run_point(sim, items([(6000, 500)] * 6, 0.0), drain_timeout_s=1.0)
    assert any(r.aborted for r in records) and not any(r.completed for r in records)
    assert 1.0 < duration < 1.5  # (the step running at the deadline ends first)


def test_a_planner_alone_judges_every_split_runnable():
    config = EngineConfig(mode="duet", tbt_slo_ms=25, max_num_batched_tokens=2048)
    planner = SplitPlanner(LLAMA, "bfloat16", None, config, 16384, DeviceProfile.from_json(H200))
    decision, pair = planner.decide([(2048, 0)], [7000] * 40)  # (no 512-token step fits 25 ms)
    assert decision.mode == "split" and pair == ()
    assert planner.stats.split_iterations == 1 and planner.stats.decisions["split"] == 1


def test_the_report_compares_with_a_measured_run(tmp_path):
    sim_out = tmp_path / "sim.json"
    main(["--model-config", str(REPO / "models/configs/llama-3-8b"), "--profile", H100,
          "--dataset", "azure-code", "--qps", "2", "--num-requests", "20", "--modes",
          "aggregated@512", "--out", str(sim_out)])
    measured = json.loads(sim_out.read_text())
    measured["modes"]["aggregated@512"]["points"][0]["request_throughput"] = 1.0
    measured["modes"]["aggregated@512"]["device"] = "a GPU"
    (tmp_path / "measured.json").write_text(json.dumps(measured))
    table = tmp_path / "sim.md"
    main(["--model-config", str(REPO / "models/configs/llama-3-8b"), "--profile", H100,
          "--dataset", "azure-code", "--qps", "2", "--num-requests", "20", "--modes",
          "aggregated@512", "--compare", str(tmp_path / "measured.json"), "--table", str(table)])
    report = table.read_text()
    assert "Against the GPU run" in report and "a GPU" in report
    compared = report.split("Against the GPU run")[1]
    row = next(line for line in compared.splitlines() if line.startswith("| aggregated@512 | 2 | "))
    simulated, real = row.split("|")[3].split(" / ")  # req/s: simulated / measured
    assert float(real) == 1.0 and float(simulated) > 1.0


def test_simulate_mode_reports_duets_splits_per_pair():
    args = parse_args(["--profile", H200, "--dataset", "mooncake", "--qps", "3",
                       "--num-requests", "24", "--tbt-slos-ms", "25"])
    lengths = [(7000, 100)] * 24
    result = simulate_mode(args, "duet", LLAMA, DeviceProfile.from_json(H200), lengths)
    duet = result["points"][0]["duet"]
    assert duet["split_iterations"] == sum(duet["pairs"].values()) > 0


def test_the_summary_sets_duet_beside_the_best_aggregated_engine_per_rate(tmp_path):
    out = tmp_path / "sweep.json"
    main(["--model-config", str(REPO / "models/configs/llama-3-8b"), "--profile", H200,
          "--dataset", "mooncake", "--qps", "2,4", "--num-requests", "16", "--modes",
          "aggregated@512,aggregated@2048,duet", "--tbt-slos-ms", "25", "--out", str(out)])
    report = json.loads(out.read_text())
    row = summary([str(out)]).splitlines()[2]
    assert row.startswith("| sweep | **2**: ") and "**4**: " in row
    first = report["modes"]["duet"]["points"][0]["goodput"]["25"]["tpot"]
    best = max(report["modes"][m]["points"][0]["goodput"]["25"]["tpot"]
               for m in ("aggregated@512", "aggregated@2048"))
    assert row.split("**2**: ")[1].startswith(f"{first:.2f}/{best:.2f} (")
