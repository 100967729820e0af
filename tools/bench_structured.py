"""What structured outputs cost the engine: ``--batch`` free requests decoding alone, then the
same with ``--constrained`` of them under a grammar (a regex that never completes early, so
every request runs ``--max-tokens`` tokens).

While a constrained request decodes, each step waits for the previous step's tokens before it
is scheduled (its token mask needs them): the host's work between steps is no longer hidden
behind the device. The run reports, for both: wall time per step, output tokens/s, the
engine's host time per step and its wait on the device, and the constrained requests' time
per output token against the free ones'.

    python tools/bench_structured.py --dtype bfloat16 --out structured.json --table structured.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from duetjax import Engine, SamplingParams  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."
CONSTRAINT = {"regex": "[a-z ]{4000}"}  # (longer than any run: the grammar never completes)


def run(engine: Engine, batch: int, constrained: int, max_tokens: int) -> dict:
    """One ``generate`` of ``batch`` requests, the first ``constrained`` of them constrained."""
    free = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    bound = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                           structured_outputs=CONSTRAINT)
    params = [bound] * constrained + [free] * (batch - constrained)
    before = engine.stats().loop
    start = time.perf_counter()
    outputs = engine.generate([PROMPT] * batch, params, use_tqdm=False)
    wall = time.perf_counter() - start
    stats = engine.stats().loop.since(before)
    steps = stats.steps
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs), "a request ended early"

    def tpot_ms(group) -> float | None:
        times = [np.diff(o.metrics.token_times).mean() for o in group if len(o.metrics.token_times) > 1]
        return float(1e3 * np.mean(times)) if times else None

    return {"batch": batch, "constrained": constrained, "max_tokens": max_tokens,
            "wall_s": wall, "steps": steps, "ms_per_step": 1e3 * wall / max(steps, 1),
            "output_tokens_per_s": tokens / wall,
            "host_ms_per_step": 1e3 * stats.host_seconds / max(steps, 1),
            "wait_ms_per_step": 1e3 * stats.wait_seconds / max(steps, 1),
            "tpot_ms_constrained": tpot_ms(outputs[:constrained]),
            "tpot_ms_free": tpot_ms(outputs[constrained:])}


def markdown(report: dict) -> str:
    lines = [f"# Structured outputs' cost: {report['model']} ({report['device']}, {report['date']})",
             "", f"jax {report['jax']}; command: `{report['command']}`", "",
             "| batch | constrained | ms/step | output tok/s | host ms/step | wait ms/step "
             "| TPOT constrained ms | TPOT free ms |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        def f(x):
            return "-" if x is None else f"{x:.2f}"
        lines.append(f"| {r['batch']} | {r['constrained']} | {r['ms_per_step']:.2f} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['host_ms_per_step']:.3f} | "
                     f"{r['wait_ms_per_step']:.2f} | {f(r['tpot_ms_constrained'])} | "
                     f"{f(r['tpot_ms_free'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a directory or GGUF with a tokenizer (default: "
                   "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--constrained", default="0,1,8", help="constrained requests per run")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting (the last counts)")
    p.add_argument("--out")
    p.add_argument("--table")
    args = p.parse_args()
    engine = Engine(args.model, dtype=args.dtype, max_num_seqs=args.batch, show_progress=False)
    runs = []
    for constrained in (int(c) for c in args.constrained.split(",")):
        for _ in range(args.repeats):  # (the first run also warms the grammar compiler)
            row = run(engine, args.batch, constrained, args.max_tokens)
        print(json.dumps(row), flush=True)
        runs.append(row)
    report = {"model": str(engine.model_path), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
