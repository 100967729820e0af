"""Host overhead per step of the engine's loop, on CPU: ``bench_engine.py``'s host section
(``Engine.generate`` of 64 prompts of 128 random token ids, greedy, ignore_eos, after a warm-up
run of the same shapes) on a small random Llama, for each k of ``--decode-steps``. Prints
``LoopStats.host_ms_per_step`` (best and median of ``--repeats`` runs) and a cProfile of one
more run, top functions by own time.

The host work (scheduling, input preparation, output processing) is the same Python whatever
the device, so the CPU ranks its hotspots; absolute figures differ from a GPU machine's. On a
small CPU the XLA threads running the model compete with the host thread, which makes the
figures noisy: ``--null-device`` replaces the step executables by stubs that return at once
(every sampled token is 3), which leaves the host work alone on the CPU: steady figures for
before/after comparisons.

    python tools/profile_host.py --decode-steps 1,4 --null-device --top 30
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from duetjax import Engine, SamplingParams  # noqa: E402
from duetjax.core.sampler import SampledTokens  # noqa: E402
from duetjax.core.step_inputs import Bucket  # noqa: E402
from duetjax.gc_pauses import freeze_startup_heap  # noqa: E402
from duetjax.sampling_params import MAX_LOGPROBS  # noqa: E402

TINY_LLAMA = json.loads((Path(__file__).parents[1] / "models" / "configs" / "tiny-llama"
                         / "config.json").read_text())
"""The model: a small one, so that the host's work dominates (its random weights are made by
``load_format="dummy"``)."""


class NullExecutables(dict):
    """Stand-ins for every compiled step (``ModelRunner._executables``): numpy results at once."""

    def get(self, b: Bucket, default=None):
        return functools.partial(null_step, b)


def null_step(b: Bucket, params, kv_pool, previous, packed) -> tuple:
    shape = (b.steps, b.num_seqs) if b.multi_step else (b.num_seqs,)
    sampled = SampledTokens(np.full(shape, 3, np.int32), np.zeros(shape, np.float32),
                            np.zeros((*shape, MAX_LOGPROBS), np.int32),
                            np.zeros((*shape, MAX_LOGPROBS), np.float32))
    last = np.full(len(previous), 3, np.int32)
    return (sampled, last, kv_pool) if b.multi_step else (sampled, last, kv_pool, None, None)


def run(engine: Engine, batch: int, prompt_len: int, max_tokens: int, seed: int) -> float:
    """One ``generate`` of fresh random prompts (no prefix-cache hits); its wall seconds."""
    rng = np.random.default_rng(seed)
    vocab = engine.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, prompt_len).tolist()} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode-steps", default="1,4", help="EngineConfig.decode_steps values to run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024,
                   help="block-table width (bench_engine uses 8208; wider only slows the CPU model)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per k")
    p.add_argument("--top", type=int, default=30, help="profile rows (0: no profile)")
    p.add_argument("--null-device", action="store_true", help="no model: stub executables")
    args = p.parse_args(argv)
    config = dict(TINY_LLAMA, max_position_embeddings=args.max_model_len)
    kv_tokens = args.batch * (args.prompt_len + args.max_tokens + 16)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)  # config.json only: load_format="dummy" makes the weights
        (model_dir / "config.json").write_text(json.dumps(config))
        for k in (int(x) for x in args.decode_steps.split(",")):
            engine = Engine(model_dir, dtype="float32", load_format="dummy",
                            max_num_seqs=args.batch,
                            max_num_batched_tokens=args.batch * args.prompt_len,
                            max_model_len=args.max_model_len, kv_cache_tokens=kv_tokens,
                            decode_steps=k, max_decode_steps=max(8, k),
                            compile_on_start=False, show_progress=False)
            if args.null_device:  # (an internal hook on purpose: no public API swaps executables)
                engine.runner._executables = NullExecutables()
            run(engine, args.batch, args.prompt_len, args.max_tokens, seed=1)  # compiles
            freeze_startup_heap()  # as the server does once it is up
            hosts, walls, parts = [], [], {}
            for repeat in range(args.repeats):
                before = engine.stats().loop
                walls.append(run(engine, args.batch, args.prompt_len, args.max_tokens, seed=2 + repeat))
                s = engine.stats().loop.since(before)
                hosts.append(s.host_ms_per_step)
                if hosts[-1] == min(hosts):
                    parts = {part: 1e3 * getattr(s, f"{part}_seconds") / s.steps
                             for part in ("schedule", "prepare", "launch_bookkeeping", "apply")}
            print(f"k={k}: host {min(hosts):.3f} ms/step (median {np.median(hosts):.3f}) over "
                  f"{s.steps} steps ({s.dispatches} dispatches), wall {1e3 * min(walls) / s.steps:.2f} "
                  f"ms/step (best of {args.repeats}{', null device' if args.null_device else ''}); "
                  + ", ".join(f"{part} {ms:.3f}" for part, ms in parts.items()), flush=True)
            if args.top:
                profiler = cProfile.Profile()
                profiler.enable()
                run(engine, args.batch, args.prompt_len, args.max_tokens, seed=100)
                profiler.disable()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
                print(text.getvalue(), flush=True)


if __name__ == "__main__":
    main()
