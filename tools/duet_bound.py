"""The roofline's bound on serving capacity: the highest arrival rate each way of serving can
sustain with its time between tokens (TBT) within an SLO, aggregated against split. Plain
Python on the committed profile, on CPU:

    python tools/duet_bound.py --model-config models/configs/llama-3-8b \\
        --profile duetjax/perf/profiles/nvidia-h100-80gb-hbm3.json \\
        --datasets azure-code,azure-conversation,mooncake --tbt-slos-ms 50,25 \\
        --kv-cache-tokens 131072 --out bound.json --table bound.md

A workload is its mean prompt P and output D (from ``bench_duet``'s length samples). In steady
state at arrival rate λ, Little's law gives the decode batch B = λ·D·t when each request
decodes one token per step of t seconds.

Aggregated at a token budget b: at capacity every step is full (B decodes and b − B prefill
tokens) and prefill keeps pace, λ·P = (b − B)/t, so B = b·D/(P + D) and

    λ_max = b / ((P + D) · t_mixed(b − B prefill tokens, B decodes)),

held within the SLO when that step fits it. The best aggregated engine takes the largest
budget whose step fits (more tokens per weight read); the SLO-aware engine aims at the SLO
less its headroom.

Split on MPS shares (S_p, S_d): the decode worker steps on its own, t_d(B) ≤ SLO caps the
batch at B_slo, so λ ≤ B_slo / (D · t_d(B_slo)); the prefill worker runs full chunks of c
tokens, λ ≤ c / (P · t_p(c)). Both under the profile's interference factors of the pair, and
with the decode worker never idle (the ideal of the carry-stream ending): an upper bound for
the engine's split mode.

The ratio of the two is where spatial multiplexing can win: the share of an aggregated step
spent reading weights and KV for decodes (which the decode worker does on a few SMs) against
what the SM split and the interference cost the prefill GEMMs.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from duetjax.perf.roofline import DeviceProfile, ModelShape, Roofline  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from tools.bench_duet import sample_lengths  # noqa: E402

DEFAULT_PAIRS = ((0.8, 0.2), (0.7, 0.3), (0.6, 0.4), (0.5, 0.5))


@dataclasses.dataclass(frozen=True)
class Workload:
    """Mean lengths of a workload's requests."""

    name: str
    prompt: float
    """Mean prompt tokens P."""
    output: float
    """Mean output tokens D."""
    decode_context: float
    """Mean context of a decoding request, weighted by the time it spends decoding."""

    @classmethod
    def from_lengths(cls, name: str, lengths: Sequence[tuple[int, int]]) -> "Workload":
        n = len(lengths)
        prompt = sum(p for p, _ in lengths) / n
        output = sum(o for _, o in lengths) / n
        # A request decodes D steps at contexts P .. P + D: its time-weighted context.
        weighted = sum(o * (p + o / 2) for p, o in lengths) / max(1, sum(o for _, o in lengths))
        return cls(name, prompt, output, weighted)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What bounds the decode batch besides the SLO."""

    max_num_seqs: int
    """Requests running at once."""
    kv_cache_tokens: int
    """Tokens the KV pool holds; decoding requests hold their context."""

    def max_decodes(self, workload: Workload) -> int:
        return max(1, min(self.max_num_seqs, int(self.kv_cache_tokens // workload.decode_context)))


def prefill_chunks(tokens: int, prompt: float) -> list[tuple[int, int]]:
    """``tokens`` of prefill as (chunk, cached) pairs: whole prompts of P tokens, then a chunk
    of one at its average cached prefix (a chunk sits anywhere in its prompt)."""
    chunks = []
    whole = int(prompt)
    while tokens >= whole > 0:
        chunks.append((whole, 0))
        tokens -= whole
    if tokens > 0:
        chunks.append((tokens, int(max(0.0, prompt - tokens) / 2)))
    return chunks


def aggregated_point(roofline: Roofline, workload: Workload, limits: Limits,
                     budget: int) -> dict[str, Any]:
    """Capacity of aggregated serving at a fixed token budget."""
    p, d = workload.prompt, workload.output
    decodes = min(limits.max_decodes(workload), max(1, round(budget * d / (p + d))))
    prefill = max(1, budget - decodes)
    step = roofline.predict_mixed(prefill_chunks(prefill, p), [int(workload.decode_context)] * decodes)
    decode_alone = roofline.predict_decode([int(workload.decode_context)] * decodes)
    # The prefill pace and the decode pace, whichever binds (a capped batch binds decode).
    rate = min(prefill / (p * step), decodes / (d * step))
    return {"budget": budget, "decodes": decodes, "step_ms": 1e3 * step,
            "decode_share": decode_alone / step, "req_s": rate}


def best_aggregated(roofline: Roofline, workload: Workload, limits: Limits, slo_s: float,
                    budgets: Sequence[int]) -> dict[str, Any] | None:
    """The budget with the highest capacity whose step fits ``slo_s``; None when none does."""
    fitting = [point for point in (aggregated_point(roofline, workload, limits, b) for b in budgets)
               if point["step_ms"] <= 1e3 * slo_s]
    return max(fitting, key=lambda point: point["req_s"], default=None)


def split_point(roofline: Roofline, workload: Workload, limits: Limits, slo_s: float,
                s_p: float, s_d: float, prefill_tokens: int) -> dict[str, Any] | None:
    """Capacity of split serving on the (s_p, s_d) pair; None when one decode step misses."""
    context = int(workload.decode_context)
    chunks = prefill_chunks(prefill_tokens, workload.prompt)

    def decode_step(batch: int) -> float:
        return roofline.predict_split(chunks, [context] * batch, s_p, s_d)[1]

    low, high = 0, limits.max_decodes(workload)  # the largest batch whose step fits
    while low < high:
        mid = (low + high + 1) // 2
        if decode_step(mid) <= slo_s:
            low = mid
        else:
            high = mid - 1
    if low == 0:
        return None
    t_p, t_d = roofline.predict_split(chunks, [context] * low, s_p, s_d)
    prefill_rate = prefill_tokens / (workload.prompt * t_p)
    decode_rate = low / (workload.output * t_d)
    return {"pair": f"{round(100 * s_p)}/{round(100 * s_d)}", "max_decodes": low,
            "decode_step_ms": 1e3 * t_d, "prefill_chunk_ms": 1e3 * t_p,
            "prefill_req_s": prefill_rate, "decode_req_s": decode_rate,
            "req_s": min(prefill_rate, decode_rate)}


def best_split(roofline: Roofline, workload: Workload, limits: Limits, slo_s: float,
               pairs: Sequence[tuple[float, float]], prefill_tokens: int) -> dict[str, Any] | None:
    points = [split_point(roofline, workload, limits, slo_s, s_p, s_d, prefill_tokens)
              for s_p, s_d in pairs]
    return max((p for p in points if p is not None), key=lambda p: p["req_s"], default=None)


def bound(roofline: Roofline, workload: Workload, limits: Limits, slo_ms: float,
          budgets: Sequence[int], headroom: float, pairs: Sequence[tuple[float, float]],
          prefill_tokens: int) -> dict[str, Any]:
    slo_s = slo_ms / 1e3
    aggregated = best_aggregated(roofline, workload, limits, slo_s, budgets)
    slo_aware = best_aggregated(roofline, workload, limits, slo_s * (1 - headroom), budgets)
    split = best_split(roofline, workload, limits, slo_s, pairs, prefill_tokens)
    ratio = (split["req_s"] / aggregated["req_s"]
             if split is not None and aggregated is not None else None)
    return {"workload": dataclasses.asdict(workload), "tbt_slo_ms": slo_ms,
            "best_aggregated": aggregated, "slo_aware": slo_aware, "split": split,
            "split_over_best_aggregated": ratio}


def _cell(point: dict[str, Any] | None, *keys: str) -> str:
    if point is None:
        return "none fits"
    return ", ".join(f"{point[k]:.2f}" if isinstance(point[k], float) else str(point[k])
                     for k in keys)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Roofline capacity bound, {report['profile']} profile"
        f"{'' if report['interference'] else ' without its interference factors'}, {report['model']}, "
        f"KV {report['kv_cache_tokens']} tokens, at most {report['max_num_seqs']} sequences.",
        "",
        "| workload (P in / D out) | SLO ms | best aggregated: budget, decodes, step ms, "
        "decode share, req/s | SLO-aware (headroom): budget, req/s | split (ideal): pair, "
        "decodes, decode step ms, prefill req/s, req/s | split / best aggregated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        w = row["workload"]
        ratio = row["split_over_best_aggregated"]
        lines.append(
            f"| {w['name']} ({w['prompt']:.0f} / {w['output']:.0f}) | {row['tbt_slo_ms']:g} | "
            f"{_cell(row['best_aggregated'], 'budget', 'decodes', 'step_ms', 'decode_share', 'req_s')} | "
            f"{_cell(row['slo_aware'], 'budget', 'req_s')} | "
            f"{_cell(row['split'], 'pair', 'max_decodes', 'decode_step_ms', 'prefill_req_s', 'req_s')} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="models/configs/llama-3-8b",
                   help="a directory with an HF config.json")
    p.add_argument("--profile", default="duetjax/perf/profiles/nvidia-h100-80gb-hbm3.json")
    p.add_argument("--datasets", default="azure-code,azure-conversation,mooncake")
    p.add_argument("--workloads", default="",
                   help="more workloads as NAME:P:D (mean prompt and output tokens), comma-separated")
    p.add_argument("--no-interference", action="store_true",
                   help="ignore the profile's interference factors: the ceiling of the mechanism "
                        "if co-running clients did not slow each other")
    p.add_argument("--tbt-slos-ms", default="50,25")
    p.add_argument("--budgets", default="256,512,1024,2048,4096",
                   help="aggregated token budgets to choose from")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of the SLO the SLO-aware engine keeps free")
    p.add_argument("--pairs", default="80/20,70/30,60/40,50/50", help="S_p/S_d pairs, percent")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="the prefill worker's chunk")
    p.add_argument("--kv-cache-tokens", type=int, default=131072)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--samples", type=int, default=2000, help="length samples per workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--table", type=Path, default=None, help="markdown table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = ModelConfig.from_hf(json.loads((Path(args.model_config) / "config.json").read_text()))
    profile = DeviceProfile.from_json(args.profile)
    if args.no_interference:
        profile = dataclasses.replace(profile, interference=())
    roofline = Roofline(ModelShape.from_config(config), profile)
    limits = Limits(args.max_num_seqs, args.kv_cache_tokens)
    pairs = [tuple(int(x) / 100 for x in pair.split("/")) for pair in args.pairs.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    workloads = [Workload.from_lengths(dataset, sample_lengths(
        dataset, args.samples, 1.0, 1.0, args.max_model_len, args.seed))
        for dataset in filter(None, args.datasets.split(","))]
    for spec in filter(None, args.workloads.split(",")):
        name, prompt, output = spec.split(":")
        workloads.append(Workload(name, float(prompt), float(output),
                                  float(prompt) + float(output) / 2))
    rows = []
    for workload in workloads:
        for slo_ms in (float(s) for s in args.tbt_slos_ms.split(",")):
            rows.append(bound(roofline, workload, limits, slo_ms, budgets, args.headroom, pairs,
                              args.prefill_tokens))
    report = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "profile": profile.gpu_name, "model": Path(args.model_config).name,
              "interference": not args.no_interference,
              "kv_cache_tokens": args.kv_cache_tokens, "max_num_seqs": args.max_num_seqs,
              "rows": rows}
    text = markdown(report)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.table:
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
