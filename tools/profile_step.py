"""Where a step's time goes: decode step time under layer-loop variants, an op census of the
compiled decode executable (copies, dynamic slices, GEMM calls), a device trace of decode steps
summed per GPU kernel and kernel class (``--trace``: where the step's device time goes and how
much of the step the GPU sits idle between kernels), and a cProfile of the host loop. For
diagnosing gaps to the roofline; ``bench_engine.py`` reports the figures.

It measures below the public API on purpose: it dispatches batches on the engine's model
runner (as ``bench_engine.py``'s decode section does) and reads a compiled executable's HLO
from the runner's executable table.

    python tools/profile_step.py --model llama-3-8b --unroll 1,32 --trace --out-dir OUT
    python tools/profile_step.py --model llama-3-8b --unroll 32 --batches 64 --trace-prefill 2048,8192
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import glob
import gzip
import io
import json
import os
import pstats
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_engine import synthetic_batch, time_steps  # noqa: E402
from fp8_gemm_check import fp8_gemm_census, fp8_weight_shapes  # noqa: E402
from duetjax import Engine, SamplingParams  # noqa: E402
from duetjax.core.model_runner import InFlight  # noqa: E402
from duetjax.core.step_inputs import Bucket, bucket_for, build_inputs  # noqa: E402

OPS = re.compile(r" (copy|dynamic-slice|dynamic-update-slice|custom-call|fusion|while|scatter|"
                 r"gather|sort)\(")


KERNEL_CLASSES = (  # first match wins; names as CUPTI reports them for XLA:GPU and Pallas/Triton
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|wgmma|matmul|dot", re.I)),
    ("attention", re.compile(r"attention|paged|pallas|flash", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|dynamic.slice|dynamic_slice|transpose", re.I)),
    ("reduce/sort", re.compile(r"reduce|sort|topk|top_k|argmax|scan", re.I)),
)


def kernel_class(name: str) -> str:
    for label, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return label
    return "elementwise/other fusion"


def kernel_summary(events: list[dict], steps: int, top: int = 25) -> dict:
    """Per-step device time by kernel and by class from Chrome-trace events of ``steps`` steps:
    the GPU processes' complete ('X') events are kernels and copies. ``busy_ms`` is the union of
    their intervals, ``span_ms`` first start to last end, so ``idle`` is the share of the span
    with no kernel running (launch gaps, host waits)."""
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and e.get("dur")]
    if not kernels:
        return {"kernels": 0}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in kernels)
    busy, (start, end, last) = 0.0, spans[0]
    gaps = []  # (idle microseconds, kernel before, kernel after)
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, last, name))
            start, end = s, e
        elif e > end:
            end = e
        if e >= end:
            last = name
    busy += end - start
    span = max(e for _, e, _ in spans) - spans[0][0]
    edges = (2, 5, 10, 50, 200, 1000, float("inf"))
    histogram = {}
    for low, high in zip((0,) + edges[:-1], edges):
        inside = [g for g, _, _ in gaps if low <= g < high]
        histogram[f"{low}-{high} us"] = {"count_per_step": len(inside) / steps,
                                         "ms_per_step": sum(inside) * 1e-3 / steps}
    host: Counter = Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu_pids and e.get("dur"):
            host[e["name"]] += float(e["dur"])
    by_name: Counter = Counter()
    count: Counter = Counter()
    for e in kernels:
        by_name[e["name"]] += float(e["dur"])
        count[e["name"]] += 1
    by_class: Counter = Counter()
    for name, us in by_name.items():
        by_class[kernel_class(name)] += us
    per = 1e-3 / steps  # microseconds in total -> milliseconds per step
    return {"steps": steps, "kernels_per_step": len(kernels) / steps, "span_ms": span * per,
            "busy_ms": busy * per, "idle": 1 - busy / span if span else 0.0,
            "by_class_ms": {k: v * per for k, v in by_class.most_common()},
            "idle_gaps": histogram,
            "largest_gaps": [{"us": g, "after": a[:80], "before": b[:80]}
                             for g, a, b in sorted(gaps, reverse=True)[:8]],
            "host_events_ms": {n[:100]: us * per for n, us in host.most_common(20)},
            "top_kernels": [{"name": n[:120], "class": kernel_class(n), "ms": us * per,
                             "calls": count[n] / steps} for n, us in by_name.most_common(top)]}


def trace_decode(engine: Engine, batch_size: int, context: int, steps: int, top: int = 25) -> dict:
    """A profiler trace of ``steps`` back-to-back decode steps, summarised by kernel_summary."""
    return trace_steps(engine, synthetic_batch(engine, [context - 1] * batch_size, [1] * batch_size),
                       steps, top)


def trace_prefill(engine: Engine, tokens: int, steps: int, top: int = 25) -> dict:
    """The same for a prefill step of ``tokens`` new tokens of one fresh sequence."""
    return trace_steps(engine, synthetic_batch(engine, [0], [tokens]), steps, top)


def trace_steps(engine: Engine, batch, steps: int, top: int) -> dict:
    """A profiler trace of ``steps`` back-to-back dispatches of ``batch`` (each feeding the next
    on the device), summarised by kernel_summary; frees the batch's pages after."""
    import tempfile

    import jax

    runner = engine.runner
    try:
        previous = runner.dispatch(batch, None)
        previous.fetch()
        trace_dir = tempfile.mkdtemp(prefix="duetjax-trace-")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                previous = runner.dispatch(batch, previous)
            previous.fetch()
    finally:
        for item in batch.scheduled:
            engine.scheduler.blocks.free(item.request)
    [path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return kernel_summary(events, steps, top)


def census(hlo: str) -> dict[str, int]:
    return dict(Counter(m.group(1) for m in OPS.finditer(hlo)))


def dispatch_probe(engine: Engine, batch_size: int, context: int) -> None:
    """Does launching block? Host seconds per launch (inputs built beforehand; the launch
    packs them into one buffer and copies it), with several steps already in flight."""
    import time

    runner = engine.runner
    batch = synthetic_batch(engine, [context - 1] * batch_size, [1] * batch_size)
    bucket = bucket_for(batch, engine.config)
    previous = runner.dispatch(batch, None)
    previous.fetch()
    host_inputs = build_inputs(bucket, batch, runner.page_size, runner.max_pages_per_seq)

    def launch(inputs):
        nonlocal previous
        sampled, last, _ = runner.execute(bucket, inputs, previous.last_tokens)
        previous = InFlight(batch, sampled, last)

    for name, prepare in (("numpy inputs", lambda: host_inputs),):
        for _ in range(4):
            launch(prepare())  # fill the queue
        put = call = 0.0
        for _ in range(10):
            start = time.perf_counter()
            inputs = prepare()
            middle = time.perf_counter()
            launch(inputs)
            put += middle - start
            call += time.perf_counter() - middle
        previous.fetch()
        print(f"[dispatch probe B={batch_size}] {name}: prepare {1e3 * put / 10:.3f} ms, "
              f"launch {1e3 * call / 10:.3f} ms per step", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--unroll", default="1")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--profile-host", action="store_true")
    p.add_argument("--trace", action="store_true", help="device trace of decode steps per kernel")
    p.add_argument("--gemm-backend", default="cublas", help="EngineConfig.gemm_backend")
    p.add_argument("--dispatch-probe", action="store_true",
                   help="host time of launching a step while others are in flight")
    p.add_argument("--top-kernels", type=int, default=25, help="kernels listed per trace")
    p.add_argument("--trace-prefill", default="",
                   help="comma list of prefill token counts to trace too (e.g. 2048,8192)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: 2048, or the longest traced prefill (sets the block tables' "
                        "width, which the decode kernel's split count follows)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool tokens (default: enough for the batches); 0: "
                        "EngineConfig.kv_cache_memory_fraction of the free GPU memory")
    p.add_argument("--quantization", default=None, help="EngineConfig.quantization (fp8)")
    p.add_argument("--fp8-activation", default="dynamic", help="EngineConfig.fp8_activation")
    p.add_argument("--kv-cache-dtype", default="auto", help="EngineConfig.kv_cache_dtype")
    p.add_argument("--out-dir", default=".")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [int(t) for t in args.trace_prefill.split(",") if t]
    tag = "_".join(filter(None, [args.gemm_backend, os.environ.get("XLA_FLAGS", "") and "xlaflags",
                                 args.quantization and f"{args.quantization}-{args.fp8_activation}",
                                 args.kv_cache_dtype != "auto" and f"kv-{args.kv_cache_dtype}"]))
    for unroll in (int(u) for u in args.unroll.split(",")):
        longest = args.max_model_len or max([2048] + [t + 16 for t in prefills])
        pool = args.kv_cache_tokens
        if pool is None:
            pool = max(batches) * 2048 + longest + 4096
        engine = Engine(args.model, dtype="bfloat16", load_format="dummy", max_num_seqs=max(batches),
                        max_num_batched_tokens=max([256, max(batches)] + prefills),
                        max_model_len=longest, kv_cache_tokens=pool or None,
                        scan_unroll=unroll,
                        gemm_backend=args.gemm_backend, quantization=args.quantization,
                        fp8_activation=args.fp8_activation, kv_cache_dtype=args.kv_cache_dtype,
                        compile_on_start=False, show_progress=False)
        for b in batches:
            t = time_steps(engine, synthetic_batch(engine, [args.context - 1] * b, [1] * b), steps=20)
            print(f"[{tag or 'plain'} unroll={unroll}] decode B={b}: {1e3 * t:.2f} ms/step", flush=True)
        print(f"[{tag or 'plain'} unroll={unroll}] compiled {len(engine.compiled_buckets())} buckets in "
              f"{engine.stats().compile_seconds:.1f} s", flush=True)
        first = Bucket(True, batches[0], batches[0])
        hlo = engine.runner._executables[first].as_text()
        print(f"[{tag or 'plain'} unroll={unroll}] decode B={batches[0]} op census: {census(hlo)}",
              flush=True)
        if args.quantization:
            print(f"[{tag} unroll={unroll}] decode B={batches[0]} FP8 census: "
                  f"{fp8_gemm_census(hlo, fp8_weight_shapes(engine.runner.params))}", flush=True)
        name = f"decode_b{batches[0]}_unroll{unroll}{'_' + tag if tag else ''}.hlo"
        with open(os.path.join(args.out_dir, name), "w") as f:
            f.write(hlo)
        if args.trace:
            for b in batches:
                summary = trace_decode(engine, b, args.context, 10, args.top_kernels)
                summary.update({"batch": b, "unroll": unroll, "xla_flags": os.environ.get("XLA_FLAGS", "")})
                print(f"[{tag or 'plain'} unroll={unroll}] decode B={b} trace: {summary['span_ms']:.2f} ms "
                      f"span, {summary['busy_ms']:.2f} ms busy ({100 * summary['idle']:.0f} % idle), "
                      f"{summary['kernels_per_step']:.0f} kernels/step; by class "
                      f"{json.dumps({k: round(v, 3) for k, v in summary['by_class_ms'].items()})}; gaps "
                      f"{json.dumps({k: round(v['ms_per_step'], 3) for k, v in summary['idle_gaps'].items()})}",
                      flush=True)
                with open(os.path.join(args.out_dir, f"trace_b{b}_unroll{unroll}{'_' + tag if tag else ''}.json"), "w") as f:
                    json.dump(summary, f, indent=1)
        for tokens in prefills:
            summary = trace_prefill(engine, tokens, 3, args.top_kernels)
            summary.update({"prefill_tokens": tokens, "unroll": unroll,
                            "xla_flags": os.environ.get("XLA_FLAGS", "")})
            if "span_ms" in summary:
                print(f"[{tag or 'plain'} unroll={unroll}] prefill {tokens} trace: "
                      f"{summary['span_ms']:.2f} ms span, {summary['busy_ms']:.2f} ms busy; by class "
                      f"{json.dumps({k: round(v, 3) for k, v in summary['by_class_ms'].items()})}",
                      flush=True)
            with open(os.path.join(args.out_dir, f"trace_prefill{tokens}_unroll{unroll}{'_' + tag if tag else ''}.json"), "w") as f:
                json.dump(summary, f, indent=1)
        if args.dispatch_probe:
            dispatch_probe(engine, max(batches), args.context)
        if args.profile_host:
            rng = np.random.default_rng(0)
            vocab = engine.vocab_size
            prompts = [{"prompt_token_ids": rng.integers(0, vocab, 128).tolist()} for _ in range(64)]
            params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
            engine.generate(prompts, params, use_tqdm=False)
            before = engine.stats().loop
            profiler = cProfile.Profile()
            profiler.enable()
            engine.generate(prompts, params, use_tqdm=False)
            profiler.disable()
            loop = engine.stats().loop.since(before)
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
            print(f"host ms/step {loop.host_ms_per_step:.2f}, wait "
                  f"{1e3 * loop.wait_seconds / loop.steps:.2f} ms/step")
            print(text.getvalue()[:12000], flush=True)
        del engine
        gc.collect()


if __name__ == "__main__":
    main()
