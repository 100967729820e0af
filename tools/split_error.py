"""Error of the predicted split-iteration time over the split records that ``bench_duet.py
--save-requests`` keeps: the optimizer's max(t_p, k·t_d); t_p plus half a decode dispatch (the
engine's form while the decode stream ran whole dispatches only, before its last dispatch was
sized to the chunk); the engine's own recorded prediction; and each worker's step. Runs on the
committed results, on CPU:

    python tools/split_error.py benchmarks/results/duet-8b-code-h200-2026-11-21 \\
        benchmarks/results/duet-8b-stallfix-h200-2026-11-21
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from duetjax.duet.split_mode import stream_steps  # noqa: E402


def half_dispatch_form(t_p: float, t_d: float, stream_k: int) -> float:
    """The iteration outlasts the chunk by half a whole dispatch (at least one dispatch)."""
    dispatch = stream_k * t_d
    return max(t_p + dispatch / 2, dispatch) if t_p > 0 else dispatch


def errors(results: dict) -> dict[str, list[float]]:
    """(predicted - measured) / measured per split iteration, per form, over every point."""
    slo = results["engine_tbt_slo_ms"] / 1e3
    out = {"max(t_p, k*t_d)": [], "t_p + half a dispatch": [], "engine's prediction": [],
           "prefill worker": [], "decode worker": []}
    for mode in results["modes"].values():
        for point in mode["points"]:
            rec = (point.get("duet") or {}).get("records")
            if not rec:
                continue
            for i, measured in enumerate(rec["measured_seconds"]):
                k, t_p = rec["split_k"][i], rec["predicted_prefill_seconds"][i]
                t_d = rec["predicted_decode_step_seconds"][i]
                stream_k = (rec["split_stream_k"][i] if "split_stream_k" in rec
                            else stream_steps(k, t_d, slo))
                out["max(t_p, k*t_d)"].append(max(t_p, k * t_d) / measured - 1)
                out["t_p + half a dispatch"].append(half_dispatch_form(t_p, t_d, stream_k) / measured - 1)
                out["engine's prediction"].append(rec["predicted_seconds"][i] / measured - 1)
                if rec["prefill_worker_seconds"][i] > 0:
                    out["prefill worker"].append(t_p / rec["prefill_worker_seconds"][i] - 1)
                steps = rec["decode_worker_steps"][i]
                if steps:
                    out["decode worker"].append(t_d * steps / rec["decode_worker_seconds"][i] - 1)
    return out


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"iterations": len(a), "median_abs": float(np.median(np.abs(a))),
            "p95_abs": float(np.percentile(np.abs(a), 95)), "signed_mean": float(a.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="bench_duet output directories (results.json)")
    args = p.parse_args()
    pooled: dict[str, list[float]] = {}
    print("| run | prediction | iterations | median | P95 | signed mean |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for run in args.runs:
        for form, values in errors(json.loads((Path(run) / "results.json").read_text())).items():
            pooled.setdefault(form, []).extend(values)
            if values:
                s = summary(values)
                print(f"| {Path(run).name} | {form} | {s['iterations']} | {100 * s['median_abs']:.1f} % "
                      f"| {100 * s['p95_abs']:.1f} % | {100 * s['signed_mean']:+.1f} % |")
    for form, values in pooled.items():
        if values:
            s = summary(values)
            print(f"| all | {form} | {s['iterations']} | {100 * s['median_abs']:.1f} % "
                  f"| {100 * s['p95_abs']:.1f} % | {100 * s['signed_mean']:+.1f} % |")


if __name__ == "__main__":
    main()
