"""Where a step's time goes: decode step time under layer-loop variants, an op census of the
compiled decode executable (copies, dynamic slices, GEMM calls), and a cProfile of the host
loop. For diagnosing gaps to the roofline; ``bench_engine.py`` reports the figures.

    python tools/profile_step.py --model llama-3-8b --unroll 1,32 --out-dir OUT
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_engine import synthetic_batch, time_steps  # noqa: E402
from duetjax import Engine, SamplingParams  # noqa: E402
from duetjax.model_runner import InFlight  # noqa: E402
from duetjax.step_inputs import Bucket, bucket_for, build_inputs  # noqa: E402

OPS = re.compile(r" (copy|dynamic-slice|dynamic-update-slice|custom-call|fusion|while|scatter|"
                 r"gather|sort)\(")


def census(hlo: str) -> dict[str, int]:
    return dict(Counter(m.group(1) for m in OPS.finditer(hlo)))


def dispatch_probe(engine: Engine, batch_size: int, context: int) -> None:
    """Does launching block? Host seconds per launch with numpy inputs, with inputs put on the
    device first, and of the device_put alone, each with several steps already in flight."""
    import time

    import jax

    runner = engine.runner
    batch = synthetic_batch(engine, [context - 1] * batch_size, [1] * batch_size)
    bucket = bucket_for(batch, engine.config)
    previous = runner.dispatch(batch, None)
    previous.fetch()
    host_inputs = build_inputs(bucket, batch, runner.page_size, runner.max_pages_per_seq)

    def launch(inputs):
        nonlocal previous
        sampled, last = runner.execute(bucket, inputs, previous.last_tokens)
        previous = InFlight(batch, sampled, last)

    for name, prepare in (("numpy inputs", lambda: host_inputs),
                          ("device_put inputs", lambda: jax.device_put(host_inputs))):
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
    p.add_argument("--dispatch-probe", action="store_true",
                   help="host time of launching a step while others are in flight")
    p.add_argument("--out-dir", default=".")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tag = os.environ.get("XLA_FLAGS", "") and "xlaflags"
    for unroll in (int(u) for u in args.unroll.split(",")):
        engine = Engine(args.model, dtype="bfloat16", load_format="dummy", max_num_seqs=max(batches),
                        max_num_batched_tokens=max(256, max(batches)), max_model_len=2048,
                        kv_cache_tokens=max(batches) * 2048 + 4096, scan_unroll=unroll,
                        compile_on_start=False, show_progress=False)
        for b in batches:
            t = time_steps(engine, synthetic_batch(engine, [args.context - 1] * b, [1] * b), steps=20)
            print(f"[{tag or 'plain'} unroll={unroll}] decode B={b}: {1e3 * t:.2f} ms/step", flush=True)
        first = Bucket(True, batches[0], batches[0])
        hlo = engine.runner._executables[first].as_text()
        print(f"[{tag or 'plain'} unroll={unroll}] decode B={batches[0]} op census: {census(hlo)}",
              flush=True)
        name = f"decode_b{batches[0]}_unroll{unroll}{'_' + tag if tag else ''}.hlo"
        with open(os.path.join(args.out_dir, name), "w") as f:
            f.write(hlo)
        if args.dispatch_probe:
            dispatch_probe(engine, max(batches), args.context)
        if args.profile_host:
            rng = np.random.default_rng(0)
            vocab = engine.model.config.vocab_size
            prompts = [{"prompt_token_ids": rng.integers(0, vocab, 128).tolist()} for _ in range(64)]
            params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
            engine.generate(prompts, params, use_tqdm=False)
            engine.stats.__init__()
            profiler = cProfile.Profile()
            profiler.enable()
            engine.generate(prompts, params, use_tqdm=False)
            profiler.disable()
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
            print(f"host ms/step {engine.stats.host_ms_per_step:.2f}, wait "
                  f"{1e3 * engine.stats.wait_seconds / engine.stats.steps:.2f} ms/step")
            print(text.getvalue()[:12000], flush=True)
        del engine
        gc.collect()


if __name__ == "__main__":
    main()
