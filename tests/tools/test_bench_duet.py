"""tools/bench_duet.py: the metric math on constructed timestamps, the workload, the static
policy, and end-to-end sweeps through the tiny Llama on CPU (aggregated, and a static 50/50
split whose greedy outputs must equal the aggregated engine's)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_duet as bd  # noqa: E402
from bench_duet import RequestRecord  # noqa: E402


# ---- metric math ----------------------------------------------------------------------------

def test_gaps_raw_and_amortised():
    times = [10.0, 11.0, 11.0, 11.0, 11.3]  # a 3-token burst 1 s after the first token
    assert bd.tbt_gaps(times) == pytest.approx([1.0, 0.0, 0.0, 0.3])
    assert bd.amortised_gaps(times) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.3])
    # tokens that came with the first one have no gap to spread
    assert bd.amortised_gaps([5.0, 5.0, 6.0]) == pytest.approx([0.0, 1.0])
    assert bd.tbt_gaps([5.0]) == bd.amortised_gaps([5.0]) == []
    for t in ([1.0, 2.0, 2.0, 4.0, 4.5, 4.5, 4.5], [0.0, 0.0, 0.0]):
        assert len(bd.amortised_gaps(t)) == len(bd.tbt_gaps(t))
        assert sum(bd.amortised_gaps(t)) == pytest.approx(t[-1] - t[0])


def test_tpot_and_distribution():
    assert bd.tpot([1.0, 1.5, 3.0]) == pytest.approx(1.0)
    assert bd.tpot([1.0]) is None
    d = bd.distribution_ms([0.01 * i for i in range(1, 101)])  # 10 .. 1000 ms
    assert d["n"] == 100
    assert d["p50"] == pytest.approx(505.0)
    assert d["p99"] == pytest.approx(990.1)
    assert d["mean"] == pytest.approx(505.0) and d["max"] == pytest.approx(1000.0)
    assert bd.distribution_ms([])["p99"] is None


def _record(arrival, times, prompt=10, aborted=False):
    return RequestRecord(prompt_len=prompt, max_tokens=len(times), arrival=arrival,
                         added=arrival + 0.001, token_times=list(times),
                         finished=None if aborted else times[-1], output_len=len(times),
                         aborted=aborted)


def test_summarize_ttft_tbt_goodput():
    records = [
        _record(0.0, [0.1, 0.12, 0.14, 0.16]),          # ttft 100 ms, gaps 20 ms: good at 25 and 50
        _record(1.0, [1.5, 1.53, 1.56]),                # ttft 500 ms, gaps 30 ms: good at 50 only
        _record(2.0, [4.5, 4.51, 4.52]),                # ttft 2500 ms: never good
        _record(3.0, [3.2, 3.26, 3.26, 3.26, 3.27]),    # burst: raw max 60 ms, amortised 20 ms,
                                                        # mean TPOT 17.5 ms
        _record(4.0, [4.05]),                           # one token: no gaps, good
        _record(5.0, [], aborted=True),                 # aborted: counted as issued, never good
    ]
    m = bd.summarize(records, duration_s=10.0, tbt_slos_ms=[50, 25], ttft_slo_ms=2000)
    assert (m["issued"], m["completed"], m["aborted"]) == (6, 5, 1)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_token_throughput"] == pytest.approx((4 + 3 + 3 + 5 + 1) / 10)
    assert m["total_token_throughput"] == pytest.approx((16 + 50) / 10)
    ttfts = [0.1, 0.5, 2.5, 0.2, 0.05]
    assert m["ttft_ms"]["p50"] == pytest.approx(1e3 * np.percentile(ttfts, 50))
    assert m["ttft_ms"]["p99"] == pytest.approx(1e3 * np.percentile(ttfts, 99))
    assert m["ttft_ms"]["mean"] == pytest.approx(1e3 * np.mean(ttfts))
    raw = [0.02] * 3 + [0.03] * 2 + [0.01] * 2 + [0.06, 0.0, 0.0, 0.01]
    assert m["tbt_ms"]["n"] == len(raw) == 11
    assert m["tbt_ms"]["p99"] == pytest.approx(1e3 * np.percentile(raw, 99))
    assert m["tbt_ms"]["p50"] == pytest.approx(1e3 * np.percentile(raw, 50))
    assert m["tbt_ms"]["mean"] == pytest.approx(1e3 * np.mean(raw))
    assert m["tbt_ms"]["max"] == pytest.approx(60.0)
    assert m["tbt_amortised_ms"]["max"] == pytest.approx(30.0)
    assert m["tpot_ms"]["n"] == 4
    assert m["add_lag_ms"]["mean"] == pytest.approx(1.0)
    g50, g25 = m["goodput"]["50"], m["goodput"]["25"]
    # SLO 50: records 0, 1, 4 always; record 3 by TPOT and amortised, not by raw max gap
    assert g50 == pytest.approx({"tpot": 0.4, "p99_tbt": 0.3, "max_tbt": 0.3,
                                 "max_tbt_amortised": 0.4})
    # SLO 25: record 0 and 4; record 3 by TPOT (17.5) and amortised (20), not raw (60)
    assert g25 == pytest.approx({"tpot": 0.3, "p99_tbt": 0.2, "max_tbt": 0.2,
                                 "max_tbt_amortised": 0.3})
    assert m["slo_attainment"]["50"]["max_tbt"] == pytest.approx(3 / 6)
    # the TTFT SLO binds too
    strict = bd.summarize(records, 10.0, [50], ttft_slo_ms=150)
    assert strict["goodput"]["50"]["tpot"] == pytest.approx(0.2)  # records 0 and 4


def test_p99_gap_goodput_forgives_one_gap_in_a_hundred():
    steady = [0.1 + 0.01 * i for i in range(201)]  # 200 gaps of 10 ms
    one_stall = steady[:100] + [t + 0.07 for t in steady[100:]]  # one of them 80 ms
    three_stalls = one_stall[:150] + [t + 0.07 for t in one_stall[150:]]
    three_stalls = three_stalls[:180] + [t + 0.07 for t in three_stalls[180:]]  # 1.5 % of gaps
    records = [_record(0.0, steady), _record(0.0, one_stall), _record(0.0, three_stalls)]
    g = bd.summarize(records, duration_s=1.0, tbt_slos_ms=[50], ttft_slo_ms=2000)["goodput"]["50"]
    assert g["max_tbt"] == pytest.approx(1.0)
    assert g["p99_tbt"] == pytest.approx(2.0)
    assert g["tpot"] == pytest.approx(3.0)


def test_modes_and_their_engines():
    args = bd.parse_args(["--out", "x", "--modes", "aggregated,aggregated@256,slo,duet",
                          "--tbt-slos-ms", "25,50", "--max-num-batched-tokens", "1024"])
    assert args.mode_list == ["aggregated", "aggregated@256", "slo", "duet"]
    fixed, small, slo = (bd.engine_kwargs(args, m) for m in args.mode_list[:3])
    assert (fixed["max_num_batched_tokens"], "tbt_slo_ms" in fixed) == (1024, False)
    assert (small["max_num_batched_tokens"], "tbt_slo_ms" in small) == (256, False)
    assert (slo["mode"], slo["max_num_batched_tokens"], slo["tbt_slo_ms"]) == ("aggregated", 1024, 25)
    assert bd.engine_kwargs(args, "duet")["tbt_slo_ms"] == 25
    assert [bd.is_aggregated(m) for m in args.mode_list] == [True, True, True, False]
    for bad in ("aggregated@x", "duet@512", "fast"):
        with pytest.raises(SystemExit):
            bd.parse_args(["--out", "x", "--modes", bad])


def test_best_aggregated_table():
    def point(qps, good, p99):
        return {"qps": qps, "tbt_ms": {"p99": p99},
                "goodput": {"50": {c: good for c in bd.GOODPUT_CRITERIA}}}

    report = {"modes": {"aggregated@512": {"points": [point(1, 1.0, 20), point(2, 1.5, 30)]},
                        "slo": {"points": [point(1, 0.9, 20), point(2, 1.8, 40)]},
                        "duet": {"points": [point(1, 1.1, 20), point(2, 1.2, 60)]}}}
    assert bd.best_aggregated(report, "50", "tpot", 1) == ("slo", 1.8)
    table = "\n".join(bd.best_aggregated_table(report, ["50"]))
    assert "| 1 | 50 | tpot | 1.00 (aggregated@512) | 1.10 | 1.10 | yes |" in table
    assert "| 2 | 50 | p99_tbt | 1.80 (slo) | 1.20 | 0.67 | no |" in table


def test_roofline_error():
    e = bd.roofline_error([1.1, 0.8, 2.0, 1.0], [1.0, 1.0, 1.0, 0.0])  # measured 0 is skipped
    assert e["n"] == 3
    assert e["median"] == pytest.approx(0.2)
    assert e["p95"] == pytest.approx(np.percentile([0.1, 0.2, 1.0], 95))
    assert e["signed_mean"] == pytest.approx((0.1 - 0.2 + 1.0) / 3)
    assert bd.roofline_error([], [])["median"] is None


def test_compare_checks():
    a = {"token_ids": [[1, 2, 3], [4, 5]], "split_iterations": 0}
    b = {"token_ids": [[1, 2, 3], [4, 6]], "split_iterations": 3}
    same = bd.compare_checks({"aggregated": a, "static": dict(a, split_iterations=2)})
    assert same["identical"] is True
    diff = bd.compare_checks({"aggregated": a, "duet": b})
    assert diff["identical"] is False
    assert diff["mismatches"] == [{"mode": "duet", "request": 1, "first_diverging_token": 1,
                                   "lengths": [2, 2]}]
    assert bd.compare_checks({"aggregated": a, "duet": None})["identical"] is None


# ---- workload -------------------------------------------------------------------------------

def test_lengths_are_scaled_and_clipped():
    full = bd.sample_lengths("azure-conversation", 2000, 1.0, 1.0, 100_000, seed=3)
    half = bd.sample_lengths("azure-conversation", 2000, 0.5, 0.5, 100_000, seed=3)
    assert np.median([p for p, _ in full]) == pytest.approx(1020, rel=0.1)
    assert np.median([o for _, o in full]) == pytest.approx(129, rel=0.1)
    assert np.median([p for p, _ in half]) == pytest.approx(510, rel=0.1)
    clipped = bd.sample_lengths("mooncake", 500, 1.0, 1.0, 2048, seed=3)
    assert all(1 <= p <= 2047 and 1 <= o and p + o <= 2048 for p, o in clipped)


def test_points_share_lengths_not_prompts_and_are_poisson():
    lengths = bd.sample_lengths("azure-code", 4000, 0.1, 1.0, 4096, seed=0)
    a = bd.make_point(lengths, 1000, qps=5.0, seed=0, point=0)
    b = bd.make_point(lengths, 1000, qps=5.0, seed=0, point=1)
    assert [len(w.prompt_ids) for w in a] == [p for p, _ in lengths]
    assert [w.max_tokens for w in a] == [o for _, o in lengths] == [w.max_tokens for w in b]
    assert a[0].prompt_ids != b[0].prompt_ids  # no prefix-cache hits across points
    assert all(100 <= t < 1000 for w in a[:50] for t in w.prompt_ids)
    arrivals = np.array([w.arrival for w in a])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert len(a) / arrivals[-1] == pytest.approx(5.0, rel=0.1)
    gaps = np.diff(arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    again = bd.make_point(lengths, 1000, qps=5.0, seed=0, point=0)
    assert bd.digest(again) == bd.digest(a) != bd.digest(b)


# ---- the static policy ----------------------------------------------------------------------

# ---- end to end on the tiny Llama (CPU) -----------------------------------------------------

COMMON = ["--dataset", "azure-conversation", "--scale", "0.05", "--output-scale", "0.1",
          "--dtype", "float32", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
          "--warmup-requests", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def device_profile(tmp_path_factory):
    from duetjax.perf.roofline import DeviceProfile, SMLevel

    profile = DeviceProfile(gpu_name="test", overhead_s=0.0, levels=(
        SMLevel(0.5, 5e8, 1e18), SMLevel(1.0, 1e9, 1e18)))
    path = tmp_path_factory.mktemp("profile") / "test.json"
    profile.save(path)
    return str(path)


def test_sweep_aggregated_and_static_in_process(tiny_llama_dir, device_profile, tmp_path):
    out = tmp_path / "run"
    status = bd.main(["--model", str(tiny_llama_dir), *COMMON, "--qps", "20,80",
                      "--num-requests", "6", "--modes", "aggregated,static", "--check-outputs",
                      "--device-profile", device_profile, "--carry-stream", "--in-process",
                      "--out", str(out)])
    assert status == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["modes"]) == {"aggregated", "static"}
    assert report["same_workload"] is True
    lengths = bd.sample_lengths("azure-conversation", 6, 0.05, 0.1, 256, seed=1)
    for mode, res in report["modes"].items():
        assert "error" not in res, res
        assert [p["qps"] for p in res["points"]] == [20.0, 80.0]
        for p in res["points"]:
            assert p["issued"] == p["completed"] == 6 and p["aborted"] == 0
            assert p["ttft_ms"]["n"] == 6 and p["ttft_ms"]["p50"] > 0
            # every request got all its tokens: gaps = outputs - 1 each
            assert p["tbt_ms"]["n"] == sum(o - 1 for _, o in lengths)
            assert p["mean_output_len"] == pytest.approx(np.mean([o for _, o in lengths]))
            assert p["request_throughput"] > 0 and p["duration_s"] > 0
            assert p["loop"]["compile_seconds_during"] == 0.0
            assert set(p["goodput"]) == {"50", "25"}
        assert res["check"]["token_ids"] and all(res["check"]["token_ids"])
    assert report["modes"]["aggregated"]["points"][0]["duet"] is None
    static = report["modes"]["static"]
    assert static["static_policy"] == "forced" and static["engine_config"]["duet_pairs"] == [[50, 50]]
    assert static["engine_config"]["duet_carry_stream"] is True
    assert static["check"]["split_iterations"] > 0
    totals = static["duet_totals"]
    assert totals["split_iterations"] > 0
    assert totals["roofline_error"]["n"] == totals["split_iterations"]
    assert totals["decisions"]["split"] == totals["split_iterations"]  # (what decided them)
    assert sum(p["duet"]["decisions"].get("split", 0) for p in static["points"]) == sum(
        p["duet"]["split_iterations"] for p in static["points"])
    records = totals["records"]  # one entry per split iteration, for an offline fit
    assert {len(v) for k, v in records.items() if k != "switch_seconds"} == {totals["split_iterations"]}
    assert all(s_p == s_d == 0.5 for s_p, s_d in records["split_shares"])
    assert report["check_outputs"]["identical"] is True
    md = (out / "results.md").read_text()
    assert "| aggregated | 20 |" in md and "| static | 80 |" in md
    assert "identical token ids in every mode" in md
    assert "decided by" in md and "split: " in md
    # the same sweep run apart (one mode per run) merges back into one report
    for mode in report["modes"]:
        (tmp_path / mode).mkdir()
        (tmp_path / mode / "results.json").write_text(json.dumps(
            dict(report, modes={mode: report["modes"][mode]}, command=f"run {mode}")))
    merged = bd.merge([str(tmp_path / m / "results.json") for m in ("aggregated", "static")],
                      tmp_path / "merged")
    assert merged["modes"] == report["modes"] and merged["same_workload"] is True
    assert merged["merged_from"] == ["run aggregated", "run static"]
    assert "| static | 80 |" in (tmp_path / "merged" / "results.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "tbt_p99_vs_qps.png").stat().st_size > 0
    assert (out / "goodput_vs_qps.png").stat().st_size > 0


def test_duration_cap_and_child_process(tiny_llama_dir, tmp_path):
    """The default path: each mode in a child process; the cap stops arrivals past it."""
    out = tmp_path / "run"
    status = bd.main(["--model", str(tiny_llama_dir), *COMMON, "--qps", "2",
                      "--num-requests", "40", "--duration-cap-s", "1.0", "--modes", "aggregated",
                      "--save-requests", "--out", str(out)])
    assert status == 0
    res = json.loads((out / "results.json").read_text())["modes"]["aggregated"]
    p = res["points"][0]
    assert 1 <= p["issued"] < 40 and p["completed"] == p["issued"]  # ~3 arrivals within 1 s
    assert not (out / "mode-aggregated.json").exists()  # merged into results.json
    rows = json.loads((out / "requests.json").read_text())["aggregated"]["2"]
    assert len(rows) == p["issued"] and rows[0]["arrival"] == 0.0
    assert all(len(r["token_times"]) == r["output_len"] == r["max_tokens"] for r in rows)
    assert all(r["arrival"] <= 1.0 for r in rows)
    ttfts = sorted(r["token_times"][0] for r in rows)
    assert 1e3 * ttfts[-1] == pytest.approx(p["ttft_ms"]["max"], abs=1e-2)


def test_engine_kwargs_online_correction_flag():
    args = bd.parse_args(["--out", "x", "--max-model-len", "512"])
    assert bd.engine_kwargs(args, "duet")["duet_online_correction"] is True
    args = bd.parse_args(["--out", "x", "--no-online-correction"])
    assert bd.engine_kwargs(args, "duet")["duet_online_correction"] is False
    assert "duet_online_correction" not in bd.engine_kwargs(args, "aggregated")
