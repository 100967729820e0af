"""tools/bench_serve.py end to end against the test server; its numbers agree with /metrics."""
from __future__ import annotations

import json
import subprocess
import sys

from .conftest import API_KEY
from .helpers import REPO_ROOT

COUNTERS = ("duetjax_request_success_total", "duetjax_generation_tokens_total",
            "duetjax_prompt_tokens_total", "duetjax_time_to_first_token_seconds_sum",
            "duetjax_time_to_first_token_seconds_count")


def test_bench_serve_end_to_end(server, tmp_path):
    before = {name: server.metric(name) for name in COUNTERS}
    out = tmp_path / "bench"
    command = [sys.executable, str(REPO_ROOT / "tools" / "bench_serve.py"),
               "--base-url", server.url, "--api-key", API_KEY, "--dataset", "random",
               "--num-prompts", "12", "--random-input-len", "24", "--random-output-len", "8",
               "--random-range-ratio", "0.5", "--vocab-size", "256", "--request-rate", "40,inf",
               "--goodput", "ttft:10000", "tpot:10000", "--result-dir", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Serving Benchmark Result" in run.stdout and "Mean TTFT (ms)" in run.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert [s["request_rate"] for s in summary] == [40.0, float("inf")]
    for s in summary:
        assert s["completed"] == 12 and s["failed"] == 0
        assert s["request_goodput"] == s["request_throughput"]  # generous SLOs: all good
        assert 0 < s["mean_ttft_ms"] <= s["mean_e2el_ms"]
        assert s["median_tpot_ms"] > 0 and s["p99_itl_ms"] >= s["median_itl_ms"]
    detail = json.loads((out / "rate_40.0.json").read_text())
    assert len(detail["ttfts"]) == 12 and all(not e for e in detail["errors"])
    assert all(4 <= n <= 12 for n in detail["output_lens"])  # 8 +- 50%, reached (ignore_eos)
    assert all(12 <= n <= 36 for n in detail["input_lens"])  # 24 +- 50%, as the server counted
    for plot in ("ttft_cdf.png", "itl_cdf.png", "latency_vs_rate.png"):
        assert (out / plot).stat().st_size > 0

    # The server counted the same requests and tokens, and saw first tokens no later than the
    # client did (the client's TTFT adds HTTP and parsing on top of the server's).
    delta = {name: server.metric(name) - before[name] for name in COUNTERS}
    assert delta["duetjax_request_success_total"] == 24
    assert delta["duetjax_generation_tokens_total"] == sum(s["total_output_tokens"] for s in summary)
    assert delta["duetjax_prompt_tokens_total"] == sum(s["total_input_tokens"] for s in summary)
    server_ttft_ms = 1000 * delta["duetjax_time_to_first_token_seconds_sum"] / 24
    client_ttft_ms = sum(s["mean_ttft_ms"] for s in summary) / 2
    assert server_ttft_ms <= client_ttft_ms
