"""Duet mode on a real GPU: MPS daemon, CUDA IPC sharing, split iterations, a killed worker.

Checks, in one process tree, what the CPU tests cannot: that the MPS daemon starts (or is
found) and stops, that workers attach the engine's weights, KV pool and penalty tables over
CUDA IPC and XLA updates them in place (``SharedState.after_step`` and ``after_fill`` raise
otherwise), that split iterations give
the same greedy tokens as aggregated ones, that a SIGKILLed worker loses no request, and how
much GPU memory the processes take. Writes JSON.

What it checks is the duet machinery itself, so beside ``Engine.stats()`` and
``Engine.split_history()`` it reaches the engine's duet controller (to force an SLO), its worker
clients (to wait for, kill and restart them), the MPS daemon and the runner's shared buffers.

    python tools/duet_check.py --out duet-check.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA_1B = {  # Llama-3.2-1B's shape (random weights): compiles fast, exercises everything
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu"}


def log(*args) -> None:
    print(*args, flush=True)


def workload(vocab: int, n: int, seed: int):
    """Greedy requests; every third one with penalties and logit biases, whose device tables
    (counts, prompt tokens, biases) the workers share with the engine."""
    from duetjax import SamplingParams
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(100, vocab, int(m)).tolist()}
               for m in rng.integers(300, 1500, n)]
    adjusted = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5, presence_penalty=0.3),
                dict(logit_bias={int(t): 3.0 for t in rng.integers(100, vocab, 8)},
                     repetition_penalty=1.1)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True,
                             **(adjusted[(i // 3) % len(adjusted)] if i % 3 == 2 else {}))
              for i, m in enumerate(rng.integers(24, 64, n))]
    return prompts, params


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def gpu_memory() -> list[dict]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return [{"error": str(e)}]
    return [dict(zip(("pid", "name", "used"), (x.strip() for x in line.split(","))))
            for line in out.splitlines() if line.strip()]


def set_slo(engine, slo_s: float) -> None:
    from duetjax.perf.optimizer import ModeController
    c = engine.duet.controller
    engine.duet.controller = ModeController(c.roofline, dataclasses.replace(c.config, tbt_slo_s=slo_s),
                                            c.hysteresis)


def run(engine, prompts, params, kill_decode: bool = False) -> tuple[list[list[int]], dict]:
    before = engine.split_history()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    results, killed = {}, None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        if kill_decode and killed is None and engine.stats().split_iterations > before.split_iterations:
            worker = next(w for (role, _), w in engine.duet.workers.items() if role == "decode" and w.ready)
            os.kill(worker.process.pid, signal.SIGKILL)
            killed = worker.name
    wall = time.perf_counter() - start
    s = engine.split_history()
    ratios = [abs(p - m) / m for p, m in zip(s.predicted_seconds[len(before.predicted_seconds):],
                                                 s.measured_seconds[len(before.measured_seconds):])]
    info = {"wall_s": wall, "split_iterations": s.split_iterations - before.split_iterations,
            "aggregated_iterations": s.aggregated_iterations - before.aggregated_iterations,
            "split_k": s.split_k[len(before.split_k):],
            "measured_ms": [1e3 * m for m in s.measured_seconds[len(before.measured_seconds):]],
            "predicted_ms": [1e3 * p for p in s.predicted_seconds[len(before.predicted_seconds):]],
            "roofline_abs_error_median": float(np.median(ratios)) if ratios else None,
            "worker_failures": s.worker_failures - before.worker_failures,
            "requeued": s.requeued_requests - before.requeued_requests, "killed": killed,
            "output_tokens": sum(len(results[i]) for i in ids)}
    return [results[i] for i in ids], info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a config/checkpoint dir; default Llama-3.2-1B shape")
    p.add_argument("--dtype", default="float32", help="float32 keeps greedy ties out of the comparison")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--pairs", default="70:30,50:50")
    p.add_argument("--scan-unroll", type=int, default=1,
                   help="1 compiles fastest; the check is about mechanism, not speed")
    p.add_argument("--carry-stream", action="store_true",
                   help="split iterations end with their chunk (EngineConfig.duet_carry_stream)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    report: dict = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix="llama-1b-")
        Path(model, "config.json").write_text(json.dumps(LLAMA_1B))
    from duetjax import Engine
    from duetjax.duet.mps import mps_status
    report["mps_status_before"] = mps_status()
    pairs = tuple(tuple(int(x) for x in pair.split(":")) for pair in args.pairs.split(","))
    start = time.perf_counter()
    engine = Engine(model, load_format="dummy", dtype=args.dtype, mode="duet", duet_pairs=pairs,
                    max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=2048,
                    kv_cache_tokens=131072, enable_prefix_caching=False,
                    scan_unroll=args.scan_unroll, duet_carry_stream=args.carry_stream,
                    show_progress=False)
    report["engine_ready_s"] = time.perf_counter() - start
    import jax
    report["device"] = jax.devices()[0].device_kind
    report["jax"] = jax.__version__
    daemon = engine.duet.daemon
    report["daemon"] = {"pipe_dir": daemon.pipe_dir, "owned": daemon.owned, "pid": daemon.pid,
                        "pid_file": os.path.exists(os.path.join(daemon.pipe_dir,
                                                                "nvidia-cuda-mps-control.pid"))}
    engine.wait_for_workers(timeout=540)
    report["workers_ready_s"] = time.perf_counter() - start
    report["workers"] = {w.name: w.info for w in engine.duet.workers.values()}
    report["gpu_memory"] = gpu_memory()
    import cupy
    free, total = cupy.cuda.runtime.memGetInfo()
    report["memory"] = {"free_gib": free / 2**30, "total_gib": total / 2**30,
                        "kv_pool_gib": engine.runner.kv_pool.nbytes / 2**30,
                        "weights_gib": sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.runner.params)) / 2**30}
    save()
    vocab = engine.vocab_size
    prompts, params = workload(vocab, args.requests, seed=1)
    # Warm-up (buckets, workers' first steps), then aggregated only (an SLO nothing misses).
    set_slo(engine, 1e3)
    run(engine, *workload(vocab, 4, seed=2))
    aggregated, report["aggregated"] = run(engine, prompts, params)
    log("aggregated:", {k: v for k, v in report["aggregated"].items() if not isinstance(v, list)})
    # An SLO between the predicted split decode step and the aggregated step: split mode.
    roofline = engine.duet.controller.roofline
    batch, decodes = [(1024, 0)], [800] * 8
    t_agg = roofline.predict_mixed(batch, decodes)
    t_d = min(roofline.predict_split(batch, decodes, a / 100, b / 100)[1] for a, b in pairs)
    slo = (t_agg * t_d) ** 0.5 if t_d < t_agg else 0.9 * t_agg
    report["forced_slo_ms"] = 1e3 * slo
    set_slo(engine, slo)
    split, report["split"] = run(engine, prompts, params)
    log("split:", {k: v for k, v in report["split"].items() if not isinstance(v, list)})
    report["split_vs_aggregated_first_divergence"] = [first_divergence(a, b) for a, b in zip(aggregated, split)]
    save()
    killed, report["killed_run"] = run(engine, prompts, params, kill_decode=True)
    report["killed_vs_aggregated_first_divergence"] = [first_divergence(a, b) for a, b in zip(aggregated, killed)]
    report["complete_after_kill"] = [len(k) == sp.max_tokens for k, sp in zip(killed, params)]
    log("killed:", {k: v for k, v in report["killed_run"].items() if not isinstance(v, list)})
    restarted = [w for w in engine.duet.workers.values() if w.restarts]
    for w in restarted:
        w.wait_ready(timeout=300)
    report["restarted_workers_ready"] = [w.name for w in restarted if w.ready]
    after, report["after_restart"] = run(engine, prompts, params)
    report["after_restart_vs_aggregated_first_divergence"] = [
        first_divergence(a, b) for a, b in zip(aggregated, after)]
    log("after restart:", {k: v for k, v in report["after_restart"].items() if not isinstance(v, list)})
    save()
    pid = daemon.pid
    engine.close()
    report["daemon_handed_to_exit_watcher"] = not daemon.owned
    report["daemon_pid"] = pid
    save()
    log(json.dumps({k: report[k] for k in ("daemon", "memory", "split_vs_aggregated_first_divergence",
                                           "complete_after_kill")}, default=str))


if __name__ == "__main__":
    main()
