"""Device time of the on-device samplers (``duetjax.core.sampler``) at decode batch sizes over a
real vocabulary: ``sample_basic`` (inside every step), ``sample_full`` (the executable for
steps with top-k/top-p or penalties) and ``with_logprobs``, and of the full sampler's parts:
the top-k/top-p radix select at several radix widths, against a descending sort, the
log-probability top-k, and the penalties.

    python tools/bench_sampler.py --vocab 128256 --batches 1,16,64,256 --out sampler.json

Each figure is the median of 3 rounds of 30 back-to-back calls (no host sync inside a round).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from duetjax.core import sampler  # noqa: E402
from duetjax.core.sampler import PenaltyArrays, SamplingArrays  # noqa: E402


def seconds(fn, *args, calls: int = 30) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - start) / calls)
    return float(np.median(rounds))


def sampling_arrays(rows: int, temperature: float, top_k: int, top_p: float, logprobs: bool) -> SamplingArrays:
    return SamplingArrays(temperature=jnp.full(rows, temperature, jnp.float32),
                          top_k=jnp.full(rows, top_k, jnp.int32), top_p=jnp.full(rows, top_p, jnp.float32),
                          min_p=jnp.zeros(rows, jnp.float32), seeds=jnp.arange(rows, dtype=jnp.uint32),
                          counters=jnp.zeros(rows, jnp.int32), want_logprobs=jnp.full(rows, logprobs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--out", required=True)
    p.add_argument("--trace", action="store_true",
                   help="also a device trace of the full sampler at the largest batch, per kernel")
    args = p.parse_args()
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        logits = jax.random.normal(jax.random.key(0), (b, args.vocab), jnp.float32) * 3
        counts = jnp.zeros((b + 1, args.vocab), jnp.int32)
        pen = PenaltyArrays(slots=jnp.arange(1, b + 1), presence=jnp.full(b, 0.5), frequency=jnp.full(b, 0.1),
                            reset=jnp.zeros(b, bool), count=jnp.ones(b, bool))
        row = {"batch": b, "vocab": args.vocab, "sample_ms": {}, "parts_ms": {}}
        row["sample_ms"]["basic: greedy"] = 1e3 * seconds(
            jax.jit(sampler.sample_basic), logits, sampling_arrays(b, 0.0, 0, 1.0, False))
        row["sample_ms"]["basic: temperature 1"] = 1e3 * seconds(
            jax.jit(sampler.sample_basic), logits, sampling_arrays(b, 1.0, 0, 1.0, False))
        s = sampling_arrays(b, 1.0, 50, 0.9, True)
        row["sample_ms"]["full: top_k 50 + top_p 0.9 + penalties"] = 1e3 * seconds(
            jax.jit(sampler.sample_full), logits, counts, s, pen)
        row["sample_ms"]["with_logprobs (top 20)"] = 1e3 * seconds(
            jax.jit(sampler.with_logprobs), logits, jnp.zeros(b, jnp.int32))
        for bits in (1, 2, 4, 8):
            sampler.RADIX_BITS = bits
            row["parts_ms"][f"truncation, radix {bits} bits"] = 1e3 * seconds(jax.jit(sampler.truncated_logits), logits, s)
        sampler.RADIX_BITS = 4
        row["parts_ms"]["descending sort + cumsum (the old truncation)"] = 1e3 * seconds(
            jax.jit(lambda x: jnp.cumsum(jax.nn.softmax(jnp.flip(jnp.sort(x, axis=-1), axis=-1), axis=-1), axis=-1)),
            logits)
        row["parts_ms"]["log_softmax + top_k 20"] = 1e3 * seconds(
            jax.jit(lambda x: jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), 20)), logits)
        row["parts_ms"]["categorical (threefry gumbel)"] = 1e3 * seconds(
            jax.jit(lambda x: jax.vmap(jax.random.categorical)(jax.random.split(jax.random.key(1), b), x)), logits)
        row["parts_ms"]["penalties"] = 1e3 * seconds(jax.jit(sampler.apply_penalties), logits, counts, pen)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "command": " ".join(sys.argv), "rows": rows}
    if args.trace:
        report["full_sampler_trace"] = trace_full_sampler(args.vocab, max(int(x) for x in args.batches.split(",")))
        print(json.dumps(report["full_sampler_trace"].get("top_kernels", [])[:15], indent=0), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def trace_full_sampler(vocab: int, b: int, calls: int = 10) -> dict:
    import glob
    import gzip
    import tempfile

    from profile_step import kernel_summary

    logits = jax.random.normal(jax.random.key(0), (b, vocab), jnp.float32) * 3
    counts = jnp.zeros((b + 1, vocab), jnp.int32)
    pen = PenaltyArrays(slots=jnp.arange(1, b + 1), presence=jnp.full(b, 0.5), frequency=jnp.full(b, 0.1),
                        reset=jnp.zeros(b, bool), count=jnp.ones(b, bool))
    fn = jax.jit(sampler.sample_full)
    s = sampling_arrays(b, 1.0, 50, 0.9, True)
    jax.block_until_ready(fn(logits, counts, s, pen))
    directory = tempfile.mkdtemp(prefix="duetjax-trace-")
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(calls):
            out = fn(logits, counts, s, pen)
        jax.block_until_ready(out)
    [path] = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    return kernel_summary(trace["traceEvents"] if isinstance(trace, dict) else trace, calls)


if __name__ == "__main__":
    main()
