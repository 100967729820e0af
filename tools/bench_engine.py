"""GPU figures of the aggregated engine, against the hardware ceilings measured in the same run.

Sections (``--sections``, default all):
- ``decode``: one decode step (model + sampling, full-width block tables) at several batch
  sizes, every sequence holding ``--context`` tokens of KV, against the HBM roofline
  (weight bytes + KV bytes read, over the measured copy bandwidth).
- ``prefill``: one prompt of 2k / 8k tokens against the measured bf16 matmul rate (model FLOP
  utilisation; attention counted causally).
- ``host``: ``Engine.generate`` at batch 64: host time per step (scheduling, input preparation,
  dispatch, output processing) against the step time.
- ``offline``: ``--num-prompts`` prompts with conversation-like lengths through
  ``Engine.generate``: requests/s and tokens/s.
- ``paris``: the embedded SmolLM2 in bf16 on the GPU kernels answers the capital question.
- ``startup``: process start to a ready engine (all buckets compiled), cold and warm cache,
  and a cold start for each further ``--compile-threads`` value.

Tensor parallelism (``--tensor-parallel-size``, a comma list such as ``1,2``): every weights
variant runs at each group size, labelled ``-tpN`` beyond one device. A step's roofline is one
GPU's: the bytes and FLOPs of its own shards (``device_bytes``), at one GPU's measured copy
and matmul rates; the all-reduces count as overhead.

    python tools/bench_engine.py --model llama-3-8b --sections decode,prefill --batches 1,64 \
        --tensor-parallel-size 1,2 --out tp.json --table tp.md

Layer weights (``--layer-weights``, a comma list): ``auto`` (the default: per-layer for FP8
weights), ``stacked`` and/or ``per-layer`` (``EngineConfig.layer_weights``); every other
variant runs with each (label suffix ``+stacked``, ``+per-layer``; none for auto).

Weights (``--quantization``, a comma list): ``none`` (bf16) and/or ``fp8`` (the linear layers
quantized to FP8 on load, one variant per ``--fp8-activation``: ``dynamic`` W8A8, ``none``
weight-only). The decode and prefill sections run for every variant, one engine after the
other, each decode step against the HBM roofline of its own weights' bytes; the table then
compares each variant's step with the first's. The other sections run on the first variant.
``--dump-hlo DIR`` writes each variant's decode step HLO (batch 1 and the largest batch) and
prints whether it multiplies FP8 weights in FP8 (``fp8_gemm_check.py``).

KV cache (``--kv-cache-dtype``, a comma list): ``auto`` (the model's dtype) and/or ``fp8``
(e4m3); every weights variant runs with each (label suffix ``+fp8kv``), and each decode
step's roofline counts the KV bytes of its own cache. The FP8 target, both FP8 against bf16:

    python tools/bench_engine.py --model llama-3-8b --sections decode --batches 64 \
        --context 1024 --quantization none,fp8 --kv-cache-dtype auto,fp8 \
        --out fp8kv.json --table fp8kv.md

    python tools/bench_engine.py --model llama-3-8b --sections decode,prefill --batches 1,64 \
        --prefill 8192 --quantization none,fp8 --fp8-activation dynamic,none --dump-hlo hlo/ \
        --out fp8.json --table fp8.md

The decode and prefill sections time the model runner's dispatches below the scheduler, so
they build batches on the engine's own runner and block manager (``synthetic_batch``,
``time_steps``); the other sections use the public ``Engine`` API only.

    python tools/bench_engine.py --model llama-3-8b --out engine.json --table engine.md
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from duetjax import Engine, SamplingParams  # noqa: E402
from duetjax.core.request import Request  # noqa: E402
from duetjax.core.scheduler import ScheduledRequest, SchedulerOutput  # noqa: E402
from duetjax.gc_pauses import freeze_startup_heap, gc_pauses  # noqa: E402
from fp8_gemm_check import decode_census  # noqa: E402
from gpu_ceilings import ceilings  # noqa: E402


def log(*args) -> None:
    print(*args, flush=True)


def synthetic_batch(engine: Engine, lengths: list[int], new_tokens: list[int],
                    steps: int = 1) -> SchedulerOutput:
    """Requests whose first ``lengths[i]`` tokens count as computed, with pages for the rest
    (the KV content is whatever the pool holds: timing does not depend on it). ``steps`` > 1:
    a k-step decode (every request must then have one new token)."""
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size
    scheduled = []
    for i, (done, new) in enumerate(zip(lengths, new_tokens)):
        r = Request(f"bench-{i}", rng.integers(0, vocab, done + new).tolist(),
                    SamplingParams(temperature=0.0), seed=i)
        engine.scheduler.blocks.grow(r, done + new + steps - 1)
        r.num_computed_tokens = done
        scheduled.append(ScheduledRequest(r, new, steps))
    return SchedulerOutput(scheduled, [], steps)


def time_steps(engine: Engine, batch: SchedulerOutput, steps: int, rounds: int = 3) -> float:
    """Median seconds of one dispatched step in steady state (each step's tokens feed the
    next on the device, as when serving). A round starts its clock when a step's results
    arrive while the next step already runs, so neither the pipeline's fill nor one host round
    trip is in the figure: it is the interval between results that serving sees."""
    runner = engine.runner
    try:
        previous = runner.dispatch(batch, None)
        previous.fetch()  # compiles the bucket on first use
        times = []
        for _ in range(rounds):
            first = runner.dispatch(batch, previous)
            previous = runner.dispatch(batch, first)
            first.fetch()
            start = time.perf_counter()
            for _ in range(steps):
                previous = runner.dispatch(batch, previous)
            previous.fetch()
            times.append((time.perf_counter() - start) / (steps + 1))
    finally:
        for item in batch.scheduled:
            engine.scheduler.blocks.free(item.request)
    return float(np.median(times))


def weight_bytes(engine: Engine) -> int:
    """Bytes of the engine's weights as they sit on one device (FP8 values and their scales
    for quantized linear layers; with tensor parallelism, the first device's shards)."""
    return device_bytes(engine.runner.params)


def device_bytes(tree) -> int:
    """Bytes of a tree of arrays held by the first device that holds any of them."""
    leaves = jax.tree_util.tree_leaves(tree)
    first = min(d.id for leaf in leaves for d in leaf.sharding.device_set)
    return sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards
               if s.device.id == first)


def kv_bytes_per_token_per_device(engine: Engine) -> float:
    """KV bytes one token occupies on one device (its share of the pool's KV heads)."""
    pool = engine.runner.kv_pool
    return device_bytes(pool) / (pool.shape[1] * pool.shape[4])  # over pages x page size


def decode_section(engine: Engine, ceil: dict, batches: list[int], context: int,
                   steps: int = 1, weights: str = "bf16") -> list[dict]:
    """Per decode step; ``steps`` > 1 times k-step dispatches (the KV read grows by one token
    per step, which the roofline's mean context counts). ``weights``: the variant's label."""
    weights_moved = weight_bytes(engine)
    per_token = kv_bytes_per_token_per_device(engine)
    rows = []
    for b in batches:
        batch = synthetic_batch(engine, [context - 1] * b, [1] * b, steps)
        t = time_steps(engine, batch, steps=max(2, 20 // steps)) / steps
        moved = weights_moved + b * (context + (steps - 1) / 2) * per_token
        floor = moved / (ceil["copy_tb_s"] * 1e12)
        rows.append({"weights": weights, "batch": b, "context": context, "steps_per_dispatch": steps,
                     "step_ms": 1e3 * t, "roofline_ms": 1e3 * floor, "of_roofline": floor / t,
                     "tokens_per_s": b / t})
        log(f"{weights} decode B={b:4d} ctx={context}: {1e3 * t:7.2f} ms/step, roofline {1e3 * floor:6.2f} ms "
            f"({100 * floor / t:5.1f} %), {b / t:9.0f} tok/s")
    return rows


def prefill_section(engine: Engine, ceil: dict, lengths: list[int],
                    weights: str = "bf16") -> list[dict]:
    cfg = engine.model_config
    linear = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    rows = []
    for n in lengths:
        t = time_steps(engine, synthetic_batch(engine, [0], [n]), steps=3)
        attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * (n + 1) / 2
        flops = 2 * linear * n + attention + 2 * cfg.vocab_size * cfg.hidden_size
        mfu = flops / t / (ceil["matmul_tflop_s"] * 1e12 * engine.config.tensor_parallel_size)
        rows.append({"weights": weights, "tokens": n, "seconds": t, "tflop_s": flops / t / 1e12,
                     "mfu": mfu})
        log(f"{weights} prefill {n:5d} tokens: {1e3 * t:8.1f} ms, {flops / t / 1e12:6.1f} TFLOP/s, MFU {100 * mfu:5.1f} %")
    return rows


def measured_host_run(engine: Engine, batch: int, prompts: list[dict], params: SamplingParams) -> dict:
    """One ``generate`` of ``prompts``: where its host loop's time went, per step."""
    before = engine.stats()
    gc_before = gc_pauses().snapshot()
    start = time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    gc_after = gc_pauses().snapshot()
    after = engine.stats()
    assert after.compile_seconds == before.compile_seconds, "the measured run compiled a step"
    stats = after.loop.since(before.loop)
    return {"batch": batch, "steps": stats.steps, "wall_s": wall, "step_ms": 1e3 * wall / stats.steps,
            "host_ms_per_step": stats.host_ms_per_step,
            "launch_ms_per_step": 1e3 * stats.launch_seconds / stats.steps,
            "wait_ms_per_step": 1e3 * stats.wait_seconds / stats.steps,
            "host_share": stats.host_seconds / wall,
            # (inside the host work: collections run wherever the loop allocates)
            "gc_ms_per_step": 1e3 * (gc_after["seconds"] - gc_before["seconds"]) / stats.steps,
            "gc_full_collections": gc_after["full_collections"] - gc_before["full_collections"],
            "host_ms_per_step_by_part": {  # (the rest: the loop itself, outside these parts)
                part: 1e3 * getattr(stats, f"{part}_seconds") / stats.steps
                for part in ("schedule", "prepare", "launch_bookkeeping", "apply")}}


def host_section(engine: Engine, batch: int, prompt_len: int, output_len: int,
                 profile_top: int = 0, repeats: int = 3, freeze: bool = True) -> dict:
    """The warm-up run uses other prompts of the same shapes: the measured runs must neither
    hit the prefix cache nor meet a step shape that is not compiled yet. Of ``repeats``
    measured runs the row is the median one by host work (all are listed). ``profile_top`` > 0
    adds one more run under cProfile (which slows it: the timed run is the one before) and
    keeps its top functions by own time, to rank where the host time goes on this machine."""
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def prompts(seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [{"prompt_token_ids": rng.integers(0, vocab, prompt_len).tolist()} for _ in range(batch)]

    engine.generate(prompts(1), params, use_tqdm=False)
    if freeze:
        freeze_startup_heap()  # as the server does once it is up
    rows = [measured_host_run(engine, batch, prompts(2 + i), params) for i in range(repeats)]
    row = sorted(rows, key=lambda r: r["host_ms_per_step"])[len(rows) // 2]
    row["host_ms_per_step_runs"] = [r["host_ms_per_step"] for r in rows]
    log(f"host loop B={batch}: {row['step_ms']:.2f} ms/step; host work {row['host_ms_per_step']:.3f} ms "
        f"({100 * row['host_share']:.1f} % of wall, garbage collection {row['gc_ms_per_step']:.3f} ms; "
        f"median of {', '.join(f'{ms:.3f}' for ms in row['host_ms_per_step_runs'])}), "
        f"in launch {row['launch_ms_per_step']:.2f} ms, waiting for results {row['wait_ms_per_step']:.2f} ms; "
        + ", ".join(f"{part} {ms:.3f}" for part, ms in row["host_ms_per_step_by_part"].items()))
    if profile_top:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(engine.generate, prompts(2 + repeats), params, use_tqdm=False)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile_top)
        row["profile"] = text.getvalue()
        log(row["profile"])
    return row


def startup_section(model: str, load_format: str, max_num_seqs: int, max_num_batched_tokens: int,
                    compile_threads: tuple[int, ...] = (1,)) -> dict:
    """Seconds from process start to a ready engine (weights loaded, every bucket compiled):
    cold (empty compilation cache) then warm (the cache the cold start filled), with the first
    of ``compile_threads``; then a cold start with each other count
    (``EngineConfig.compile_threads``)."""
    import subprocess
    import tempfile

    def start(threads: int, cache: str) -> dict:
        code = ("import time; t = time.time(); from duetjax import Engine; "
                f"e = Engine({model!r}, load_format={load_format!r}, dtype='bfloat16', "
                f"max_num_seqs={max_num_seqs}, max_num_batched_tokens={max_num_batched_tokens}, "
                f"compile_threads={threads}, show_progress=False); "
                "print('READY', time.time() - t, e.stats().compile_seconds, "
                "len(e.compiled_buckets()))")
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, DUETJAX_CACHE_DIR=cache))
        if done.returncode != 0:
            raise RuntimeError(f"the engine did not start (exit {done.returncode}):\n"
                               f"{done.stderr[-3000:]}")
        ready, compile_s, buckets = done.stdout.split("READY")[-1].split()
        return {"wall_s": time.perf_counter() - began, "ready_s": float(ready),
                "compile_s": float(compile_s), "buckets": int(buckets), "compile_threads": threads}

    row: dict = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                 "cold_by_threads": {}}
    for i, threads in enumerate(compile_threads):
        with tempfile.TemporaryDirectory() as cache:
            for label in ("cold", "warm") if i == 0 else ("cold",):
                run = start(threads, cache)
                if i == 0:
                    row[label] = run
                if label == "cold":
                    row["cold_by_threads"][threads] = run
                log(f"start-up {label}, {threads} compile threads: {run['wall_s']:.1f} s to ready "
                    f"({run['compile_s']:.1f} s compiling {run['buckets']} buckets)")
    return row


def conversation_lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Lognormal lengths with the medians Splitwise reports for Azure conversation traces
    (prompt ~1020 tokens, output ~129), clipped to [16, 4096] / [8, 1024]."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(1020), 0.8, n), 16, 4096).astype(int)
    outputs = np.clip(rng.lognormal(np.log(129), 0.9, n), 8, 1024).astype(int)
    return prompts.tolist(), outputs.tolist()


def offline_section(engine: Engine, num_prompts: int) -> dict:
    prompt_lens, output_lens = conversation_lengths(num_prompts)
    rng = np.random.default_rng(2)
    vocab = engine.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, n).tolist()} for n in prompt_lens]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in output_lens]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    row = {"prompts": num_prompts, "wall_s": wall, "requests_per_s": num_prompts / wall,
           "output_tokens_per_s": generated / wall,
           "total_tokens_per_s": (generated + sum(prompt_lens)) / wall,
           "mean_prompt": float(np.mean(prompt_lens)), "mean_output": float(np.mean(output_lens))}
    log(f"offline {num_prompts} prompts: {wall:.1f} s, {row['requests_per_s']:.2f} req/s, "
        f"{row['output_tokens_per_s']:.0f} output tok/s, {row['total_tokens_per_s']:.0f} total tok/s")
    return row


def paris_section() -> dict:
    engine = Engine(dtype="bfloat16", max_num_seqs=4, compile_on_start=False, show_progress=False)
    out = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    text = out.outputs[0].text
    log(f"SmolLM2 bf16 on {jax.devices()[0].device_kind}: {text!r}")
    return {"text": text, "ok": "Paris" in text}


def markdown(report: dict) -> str:
    lines = [f"# Engine figures: {report['model']} ({report['device']}, {report['date']})", "",
             f"jax {report['jax']}; command: `{report['command']}`", "",
             f"Ceilings: copy {report['ceilings']['copy_tb_s']:.2f} TB/s, bf16 matmul "
             f"{report['ceilings']['matmul_tflop_s']:.0f} TFLOP/s", ""]
    for label, error in report.get("failed", {}).items():
        lines += [f"**{label} failed:** {error}", ""]
    if report.get("decode"):
        lines += ["| weights | decode batch | context | steps per dispatch | ms/step | roofline ms | of roofline | tok/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r.get('weights', 'bf16')} | {r['batch']} | {r['context']} | {r.get('steps_per_dispatch', 1)} | "
                  f"{r['step_ms']:.2f} | {r['roofline_ms']:.2f} | "
                  f"{100 * r['of_roofline']:.1f} % | {r['tokens_per_s']:.0f} |" for r in report["decode"]]
        lines.append("")
    if report.get("prefill"):
        lines += ["| weights | prefill tokens | ms | TFLOP/s | of the bf16 matmul rate |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r.get('weights', 'bf16')} | {r['tokens']} | {1e3 * r['seconds']:.1f} | "
                  f"{r['tflop_s']:.0f} | {100 * r['mfu']:.1f} % |" for r in report["prefill"]]
        lines.append("")
    lines += speedup_lines(report)
    for label, census in report.get("hlo", {}).items():
        lines += [f"HLO of {label}'s decode steps: " + "; ".join(
            f"batch {c['batch']}: {c['cublaslt_f8_calls']} cuBLASLt FP8 GEMMs, {c['f8_dots']} f8 "
            f"dots, {c['weight_upcasts']} weight upcasts, {c.get('weight_copies', 0)} weight "
            f"copies ({'FP8 GEMMs' if c['fp8_gemm'] else 'no FP8 GEMM'})"
            for c in census), ""]
    if report.get("host"):
        h = report["host"]
        lines += [f"Host loop at batch {h['batch']}, {report.get('decode_steps', 1)} decode step(s) per "
                  f"dispatch: {h['step_ms']:.2f} ms/step; Python work "
                  f"{h['host_ms_per_step']:.3f} ms/step ({100 * h['host_share']:.1f} % of wall time), "
                  f"inside the (blocking) launch {h.get('launch_ms_per_step', float('nan')):.2f} ms, "
                  f"waiting for results {h.get('wait_ms_per_step', float('nan')):.2f} ms.", ""]
    if report.get("offline"):
        o = report["offline"]
        lines += [f"Offline: {o['prompts']} prompts (mean {o['mean_prompt']:.0f} in / {o['mean_output']:.0f} out): "
                  f"{o['requests_per_s']:.2f} req/s, {o['output_tokens_per_s']:.0f} output tok/s, "
                  f"{o['total_tokens_per_s']:.0f} total tok/s.", ""]
    if report.get("startup"):
        st = report["startup"]
        lines += [f"Start-up to a ready engine (max_num_seqs {st['max_num_seqs']}, "
                  f"max_num_batched_tokens {st['max_num_batched_tokens']}, {st['cold']['buckets']} "
                  f"buckets): cold {st['cold']['wall_s']:.1f} s ({st['cold']['compile_s']:.1f} s "
                  f"compiling), warm {st['warm']['wall_s']:.1f} s ({st['warm']['compile_s']:.1f} s "
                  "loading from the compilation cache).", ""]
        if len(st.get("cold_by_threads", {})) > 1:
            lines += ["Cold start by compile threads: " + ", ".join(
                f"{t}: {r['wall_s']:.1f} s ({r['compile_s']:.1f} s compiling)"
                for t, r in st["cold_by_threads"].items()) + ".", ""]
    if report.get("paris"):
        lines += [f"SmolLM2 bf16 on the GPU kernels: {report['paris']['text']!r}", ""]
    return "\n".join(lines)


def speedup_lines(report: dict) -> list[str]:
    """Each later weights variant's decode steps and prefills against the first variant's."""
    labels = list(dict.fromkeys(r.get("weights", "bf16") for r in report.get("decode", [])
                                + report.get("prefill", [])))
    if len(labels) < 2:
        return []
    base, lines = labels[0], []
    for label in labels[1:]:
        parts = []
        for section, key, time_key in (("decode", "batch", "step_ms"), ("prefill", "tokens", "seconds")):
            times = {(r.get("weights", "bf16"), r[key]): r[time_key] for r in report.get(section, [])}
            parts += [f"{section} {key} {size}: {times[(base, size)] / times[(label, size)]:.2f}x"
                      for lab, size in times if lab == label and (base, size) in times]
        lines += [f"{label} against {base}: " + ", ".join(parts), ""]
    return lines


def weight_variants(quantizations: str, activations: str) -> list[tuple[str, str | None, str]]:
    """(label, quantization, fp8_activation) of each weights variant the flags ask for."""
    variants = []
    for q in quantizations.split(","):
        if q == "none":
            variants.append(("bf16", None, "dynamic"))
        elif q == "fp8":
            variants += [(f"fp8-{a}", "fp8", a) for a in activations.split(",")]
        else:
            raise SystemExit(f"--quantization takes none and fp8, got {q!r}")
    return variants


def engine_variants(weights: list[tuple[str, str | None, str]],
                    kv_cache_dtypes: str) -> list[tuple[str, str | None, str, str]]:
    """(label, quantization, fp8_activation, kv_cache_dtype): each weights variant with each
    KV cache dtype the flag asks for (an FP8 cache adds ``+fp8kv`` to the label)."""
    kinds = kv_cache_dtypes.split(",")
    for kind in kinds:
        if kind not in ("auto", "fp8"):
            raise SystemExit(f"--kv-cache-dtype takes auto and fp8, got {kind!r}")
    return [(label + ("+fp8kv" if kind == "fp8" else ""), quantization, activation, kind)
            for label, quantization, activation in weights for kind in kinds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--sections", default="paris,decode,prefill,host,offline")
    p.add_argument("--batches", default="1,16,64,128,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", default="2048,8192")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--startup-limits", default="16,512",
                   help="max_num_seqs,max_num_batched_tokens of the start-up section's engine")
    p.add_argument("--compile-threads", default="1",
                   help="start-up section: EngineConfig.compile_threads values, comma-separated "
                        "(a cold start each; the first also warm)")
    p.add_argument("--scan-unroll", type=int, default=None, help="EngineConfig.scan_unroll")
    p.add_argument("--gemm-backend", default="cublas", help="EngineConfig.gemm_backend")
    p.add_argument("--decode-steps", type=int, default=1,
                   help="EngineConfig.decode_steps (k decode steps per dispatch when no request "
                        "needs the full sampler): the host and offline sections run with it")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="EngineConfig.kv_cache_tokens: a fixed KV pool for every variant (a "
                        "pool sized from free memory can fail to fit once an earlier variant's "
                        "freed memory is fragmented); default: --kv-fraction of free memory")
    p.add_argument("--kv-fraction", type=float, default=0.85,
                   help="EngineConfig.kv_cache_memory_fraction")
    p.add_argument("--profile-host", type=int, default=0,
                   help="host section: print this many top functions of a cProfile'd run")
    p.add_argument("--ceiling-gib", type=float, default=2.0, help="size of the copy-bandwidth test")
    p.add_argument("--quantization", default="none",
                   help="weights variants to time, comma-separated: none (bf16), fp8")
    p.add_argument("--fp8-activation", default="dynamic",
                   help="fp8 variants, comma-separated: dynamic (W8A8), none (weight-only)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="KV cache variants, comma-separated: auto (the model's dtype), fp8")
    p.add_argument("--layer-weights", default="auto",
                   help="layer weight variants, comma-separated (EngineConfig.layer_weights): "
                        "auto (per-layer for FP8 weights), stacked (label suffix +stacked), "
                        "per-layer (+per-layer)")
    p.add_argument("--tensor-parallel-size", default="1",
                   help="group sizes to time, comma-separated (EngineConfig.tensor_parallel_size)")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="write each variant's decode step HLO here and report its FP8 GEMMs")
    p.add_argument("--out", required=True)
    p.add_argument("--table", required=True)
    args = p.parse_args()
    sections = set(args.sections.split(","))
    startup = None
    if "startup" in sections:  # first: its engines start in processes that need the whole GPU,
        # and this one holds most of it (XLA preallocates) once it touches the GPU
        seqs, tokens = (int(x) for x in args.startup_limits.split(","))
        startup = startup_section(args.model, args.load_format, seqs, tokens,
                                  tuple(int(t) for t in args.compile_threads.split(",")))
    report = {"model": args.model, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    report["ceilings"] = ceilings(args.ceiling_gib)
    if "paris" in sections:
        report["paris"] = paris_section()
    if startup is not None:
        report["startup"] = startup
    save(report, args)
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.prefill.split(",")]
    report["scan_unroll"] = args.scan_unroll
    report["decode_steps"] = args.decode_steps
    report["gemm_backend"] = args.gemm_backend
    variants = [(label + ("" if tp == 1 else f"-tp{tp}")
                 + ("" if layers == "auto" else f"+{layers}"),
                 quantization, activation, kv_cache_dtype, tp, layers)
                for tp in (int(n) for n in args.tensor_parallel_size.split(","))
                for label, quantization, activation, kv_cache_dtype in engine_variants(
                    weight_variants(args.quantization, args.fp8_activation), args.kv_cache_dtype)
                for layers in args.layer_weights.split(",")]
    if not (sections & {"decode", "prefill", "host", "offline"} or args.dump_hlo):
        variants = []  # nothing to run on an engine of the bench's own
    for i, (label, quantization, activation, kv_cache_dtype, tp, layers) in enumerate(variants):
        try:
            run_variant(args, report, sections, batches, lengths, i, label, quantization,
                        activation, kv_cache_dtype, tp, layers)
        except Exception as e:  # one variant's failure is reported; the others still run
            log(f"{label} failed: {type(e).__name__}: {e}"[:3000])
            report.setdefault("failed", {})[label] = f"{type(e).__name__}: {e}"[:1500]
            save(report, args)
    print(markdown(report))


def run_variant(args, report, sections, batches, lengths, i, label, quantization, activation,
                kv_cache_dtype, tp, layer_weights="auto") -> None:
    """Builds one variant's engine, runs the asked sections on it, then frees it."""
    engine = Engine(args.model, dtype="bfloat16", load_format=args.load_format,
                    tensor_parallel_size=tp, layer_weights=layer_weights,
                    max_num_seqs=max(batches), max_num_batched_tokens=max(lengths),
                    max_model_len=max(max(lengths) + 16, 4096 + 1024),
                    scan_unroll=args.scan_unroll, kv_cache_memory_fraction=args.kv_fraction,
                    kv_cache_tokens=args.kv_cache_tokens,
                    gemm_backend=args.gemm_backend, decode_steps=args.decode_steps,
                    max_decode_steps=max(8, args.decode_steps),
                    quantization=quantization, fp8_activation=activation,
                    kv_cache_dtype=kv_cache_dtype, compile_on_start=False,
                    show_progress=False)
    try:
        report.setdefault("kv_pool_gib", engine.runner.kv_pool.nbytes / 2**30)
        report.setdefault("kv_pool_tokens", {})[label] = (engine.runner.num_pages
                                                          * engine.config.page_size)
        report.setdefault("weight_gib", {})[label] = weight_bytes(engine) / 2**30
        if args.dump_hlo:
            report.setdefault("hlo", {})[label] = [
                decode_census(engine, b, args.dump_hlo, label) for b in sorted({batches[0], max(batches)})]
            log(f"{label} decode HLO: {report['hlo'][label]}")
        runs = {"decode": lambda: decode_section(engine, report["ceilings"], batches, args.context,
                                                 args.decode_steps, label),
                "prefill": lambda: prefill_section(engine, report["ceilings"], lengths, label),
                "host": lambda: host_section(engine, 64, 128, 256, args.profile_host),
                "offline": lambda: offline_section(engine, args.num_prompts)}
        for name, run in runs.items():
            if name in sections and (i == 0 or name in ("decode", "prefill")):
                rows = run()
                report[name] = report.get(name, []) + rows if isinstance(rows, list) else rows
                save(report, args)  # a run cut short keeps what it measured
    finally:
        release(engine)


def release(engine: Engine) -> None:
    """Frees the engine's weights and KV pool now, so the next variant's engine fits."""
    for array in jax.tree_util.tree_leaves((engine.runner.params, engine.runner.kv_pool)):
        array.delete()
    gc.collect()


def save(report: dict, args: argparse.Namespace) -> None:
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    with open(args.table, "w") as f:
        f.write(markdown(report))


if __name__ == "__main__":
    main()
