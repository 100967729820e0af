"""GPU correctness and speed of the pallas_kernels attention kernels, against ceilings and peers.

One run: measures the ceilings (device-to-device copy counting read + write; a large bf16
matmul), checks every kernel against the float32 reference on the GPU, then times each kernel
over a sweep of shapes and tiles next to its peers (JAX's built-in Pallas ``paged_attention``
for decode; ``jax.nn.dot_product_attention`` with cuDNN and XLA for dense causal prefill), and
decode under MPS SM limits (20/30/50 %) in child processes. Writes JSON and a markdown table.

Timing: each measured executable runs the kernel once per layer of an ``NL``-layer pool
(unrolled, so launches go back to back and every call reads different memory, defeating the
L2), repeated; the median over repetitions divided by ``NL`` is the time per call.

    python tools/kernel_bench.py --out results.json --table results.md [--quick]
    python tools/kernel_bench.py --mps --out results.json --table results.md
        (adds decode under 20/30/50 % of the SMs, through a running MPS daemon or a private
        one it starts and stops)
    python tools/kernel_bench.py --sections decode-mgpu [--mps 30,50] --out X.json --table X.md
        (the Mosaic GPU decode kernel beside the Triton one and a copy at 64 x 2k, 128 x 4k and
        1 x 32k, on the whole GPU and, with --mps, on those percentages of the SMs; each share
        runs in its own child process, a GPU correctness check first; a kernel that fails the
        check or does not compile is reported and left out of the timing)
    python tools/kernel_bench.py --sections correctness,decode-fp8 --out X.json --table X.md
        (the FP8 KV pool: the kernels on e4m3 pages against the reference, then the decode
        kernel over a bf16 and an e4m3 pool of the same shapes, each against the copy)
    python tools/kernel_bench.py --sections prefill-mgpu [--tune] --out X.json --table X.md
        (the Mosaic GPU prefill kernel beside the Triton one and cuDNN: correctness first,
        then 8k causal and a 1k chunk after a 6k cached prefix; --tune races tile configs;
        a config that fails the check or does not compile is reported and left out)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_ceilings import ceilings, copy_bandwidth, race, torch_ceilings  # noqa: E402
from pallas_kernels import ops, reference, tuning  # noqa: E402
from pallas_kernels.decode_attention import paged_decode_attention  # noqa: E402
from pallas_kernels.decode_attention_mgpu import paged_decode_attention_mgpu  # noqa: E402
from pallas_kernels.kv_layout import FP8_KV_DTYPE, fp8_operand_dtype, quantize_kv  # noqa: E402
from pallas_kernels.kv_write import write_kv_pallas  # noqa: E402
from pallas_kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from pallas_kernels.prefill_attention_mgpu import (MgpuPrefillConfig,  # noqa: E402
                                                   paged_prefill_attention_mgpu)

warnings.filterwarnings("ignore", category=DeprecationWarning)
HQ, HKV, D, PAGE = 32, 8, 128, 16
DECODE_SHAPES = [(32, 2048), (64, 2048), (128, 4096), (1, 32768)]


def log(*args):
    print(*args, flush=True)


# ---------------------------------------------------------------- inputs
def paged_inputs(rng, ctx_lens, page, num_layers, hkv, d, dtype, extra_pages=0,
                 scattered=True, zeros=False):
    """A pool whose pages are scattered randomly (``scattered``; else each sequence's pages
    follow one another, as a fresh block manager hands them out), block tables and context
    lengths. ``zeros``: an all-zero pool instead of random values (timing experiments only)."""
    pages_per_seq = [-(-c // page) for c in ctx_lens]
    num_pages = sum(pages_per_seq) + extra_pages
    width = max(pages_per_seq)
    perm = (rng.permutation(num_pages) if scattered else np.arange(num_pages)).astype(np.int32)
    tables = np.zeros((len(ctx_lens), width), np.int32)
    used = 0
    for s, n in enumerate(pages_per_seq):
        tables[s, :n] = perm[used:used + n]
        used += n
    shape = (num_layers, num_pages, hkv, 2, page, d)
    if zeros:
        return (jnp.zeros(shape, dtype), jnp.asarray(tables), jnp.asarray(ctx_lens, jnp.int32))
    pool = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), shape, jnp.float32)
    return pool.astype(dtype), jnp.asarray(tables), jnp.asarray(ctx_lens, jnp.int32)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ---------------------------------------------------------------- correctness
def correctness() -> list[dict]:
    """Kernels vs the float32 reference on the GPU: random, ragged, scattered, poisoned."""
    rng = np.random.default_rng(0)
    results = []
    cases = [  # (name, q_lens, ctx_lens, page, hkv, group, d, window, cap)
        ("mixed d128 g4 p16", [1, 37, 1, 128, 64], [300, 37, 1, 1000, 64], 16, 2, 4, 128, 0, None),
        ("mixed d64 g1 p64 window", [1, 70, 3], [500, 200, 3], 64, 4, 1, 64, 33, None),
        ("mixed d256 g8 p128 softcap", [5, 1, 130], [900, 77, 130], 128, 2, 8, 256, 0, 30.0),
        ("mixed d128 g3 p32 win+cap", [16, 1, 9], [32, 2048, 9], 32, 3, 3, 128, 100, 50.0),
    ]
    for name, q_lens, ctx_lens, page, hkv, group, d, window, cap in cases:
        for dtype in (jnp.float32, jnp.bfloat16):
            pool, tables, ctx = paged_inputs(rng, ctx_lens, page, 2, hkv, d, dtype, extra_pages=7)
            total = sum(q_lens) + 5
            qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
            q = jax.random.normal(jax.random.key(len(results)), (total, hkv * group, d)).astype(dtype)
            kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
            want = reference.paged_attention_reference(
                q.astype(jnp.float32), pool.astype(jnp.float32), 1, tables, ctx, qsl, **kw)
            got = ops.paged_attention(q, pool, jnp.int32(1), tables, ctx, qsl, impl="pallas", **kw)
            real = sum(q_lens)
            err = rel_err(got[:real], want[:real])
            pad_ok = bool(jnp.all(got[real:] == 0))
            tol = 2e-5 if dtype == jnp.float32 else 1e-2
            results.append({"kernel": "prefill", "case": name, "dtype": jnp.dtype(dtype).name,
                            "rel_err": err, "ok": err < tol and pad_ok})
            # decode: the last token of each sequence, one per sequence
            dq = q[jnp.asarray(np.cumsum(q_lens) - 1)]
            dqsl = jnp.arange(len(q_lens) + 1, dtype=jnp.int32)
            want = reference.paged_attention_reference(
                dq.astype(jnp.float32), pool.astype(jnp.float32), 1, tables, ctx, dqsl, **kw)
            for splits in (1, 4):
                got = paged_decode_attention(dq, pool, jnp.int32(1), tables, ctx, block_k=32,
                                             num_splits=splits, **kw)
                err = rel_err(got, want)
                results.append({"kernel": f"decode splits={splits}", "case": name,
                                "dtype": jnp.dtype(dtype).name, "rel_err": err, "ok": err < tol})
    # KV write: in place (same buffer after a donated call), skipped slots untouched.
    pool, _, _ = paged_inputs(rng, [64] * 4, 16, 3, 8, 128, jnp.bfloat16, extra_pages=4)
    k = jax.random.normal(jax.random.key(5), (50, 8, 128), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(6), (50, 8, 128), jnp.bfloat16)
    slots = rng.permutation(pool.shape[1] * 16)[:50].astype(np.int32)
    slots[[0, 9, 49]] = -1
    want = reference.write_kv_reference(pool, 2, k, v, jnp.asarray(slots))
    before = pool.unsafe_buffer_pointer()
    write = jax.jit(lambda p, l, k, v, s: ops.write_kv(p, l, k, v, s, impl="pallas"),
                    donate_argnums=0)
    got = write(pool, jnp.int32(2), k, v, jnp.asarray(slots))
    results.append({"kernel": "write_kv", "case": "50 tokens, 3 skipped", "dtype": "bfloat16",
                    "rel_err": rel_err(got, want), "ok": bool(jnp.all(got == want)),
                    "in_place": got.unsafe_buffer_pointer() == before})
    # The model's pattern: a scan over layers with a traced layer and per-layer window.
    results.append(scan_check(rng))
    results += fp8_correctness(rng, cases)
    return results


# numpy, not jnp: a jax array made at import starts the GPU backend, which the decode-mgpu
# parent process must not (its children run under MPS)
FP8_SCALE = np.asarray([0.5, 0.125], np.float32)
"""K and V scales of the FP8 checks (not 1: a scale applied twice or not at all shows)."""


def fp8_correctness(rng, cases) -> list[dict]:
    """The kernels over an e4m3 pool against the reference over the same pool (the Triton
    casts of float8 are exercised on the GPU only), and the quantizing write bit for bit."""
    results = []
    for name, q_lens, ctx_lens, page, hkv, group, d, window, cap in cases:
        pool, tables, ctx = paged_inputs(rng, ctx_lens, page, 2, hkv, d, jnp.float32,
                                         extra_pages=7)
        pool = quantize_kv(pool * 4.0, FP8_SCALE[:, None, None])
        qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        q = jax.random.normal(jax.random.key(len(results)), (sum(q_lens), hkv * group, d),
                              jnp.bfloat16)
        kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window),
                  kv_scale=FP8_SCALE)
        want = reference.paged_attention_reference(q.astype(jnp.float32), pool, 1, tables, ctx,
                                                   qsl, **kw)
        got = ops.paged_attention(q, pool, jnp.int32(1), tables, ctx, qsl, impl="pallas", **kw)
        err = rel_err(got, want)
        results.append({"kernel": "prefill (fp8 pool)", "case": name, "dtype": "bfloat16",
                        "rel_err": err, "ok": err < 1e-2})
        dq = q[jnp.asarray(np.cumsum(q_lens) - 1)]
        dqsl = jnp.arange(len(q_lens) + 1, dtype=jnp.int32)
        want = reference.paged_attention_reference(dq.astype(jnp.float32), pool, 1, tables, ctx,
                                                   dqsl, **kw)
        for splits in (1, 4):
            got = paged_decode_attention(dq, pool, jnp.int32(1), tables, ctx, block_k=32,
                                         num_splits=splits, **kw)
            err = rel_err(got, want)
            results.append({"kernel": f"decode splits={splits} (fp8 pool)", "case": name,
                            "dtype": "bfloat16", "rel_err": err, "ok": err < 1e-2})
    pool = jnp.zeros((3, 12, 8, 2, 16, 128), FP8_KV_DTYPE)
    k = jax.random.normal(jax.random.key(5), (50, 8, 128), jnp.bfloat16) * 60  # some clamp
    v = jax.random.normal(jax.random.key(6), (50, 8, 128), jnp.bfloat16)
    slots = rng.permutation(12 * 16)[:50].astype(np.int32)
    slots[[0, 9, 49]] = -1
    want = reference.write_kv_reference(pool, 2, k, v, jnp.asarray(slots), FP8_SCALE)
    got = ops.write_kv(pool, jnp.int32(2), k, v, jnp.asarray(slots), kv_scale=FP8_SCALE,
                       impl="pallas")
    same = bool(np.array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8)))
    results.append({"kernel": "write_kv (fp8 pool)", "case": "50 tokens, 3 skipped, clamped",
                    "dtype": "bfloat16", "rel_err": 0.0 if same else float("inf"), "ok": same})
    return results


def scan_check(rng) -> dict:
    """write_kv + paged_attention inside lax.scan (traced layer, alternating window)."""
    layers, hkv, group, d, page = 4, 2, 4, 128, 16
    q_lens, ctx_lens = [1, 50, 1], [90, 50, 400]
    pool, tables, ctx = paged_inputs(rng, ctx_lens, page, layers, hkv, d, jnp.bfloat16)
    total = sum(q_lens)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    pos = np.concatenate([np.arange(c - n, c) for n, c in zip(q_lens, ctx_lens)])
    seq = np.repeat(np.arange(len(q_lens)), q_lens)
    slots = jnp.asarray(np.asarray(tables)[seq, pos // page] * page + pos % page, jnp.int32)
    q = jax.random.normal(jax.random.key(7), (layers, total, hkv * group, d), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(8), (layers, total, hkv, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(9), (layers, total, hkv, d), jnp.bfloat16)
    windows = jnp.asarray([0, 64, 0, 64], jnp.int32)

    def run(pool, impl):
        def step(pool, xs):
            layer, qi, ki, vi, w = xs
            pool = ops.write_kv(pool, layer, ki, vi, slots, impl=impl)
            out = ops.paged_attention(qi, pool, layer, tables, ctx, qsl, scale=d ** -0.5,
                                      sliding_window=w, impl=impl)
            return pool, out
        return jax.lax.scan(step, pool, (jnp.arange(layers, dtype=jnp.int32), q, k, v, windows))

    want_pool, want = jax.jit(functools.partial(run, impl="reference"))(pool)
    got_pool, got = jax.jit(functools.partial(run, impl="pallas"))(pool)
    err = rel_err(got, want)
    return {"kernel": "scan(write_kv+attention)", "case": "4 layers, window 0/64",
            "dtype": "bfloat16", "rel_err": err,
            "ok": err < 1e-2 and bool(jnp.all(got_pool == want_pool))}


# ---------------------------------------------------------------- decode
def decode_setup(batch, ctx, num_layers, hkv=HKV, hq=HQ, d=D, page=PAGE, **pool_kind):
    rng = np.random.default_rng(batch * 7 + ctx)
    pool, tables, ctx_lens = paged_inputs(rng, [ctx] * batch, page, num_layers, hkv, d,
                                          jnp.bfloat16, **pool_kind)
    q = jax.random.normal(jax.random.key(3), (batch, hq, d), jnp.bfloat16)
    return q, pool, tables, ctx_lens


def layers_for(kv_bytes_per_layer: int) -> int:
    """Enough layers that one timed call reads >= ~1 GiB, and each call different memory."""
    return int(min(16, max(2, -(-(1 << 30) // kv_bytes_per_layer))))


def decode_fn(num_layers: int, cfg: tuning.DecodeConfig, d: int = D, interpret: bool = False,
              fp8_dot_dtype: str | None = None):
    """One executable: the decode kernel once per layer, back to back."""
    @jax.jit
    def fn(q, pool, tables, ctx_lens):
        return [paged_decode_attention(q, pool, layer, tables, ctx_lens, scale=d ** -0.5,
                                       block_k=cfg.block_k, num_splits=cfg.num_splits,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                       interpret=interpret, fp8_dot_dtype=fp8_dot_dtype)
                for layer in range(num_layers)]
    return fn


def builtin_entry(q, pool, tables, ctx_lens, pages_per_block, k_splits):
    """JAX's built-in Pallas paged_attention on the same pages (K and V split out once)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as builtin
    num_layers = pool.shape[0]
    k_pages = [jnp.swapaxes(pool[i, :, :, 0], 0, 1) for i in range(num_layers)]
    v_pages = [jnp.swapaxes(pool[i, :, :, 1], 0, 1) for i in range(num_layers)]
    qs = q * jnp.asarray(D ** -0.5, q.dtype)  # it does not scale; not counted

    @jax.jit
    def fn(qs, k_pages, v_pages, tables, ctx_lens):
        return [builtin(qs, k, v, tables, ctx_lens, pages_per_compute_block=pages_per_block,
                        k_splits=k_splits) for k, v in zip(k_pages, v_pages)]
    return fn, (qs, k_pages, v_pages, tables, ctx_lens), num_layers


def decode_candidates(quick: bool, batch: int, table_cfg: tuning.DecodeConfig):
    """Tiles to race for one shape: the table's choice and its neighbours."""
    splits = sorted({1, table_cfg.num_splits, table_cfg.num_splits * 2,
                     max(1, table_cfg.num_splits // 2)})
    tiles = [(64, 4, 4), (64, 4, 3), (128, 4, 2), (32, 4, 4)]
    if quick:
        tiles = tiles[:1]
    return {table_cfg} | {tuning.DecodeConfig(bk, sp, w, st) for bk, w, st in tiles
                          for sp in splits}


def decode_sweep(quick: bool, ceil: dict) -> list[dict]:
    rows = []
    for batch, ctx in DECODE_SHAPES:
        kv_bytes = batch * ctx * HKV * 2 * D * 2
        q, pool, tables, ctx_lens = decode_setup(batch, ctx, layers_for(kv_bytes))
        num_layers = pool.shape[0]
        table_cfg = tuning.decode_config(D, batch, HKV, tables.shape[1] * PAGE)
        entries = {("ours", cfg): (decode_fn(num_layers, cfg), (q, pool, tables, ctx_lens),
                                   num_layers)
                   for cfg in sorted(decode_candidates(quick, batch, table_cfg),
                                     key=dataclass_key)}
        pages_per_seq = tables.shape[1]
        for ppb in (4, 8, 16):
            for ks in (1, 4, 16):
                if pages_per_seq % ks == 0 and (pages_per_seq // ks) % min(ppb, pages_per_seq // ks) == 0:
                    entries[("builtin", (ppb, ks))] = builtin_entry(q, pool, tables, ctx_lens,
                                                                    ppb, ks)
        times = race(entries)
        shape_rows = []
        for (who, cfg), t in times.items():
            bw = kv_bytes / t / 1e12
            if who == "ours":
                row = {"kernel": "duetjax decode", "config": cfg.__dict__,
                       "table_choice": cfg == table_cfg}
            else:
                row = {"kernel": "jax builtin paged_attention",
                       "config": {"pages_per_compute_block": cfg[0], "k_splits": cfg[1]}}
            row.update(batch=batch, ctx=ctx, us=t * 1e6, kv_tb_s=bw, of_copy=bw / ceil["copy_tb_s"])
            shape_rows.append(row)
            log(f"  {who} B={batch} ctx={ctx} {cfg}: {t*1e6:.1f} us {bw:.2f} TB/s")
        best = {}
        for kernel in ("duetjax decode", "jax builtin paged_attention"):
            mine = [r for r in shape_rows if r["kernel"] == kernel]
            if mine:
                best[kernel] = min(mine, key=lambda r: r["us"])
                best[kernel]["best"] = True
        if len(best) == 2:
            best["duetjax decode"]["vs_builtin"] = (best["jax builtin paged_attention"]["us"] /
                                                    best["duetjax decode"]["us"])
        rows += shape_rows
        del q, pool, tables, ctx_lens, entries
    return rows


FP8_DECODE_SHAPES = [(64, 1024), (64, 2048), (128, 4096)]


FP8_DECODE_TILES = ((128, 3),)
"""(block_k, num_stages) the e4m3 pool races beside the table's tiles (longer key blocks were
slower on an H100: benchmarks/results/decode-fp8-tiles-h100-2026-12-07.md)."""


def decode_fp8(ceil: dict, shapes=FP8_DECODE_SHAPES, hq: int = HQ, hkv: int = HKV, d: int = D,
               page: int = PAGE, interpret: bool = False, num_layers: int | None = None,
               fp8_tiles: tuple[tuple[int, int], ...] = FP8_DECODE_TILES) -> list[dict]:
    """The decode kernel over a bf16 pool and over the same values in e4m3, each with the
    table's tiles for its element size: time, KV bytes read per second against the copy, and
    the e4m3 pool's speed-up (the ideal is 2x: half the bytes). The e4m3 pool also races
    ``fp8_tiles`` (block_k, num_stages), and its dots with bfloat16 operands against the
    default float16 ones (``kv_layout.fp8_operand_dtype``: e4m3 to bfloat16 costs more
    conversion instructions). ``num_layers``: pool layers (calls per timed executable); None:
    ``layers_for`` the bf16 pool."""
    rows = []
    for batch, ctx in shapes:
        bf16_bytes = batch * ctx * hkv * 2 * d * 2
        q, pool, tables, ctx_lens = decode_setup(batch, ctx, num_layers or layers_for(bf16_bytes),
                                                 hkv, hq, d, page)
        pools = {"bfloat16": pool, "float8_e4m3fn": quantize_kv(pool, jnp.ones((), jnp.float32))}
        entries, labels = {}, {}
        for name, p in pools.items():
            cfg = tuning.decode_config(d, batch, hkv, tables.shape[1] * page, p.dtype.itemsize)
            cfgs = [cfg]
            if name == "float8_e4m3fn":
                cfgs += [c for c in (dataclasses.replace(cfg, block_k=bk, num_stages=st)
                                     for bk, st in fp8_tiles) if c != cfg]
            for c in cfgs:
                key = name if c == cfg else f"{name} block_k={c.block_k} stages={c.num_stages}"
                entries[key] = (decode_fn(p.shape[0], c, d, interpret), (q, p, tables, ctx_lens),
                                p.shape[0])
                labels[key] = (name, c, c == cfg, None)
            if name == "float8_e4m3fn":
                key = f"{name} bfloat16 operands"
                entries[key] = (decode_fn(p.shape[0], cfg, d, interpret, "bfloat16"),
                                (q, p, tables, ctx_lens), p.shape[0])
                labels[key] = (name, cfg, False, "bfloat16")
        times = race(entries, rounds=1 if interpret else 3)
        for key, t in times.items():
            name, cfg, table_choice, operands = labels[key]
            moved = bf16_bytes * pools[name].dtype.itemsize // 2
            bw = moved / t / 1e12
            rows.append({"kernel": "duetjax decode", "kv_dtype": name, "batch": batch,
                         "ctx": ctx, "config": cfg.__dict__, "table_choice": table_choice,
                         "fp8_operands": operands or (str(fp8_operand_dtype(jnp.bfloat16))
                                                     if name == "float8_e4m3fn" else None),
                         "us": t * 1e6, "kv_tb_s": bw, "of_copy": bw / ceil["copy_tb_s"],
                         "speedup": times["bfloat16"] / t if "bfloat16" in times else None})
            log(f"  decode {key} B={batch} ctx={ctx}: {t*1e6:.1f} us {bw:.2f} TB/s "
                f"({100 * bw / ceil['copy_tb_s']:.0f} % of copy)")
        del q, pool, pools, entries
    return rows


def dataclass_key(cfg) -> tuple:
    return tuple(cfg.__dict__.values())


def decode_variants(ceil: dict) -> list[dict]:
    """Head dims, page sizes and group sizes at B=64, ctx 2048: the table's tiles vs others."""
    rows = []
    for hq, hkv, d, page in [(32, 8, 64, 16), (16, 8, 256, 16), (32, 8, 128, 64),
                             (32, 8, 128, 128), (8, 8, 128, 16), (64, 8, 128, 16)]:
        batch, ctx = 64, 2048
        kv_bytes = batch * ctx * hkv * 2 * d * 2
        q, pool, tables, ctx_lens = decode_setup(batch, ctx, layers_for(kv_bytes), hkv, hq, d,
                                                 page)
        table_cfg = tuning.decode_config(d, batch, hkv, tables.shape[1] * page)
        cfgs = {table_cfg} | {dataclasses.replace(table_cfg, block_k=bk, num_stages=st)
                              for bk, st in ((32, 4), (64, 4), (128, 3))}
        entries = {cfg: (decode_fn(pool.shape[0], cfg, d), (q, pool, tables, ctx_lens),
                         pool.shape[0]) for cfg in cfgs}
        for cfg, t in race(entries, rounds=2).items():
            bw = kv_bytes / t / 1e12
            rows.append({"kernel": "duetjax decode", "batch": batch, "ctx": ctx, "hq": hq,
                         "hkv": hkv, "d": d, "page": page, "config": cfg.__dict__,
                         "table_choice": cfg == table_cfg, "us": t * 1e6, "kv_tb_s": bw,
                         "of_copy": bw / ceil["copy_tb_s"]})
            log(f"  variant hq={hq} hkv={hkv} d={d} page={page} {cfg}: {t*1e6:.1f} us "
                f"{bw:.2f} TB/s")
        del q, pool
    return rows


def decode_locality(ceil: dict) -> list[dict]:
    """Does page placement (or the KV values) change the decode kernel's bandwidth? The sweep
    scatters pages randomly; a fresh engine's pages follow one another, and an engine's pool
    may hold zeros where nothing was written yet. Same tiles (the table's) for all three."""
    rows = []
    for batch, ctx in ((64, 1024), (64, 2048), (128, 4096)):
        kv_bytes = batch * ctx * HKV * 2 * D * 2
        layers = layers_for(kv_bytes)
        cfg = tuning.decode_config(D, batch, HKV, -(-ctx // PAGE) * PAGE)
        entries = {}
        for name, kind in (("scattered, random values", {}),
                           ("contiguous, random values", {"scattered": False}),
                           ("scattered, zeros", {"zeros": True})):
            inputs = decode_setup(batch, ctx, layers, **kind)
            entries[name] = (decode_fn(layers, cfg), inputs, layers)
        for name, t in race(entries).items():
            bw = kv_bytes / t / 1e12
            rows.append({"kernel": "duetjax decode", "batch": batch, "ctx": ctx, "pool": name,
                         "config": cfg.__dict__, "us": t * 1e6, "kv_tb_s": bw,
                         "of_copy": bw / ceil["copy_tb_s"]})
            log(f"  locality B={batch} ctx={ctx} {name}: {t*1e6:.1f} us {bw:.2f} TB/s")
        del entries
    return rows


# ---------------------------------------------------------------- prefill
def causal_flops(q_len: int, ctx: int, hq: int = HQ, d: int = D) -> float:
    """Unmasked FLOPs of q_len new tokens after ctx - q_len cached (QK and PV, 2 each)."""
    keys = np.arange(ctx - q_len, ctx) + 1
    return 4.0 * hq * d * float(keys.sum())


def prefill_setup(q_lens, ctx_lens, num_layers, page=PAGE):
    rng = np.random.default_rng(sum(q_lens))
    pool, tables, ctx = paged_inputs(rng, ctx_lens, page, num_layers, HKV, D, jnp.bfloat16)
    qs = jax.random.normal(jax.random.key(4), (num_layers, sum(q_lens), HQ, D), jnp.bfloat16)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return qs, pool, tables, ctx, qsl


def prefill_entry(inputs, cfg: tuning.PrefillConfig):
    num_layers = inputs[1].shape[0]

    @jax.jit
    def fn(qs, pool, tables, ctx, qsl):
        return [paged_prefill_attention(qs[layer], pool, layer, tables, ctx, qsl,
                                        scale=D ** -0.5, block_m=cfg.block_m,
                                        block_n=cfg.block_n, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages)
                for layer in range(num_layers)]
    return fn, inputs, num_layers


def ops_entry(inputs):
    """The model's entry (``ops.paged_attention``): a mixed batch's one-token sequences go to
    the decode kernel, the rest to the prefill kernel."""
    num_layers = inputs[1].shape[0]

    @jax.jit
    def fn(qs, pool, tables, ctx, qsl):
        return [ops.paged_attention(qs[layer], pool, layer, tables, ctx, qsl, scale=D ** -0.5,
                                    impl="pallas") for layer in range(num_layers)]
    return fn, inputs, num_layers


PREFILL_TILES = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
                 (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3)]


def prefill_sweep(quick: bool, ceil: dict) -> list[dict]:
    rows = []
    tokens = 8192
    flops = causal_flops(tokens, tokens)
    inputs = prefill_setup([tokens], [tokens], 4)
    table_cfg = tuning.prefill_config(D)
    cfgs = {table_cfg} | {tuning.PrefillConfig(*t) for t in PREFILL_TILES[:2 if quick else None]}
    entries = {("ours", cfg): prefill_entry(inputs, cfg) for cfg in sorted(cfgs, key=dataclass_key)}
    q = jax.random.normal(jax.random.key(10), (4, 1, tokens, HQ, D), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(11), (4, 1, tokens, HKV, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(12), (4, 1, tokens, HKV, D), jnp.bfloat16)
    for impl in ("cudnn", "xla"):
        def fn(q, k, v, impl=impl):
            return [jax.nn.dot_product_attention(q[i], k[i], v[i], is_causal=True,
                                                 implementation=impl) for i in range(4)]
        entries[("dense", impl)] = (jax.jit(fn), (q, k, v), 4)
    times = race(entries)
    best, peer = None, {}
    for (who, cfg), t in times.items():
        rate = flops / t / 1e12
        if who == "ours":
            row = {"kernel": "duetjax prefill (paged)", "config": cfg.__dict__,
                   "table_choice": cfg == table_cfg}
            if best is None or t < best["us"] / 1e6:
                best = row
        else:
            row = {"kernel": f"jax.nn.dot_product_attention {cfg} (dense)"}
            peer[cfg] = rate
        row.update(tokens=tokens, cached=0, us=t * 1e6, tflop_s=rate,
                   of_matmul=rate / ceil["matmul_tflop_s"])
        rows.append(row)
        log(f"  {who} {cfg}: {t*1e6:.0f} us {rate:.0f} TFLOP/s")
    best["best"] = True
    if "cudnn" in peer:
        best["vs_cudnn"] = best["tflop_s"] / peer["cudnn"]
    del inputs, q, k, v, entries
    best_cfg = tuning.PrefillConfig(**best["config"])
    # Chunked prefill and mixed batches, with the best tiles; mixed ones also through ops.
    for name, q_lens, ctx_lens in [
            ("chunked: 4 x 2048 new after 6144 cached", [2048] * 4, [8192] * 4),
            ("mixed: 4096-token chunk + 64 decodes at ctx 2048", [4096] + [1] * 64,
             [4096] + [2048] * 64),
            ("mixed: 256-token chunk + 64 decodes at ctx 2048", [256] + [1] * 64,
             [256] + [2048] * 64)]:
        inputs = prefill_setup(q_lens, ctx_lens, 4)
        entries = {"prefill kernel": prefill_entry(inputs, best_cfg)}
        if 1 in q_lens:
            entries["ops: decodes on the decode kernel"] = ops_entry(inputs)
        flops_s = sum(causal_flops(n, c) for n, c in zip(q_lens, ctx_lens))
        kv_bytes = sum(ctx_lens) * HKV * 2 * D * 2
        for path, t in race(entries).items():
            rows.append({"kernel": "duetjax prefill (paged)", "case": name, "path": path,
                         "config": best["config"], "us": t * 1e6, "tflop_s": flops_s / t / 1e12,
                         "of_matmul": flops_s / t / 1e12 / ceil["matmul_tflop_s"],
                         "kv_tb_s": kv_bytes / t / 1e12})
            log(f"  {name}, {path}: {t*1e6:.0f} us {flops_s/t/1e12:.0f} TFLOP/s")
        del inputs, entries
    return rows


# ---------------------------------------------------------------- prefill, Mosaic GPU
MGPU_TUNE = [MgpuPrefillConfig(block_kv=bk, num_stages=st, p_in_registers=reg,
                               schedule_barrier=sb)
             for bk, st in ((128, 2), (64, 3), (64, 4)) for reg in (True, False)
             for sb in (True, False)]


def mgpu_entry(inputs, cfg: MgpuPrefillConfig):
    num_layers = inputs[1].shape[0]

    @jax.jit
    def fn(qs, pool, tables, ctx, qsl):
        return [paged_prefill_attention_mgpu(qs[layer], pool, layer, tables, ctx, qsl,
                                             scale=D ** -0.5, config=cfg)
                for layer in range(num_layers)]
    return fn, inputs, num_layers


def mgpu_correctness(configs) -> list[dict]:
    """Each config against the float32 reference on ragged, cached, GQA, window, cap cases."""
    rng = np.random.default_rng(0)
    cases = [  # (name, q_lens, ctx_lens, page, hkv, group, d, window, cap)
        ("ragged d128 g4", [1, 37, 1, 128, 64, 300], [300, 37, 1, 1000, 64, 300], 16, 2, 4,
         128, 0, None),
        ("chunk after prefix d128 g8", [200, 77], [2248, 1077], 16, 2, 8, 128, 0, None),
        ("window + cap d64 g1", [70, 3, 150], [500, 3, 150], 16, 4, 1, 64, 33, 30.0),
        ("d256 g8 cap", [5, 130], [900, 130], 16, 2, 8, 256, 0, 50.0),
    ]
    rows = []
    for cfg in configs:
        for name, q_lens, ctx_lens, page, hkv, group, d, window, cap in cases:
            row = {"kernel": "mgpu prefill", "case": name, "config": dataclasses.asdict(cfg)}
            try:
                pool, tables, ctx = paged_inputs(rng, ctx_lens, page, 2, hkv, d, jnp.bfloat16,
                                                 extra_pages=7)
                qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
                q = jax.random.normal(jax.random.key(len(rows)),
                                      (sum(q_lens) + 5, hkv * group, d)).astype(jnp.bfloat16)
                kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
                run_cfg = cfg if d != 256 else tuning.prefill_mgpu_config(256)
                got = paged_prefill_attention_mgpu(q, pool, jnp.int32(1), tables, ctx, qsl,
                                                   config=run_cfg, **kw)
                want = reference.paged_attention_reference(
                    q.astype(jnp.float32), pool.astype(jnp.float32), 1, tables, ctx, qsl, **kw)
                real = sum(q_lens)
                err = rel_err(got[:real], want[:real])
                row.update(rel_err=err, ok=err < 1e-2 and bool(jnp.all(got[real:] == 0)))
            except Exception as e:  # report the failure, go on with the others
                row.update(rel_err=float("nan"), ok=False,
                           error=f"{type(e).__name__}: {e}"[:1500])
            rows.append(row)
            log(f"  mgpu {name} {cfg}: " + (f"rel err {row['rel_err']:.2e} "
                                            f"{'ok' if row['ok'] else 'FAIL'}"
                                            if "error" not in row else row["error"][:300]))
    return rows


def prefill_mgpu_bench(tune: bool, ceil: dict) -> dict:
    """Mosaic GPU prefill vs Triton prefill vs cuDNN dense causal (d128, 32 q / 8 kv heads)."""
    table_cfg = tuning.prefill_mgpu_config(D)
    configs = [table_cfg] + ([c for c in MGPU_TUNE if c != table_cfg] if tune else [])
    report = {"correctness": mgpu_correctness(configs), "timing": []}
    failed = {json.dumps(r["config"]) for r in report["correctness"] if not r["ok"]}
    for name, q_lens, ctx_lens in [("causal 8192", [8192], [8192]),
                                   ("1024-token chunk after 6144 cached", [1024], [7168])]:
        inputs = prefill_setup(q_lens, ctx_lens, 4)
        entries = {("mgpu", cfg): mgpu_entry(inputs, cfg) for cfg in configs
                   if json.dumps(dataclasses.asdict(cfg)) not in failed}
        entries[("triton", tuning.prefill_config(D))] = prefill_entry(
            inputs, tuning.prefill_config(D))
        if len(q_lens) == 1 and q_lens == ctx_lens:
            shape = (4, 1, q_lens[0])
            q = jax.random.normal(jax.random.key(10), (*shape, HQ, D), jnp.bfloat16)
            k = jax.random.normal(jax.random.key(11), (*shape, HKV, D), jnp.bfloat16)
            v = jax.random.normal(jax.random.key(12), (*shape, HKV, D), jnp.bfloat16)

            def dense(q, k, v):
                return [jax.nn.dot_product_attention(q[i], k[i], v[i], is_causal=True,
                                                     implementation="cudnn") for i in range(4)]
            entries[("cudnn", "dense causal")] = (jax.jit(dense), (q, k, v), 4)
        flops = sum(causal_flops(n, c) for n, c in zip(q_lens, ctx_lens))
        times = race(entries)
        cudnn = times.get(("cudnn", "dense causal"))
        for (who, cfg), t in times.items():
            rate = flops / t / 1e12
            row = {"case": name, "kernel": who,
                   "config": cfg if isinstance(cfg, str) else dataclasses.asdict(cfg),
                   "table_choice": cfg in (table_cfg, tuning.prefill_config(D)),
                   "us": t * 1e6, "tflop_s": rate, "of_matmul": rate / ceil["matmul_tflop_s"]}
            if cudnn:
                row["vs_cudnn"] = cudnn / t
            report["timing"].append(row)
            log(f"  {name} {who} {cfg}: {t*1e6:.0f} us {rate:.0f} TFLOP/s "
                f"{100 * row['of_matmul']:.0f} % matmul"
                + (f" {row['vs_cudnn']:.2f}x cuDNN" if cudnn else ""))
        missing = [k for k in entries if k not in times]
        for who, cfg in missing:
            report["timing"].append({"case": name, "kernel": who, "config": str(cfg),
                                     "error": "failed to compile or run (see the log)"})
        del inputs, entries
    return report


def write_kv_bench(ceil: dict) -> list[dict]:
    tokens, layers = 8192, 4
    rng = np.random.default_rng(1)
    pool, tables, _ = paged_inputs(rng, [tokens], PAGE, layers, HKV, D, jnp.bfloat16)
    k = jax.random.normal(jax.random.key(13), (layers, tokens, HKV, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(14), (layers, tokens, HKV, D), jnp.bfloat16)
    pos = np.arange(tokens)
    slots = jnp.asarray(np.asarray(tables)[0, pos // PAGE] * PAGE + pos % PAGE, jnp.int32)
    moved = 2 * 2 * tokens * HKV * D * 2  # K and V, read once and written once
    rows = []
    for block_t in (16, 64):
        @functools.partial(jax.jit, donate_argnums=0)
        def fn(pool, k, v, slots, block_t=block_t):
            for layer in range(layers):
                pool = write_kv_pallas(pool, layer, k[layer], v[layer], slots, block_t=block_t)
            return pool
        for _ in range(3):
            pool = jax.block_until_ready(fn(pool, k, v, slots))
        times = []
        for _ in range(30):
            start = time.perf_counter()
            pool = jax.block_until_ready(fn(pool, k, v, slots))
            times.append(time.perf_counter() - start)
        t = statistics.median(times) / layers
        rows.append({"kernel": "duetjax write_kv", "block_t": block_t, "tokens": tokens,
                     "us": t * 1e6, "tb_s": moved / t / 1e12,
                     "of_copy": moved / t / 1e12 / ceil["copy_tb_s"]})
        log(f"  write_kv block_t={block_t}: {t*1e6:.1f} us {moved/t/1e12:.2f} TB/s")
    return rows


# ---------------------------------------------------------------- MPS
MPS_SHAPES = [(64, 2048), (128, 4096)]


def mps_child(percent: int) -> None:
    """Copy ceiling and decode bandwidth of this process, limited by MPS to ``percent`` SMs."""
    copies = {k: v for k, v in torch_ceilings(1).items() if "copy" in k}  # torch first
    copies.update(copy_bandwidth(1))
    out = {"percent": percent, "copy_tb_s": max(copies.values()), "copy_forms_tb_s": copies,
           "decode": []}
    for batch, ctx in MPS_SHAPES:
        kv_bytes = batch * ctx * HKV * 2 * D * 2
        q, pool, tables, ctx_lens = decode_setup(batch, ctx, layers_for(kv_bytes))
        base = tuning.decode_config(D, batch, HKV, tables.shape[1] * PAGE)
        cfgs = {base} | {dataclasses.replace(base, block_k=bk, num_stages=st, num_splits=sp)
                         for bk, st in ((64, 4), (128, 2)) for sp in (1, 2)}
        times = race({cfg: (decode_fn(pool.shape[0], cfg), (q, pool, tables, ctx_lens),
                            pool.shape[0]) for cfg in cfgs}, rounds=2)
        cfg, t = min(times.items(), key=lambda kv: kv[1])
        out["decode"].append({"batch": batch, "ctx": ctx, "config": cfg.__dict__,
                              "kv_tb_s": kv_bytes / t / 1e12,
                              "table_kv_tb_s": kv_bytes / times[base] / 1e12})
        del q, pool
    print("MPS_RESULT " + json.dumps(out), flush=True)


def mps_runs(percents=(20, 30, 50)) -> list[dict]:
    """One child per SM share, each an MPS client of a running daemon, or of a private one
    started here (and always stopped, also on errors).

    This process never touches the GPU, so the children have the whole card to themselves.
    """
    from duetjax.duet import mps

    daemon = mps.find_running_daemon() or mps.start_private_daemon()
    with daemon:
        return [r for r in (mps_child_run(daemon, pct) for pct in percents) if r is not None]


def mps_child_run(daemon, pct: int) -> dict | None:
    env = dict(os.environ, **daemon.client_env(pct))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--mps-child", str(pct)],
                          env=env, capture_output=True, text=True, timeout=240)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("MPS_RESULT ")]
    if not lines:
        log(f"  MPS {pct}% failed: rc={proc.returncode} {proc.stderr[-800:]}")
        return None
    res = json.loads(lines[-1][len("MPS_RESULT "):])
    log(f"  MPS {pct}%: copy {res['copy_tb_s']:.2f} TB/s, decode " +
        ", ".join(f"B={r['batch']} ctx={r['ctx']}: {r['kv_tb_s']:.2f}" for r in res["decode"]))
    return res


# ---------------------------------------------------------------- decode, Mosaic GPU
DECODE_MGPU_SHAPES = [(64, 2048), (128, 4096), (1, 32768)]


def decode_mgpu_fn(num_layers: int, d: int = D):
    """One executable: the Mosaic GPU decode kernel once per layer (table ring, default grid)."""
    cfg = tuning.decode_mgpu_config(d)

    @jax.jit
    def fn(q, pool, tables, ctx_lens):
        return [paged_decode_attention_mgpu(q, pool, layer, tables, ctx_lens, scale=d ** -0.5,
                                            config=cfg) for layer in range(num_layers)]
    return fn


def decode_mgpu_correctness() -> list[dict]:
    """Both decode kernels against the float32 reference: ragged, GQA, window, soft-cap."""
    rng = np.random.default_rng(0)
    cases = [  # (name, ctx_lens, page, hkv, group, d, window, cap)
        ("ragged d128 g4", [1, 300, 17, 2048, 64, 0], 16, 8, 4, 128, 0, None),
        ("d64 g8 window", [500, 3, 1000], 16, 2, 8, 64, 33, None),
        ("d256 g4 soft cap", [900, 130, 16], 16, 2, 4, 256, 0, 50.0),
        ("d128 g4 p64 window + cap", [2000, 65, 1], 64, 2, 4, 128, 100, 30.0),
    ]
    rows = []
    for name, ctx_lens, page, hkv, group, d, window, cap in cases:
        pool, tables, ctx = paged_inputs(rng, ctx_lens, page, 2, hkv, d, jnp.bfloat16,
                                         extra_pages=7)
        q = jax.random.normal(jax.random.key(len(rows)), (len(ctx_lens), hkv * group, d),
                              jnp.bfloat16)
        kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
        qsl = jnp.arange(len(ctx_lens) + 1, dtype=jnp.int32)
        want = reference.paged_attention_reference(q.astype(jnp.float32),
                                                   pool.astype(jnp.float32), 1, tables, ctx,
                                                   qsl, **kw)
        for kernel in ("triton", "mgpu"):
            row = {"kernel": kernel, "case": name}
            try:
                if kernel == "mgpu":
                    got = paged_decode_attention_mgpu(q, pool, jnp.int32(1), tables, ctx,
                                                      config=tuning.decode_mgpu_config(d), **kw)
                else:
                    cfg = tuning.decode_config(d, len(ctx_lens), hkv, tables.shape[1] * page)
                    got = paged_decode_attention(q, pool, jnp.int32(1), tables, ctx,
                                                 block_k=cfg.block_k, num_splits=cfg.num_splits,
                                                 num_warps=cfg.num_warps,
                                                 num_stages=cfg.num_stages, **kw)
                err = rel_err(got, want)
                row.update(rel_err=err, ok=err < 1e-2)
            except Exception as e:  # report the failure, go on with the others
                row.update(rel_err=float("nan"), ok=False, error=f"{type(e).__name__}: {e}"[:1500])
            rows.append(row)
            log(f"  {kernel} {name}: " + (f"rel err {row['rel_err']:.2e} "
                                          f"{'ok' if row['ok'] else 'FAIL'}"
                                          if "error" not in row else row["error"][:600]))
    return rows


def decode_mgpu_child(percent: int) -> None:
    """Copy ceiling, correctness, then both decode kernels at this process's SM share."""
    from pallas_kernels.persistent_grid import sm_share
    # torch first: JAX's allocator then takes most of the card and leaves torch none
    copies = {k: v for k, v in torch_ceilings(1).items() if "copy" in k}
    copies.update(copy_bandwidth(1))
    copy = max(copies.values())
    out = {"percent": percent, "gpu": jax.devices()[0].device_kind, "programs": sm_share(),
           "copy_tb_s": copy, "copy_forms_tb_s": copies,
           "correctness": decode_mgpu_correctness(), "timing": []}
    mgpu_ok = all(r["ok"] for r in out["correctness"] if r["kernel"] == "mgpu")
    for batch, ctx in DECODE_MGPU_SHAPES:
        kv_bytes = batch * ctx * HKV * 2 * D * 2
        inputs = decode_setup(batch, ctx, layers_for(kv_bytes))
        layers = inputs[1].shape[0]
        entries = {"triton": (decode_fn(layers, tuning.decode_config(
            D, batch, HKV, inputs[2].shape[1] * PAGE)), inputs, layers)}
        if mgpu_ok:
            entries["mgpu"] = (decode_mgpu_fn(layers), inputs, layers)
        times = race(entries, rounds=2)
        for kernel in ("triton", "mgpu"):
            row = {"kernel": kernel, "batch": batch, "ctx": ctx}
            if kernel in times:
                bw = kv_bytes / times[kernel] / 1e12
                row.update(us=times[kernel] * 1e6, kv_tb_s=bw, of_copy=bw / copy)
                log(f"  {percent} % B={batch} ctx={ctx} {kernel}: {row['us']:.1f} us "
                    f"{bw:.2f} TB/s ({100 * bw / copy:.0f} % of copy)")
            else:
                row["error"] = ("failed the correctness check" if kernel == "mgpu" and not mgpu_ok
                                else "failed to compile or run (see the log)")
            out["timing"].append(row)
        del inputs, entries
    print("DECODE_MGPU_RESULT " + json.dumps(out), flush=True)


def decode_mgpu_runs(percents: list[int]) -> list[dict]:
    """The whole GPU first, then each MPS share, each in a child process; this process never
    touches the GPU (an MPS daemon and a non-MPS context in one process do not mix)."""
    results = [decode_mgpu_child_run({}, 100)]
    if percents:
        from duetjax.duet import mps
        daemon = mps.find_running_daemon() or mps.start_private_daemon()
        with daemon:
            results += [decode_mgpu_child_run(daemon.client_env(pct), pct) for pct in percents]
    return [r for r in results if r is not None]


def decode_mgpu_child_run(extra_env: dict, pct: int) -> dict | None:
    env = dict(os.environ, **extra_env)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                               "--decode-mgpu-child", str(pct)],
                              env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as e:
        log(f"  decode-mgpu {pct} %: timed out; last output: {str(e.stdout)[-1500:]}")
        return None
    log(proc.stdout[-6000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("DECODE_MGPU_RESULT ")]
    if not lines:
        log(f"  decode-mgpu {pct} % failed: rc={proc.returncode} {proc.stderr[-3000:]}")
        return None
    return json.loads(lines[-1][len("DECODE_MGPU_RESULT "):])


def decode_mgpu_markdown(runs: list[dict]) -> list[str]:
    lines = ["", "## Decode, Mosaic GPU vs Triton (32 q / 8 kv heads, d 128, page 16, bf16)", ""]
    if not runs:
        return lines + ["No run finished (see the log).", ""]
    lines += ["| SMs | programs | case | kernel | rel err | ok |",
              "| --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        for r in run["correctness"]:
            lines.append(f"| {run['percent']} % | {run['programs']} | {r['case']} | {r['kernel']}"
                         f" | {r['rel_err']:.2e} | "
                         f"{'yes' if r['ok'] else 'NO: ' + r.get('error', '')[:200]} |")
    lines += ["", "| SMs | copy TB/s | B x ctx | Triton TB/s (% copy) | Mosaic GPU TB/s (% copy) |",
              "| --- | --- | --- | --- | --- |"]
    for run in runs:
        for batch, ctx in DECODE_MGPU_SHAPES:
            cells = []
            for kernel in ("triton", "mgpu"):
                r = [r for r in run["timing"] if r["kernel"] == kernel and r["batch"] == batch
                     and r["ctx"] == ctx]
                cells.append(f"{r[0]['kv_tb_s']:.2f} ({100 * r[0]['of_copy']:.0f} %)"
                             if r and "kv_tb_s" in r[0] else (r[0]["error"] if r else "-"))
            lines.append(f"| {run['percent']} % | {run['copy_tb_s']:.2f} | {batch} x {ctx} | "
                         + " | ".join(cells) + " |")
    return lines + [""]


# ---------------------------------------------------------------- report
def markdown(report: dict) -> str:
    env, ceil = report["env"], report["ceilings"]
    lines = [f"# Kernel benchmark: {env['gpu']}, {env['date']}", "",
             f"jax {env['jax']}, command `{env['command']}`", "",
             f"Ceilings (best form): copy {ceil['copy_tb_s']:.2f} TB/s (read + write), bf16 "
             f"8192^3 matmul {ceil['matmul_tflop_s']:.0f} TFLOP/s. Forms: "
             + ", ".join(f"{k} {v:.2f}" for k, v in ceil.get("copy_forms_tb_s", {}).items())
             + " TB/s; " + ", ".join(f"{k} {v:.0f}" for k, v in
                                     ceil.get("matmul_forms_tflop_s", {}).items())
             + " TFLOP/s.", "",
             "## Correctness (GPU, vs float32 reference)", "",
             "| kernel | case | dtype | rel err | ok |", "| --- | --- | --- | --- | --- |"]
    for r in report.get("correctness", []):
        lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['rel_err']:.2e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Decode (32 q / 8 kv heads, d 128, page 16, bf16): best of each sweep", "",
              "| B | ctx | ours TB/s | % copy | builtin best TB/s | ours / builtin | our tiles |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for batch, ctx in DECODE_SHAPES:
        ours = [r for r in report.get("decode", []) if r["kernel"] == "duetjax decode"
                and r["batch"] == batch and r["ctx"] == ctx and r.get("best")]
        peer = [r for r in report.get("decode", []) if r["kernel"].startswith("jax builtin")
                and r["batch"] == batch and r["ctx"] == ctx and r.get("best")]
        if ours:
            o = ours[0]
            p = peer[0]["kv_tb_s"] if peer else float("nan")
            lines.append(f"| {batch} | {ctx} | {o['kv_tb_s']:.2f} | {100*o['of_copy']:.0f} % | "
                         f"{p:.2f} | {o.get('vs_builtin', float('nan')):.2f}x | {o['config']} |")
    lines += ["", "## Decode variants (B 64, ctx 2048): the table's tiles and the best raced", "",
              "| Hq/Hkv | d | page | table TB/s | % copy | best TB/s | best tiles |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    variants: dict = {}
    for r in report.get("decode_variants", []):
        variants.setdefault((r["hq"], r["hkv"], r["d"], r["page"]), []).append(r)
    for (hq, hkv, d, page), rs in variants.items():
        table = [r for r in rs if r["table_choice"]]
        top = min(rs, key=lambda r: r["us"])
        t_bw = table[0]["kv_tb_s"] if table else float("nan")
        lines.append(f"| {hq}/{hkv} | {d} | {page} | {t_bw:.2f} | "
                     f"{100 * t_bw / ceil['copy_tb_s']:.0f} % | {top['kv_tb_s']:.2f} | "
                     f"{top['config']} |")
    if report.get("decode_locality"):
        lines += ["", "## Decode: page placement and pool values (table tiles)", "",
                  "| B | ctx | pool | TB/s | % copy |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['ctx']} | {r['pool']} | {r['kv_tb_s']:.2f} | "
                  f"{100 * r['of_copy']:.0f} % |" for r in report["decode_locality"]]
    lines += ["", "## Prefill (32 q / 8 kv heads, d 128, bf16; unmasked FLOPs)", "",
              "| kernel | case | TFLOP/s | % matmul | note |", "| --- | --- | --- | --- | --- |"]
    for r in report.get("prefill", []):
        if r["kernel"].startswith("duetjax") and "case" not in r and not r.get("best"):
            continue
        case = r.get("case", f"causal {r.get('tokens')} tokens")
        if "path" in r:
            case += f" ({r['path']})"
        note = f"{r['vs_cudnn']:.2f}x cuDNN, tiles {r['config']}" if "vs_cudnn" in r else ""
        if "kv_tb_s" in r:
            note = f"KV read {r['kv_tb_s']:.2f} TB/s"
        lines.append(f"| {r['kernel']} | {case} | {r['tflop_s']:.0f} | "
                     f"{100*r['of_matmul']:.0f} % | {note} |")
    mgpu = report.get("prefill_mgpu") or {}
    if mgpu or report.get("prefill_mgpu_error"):
        lines += ["", "## Prefill, Mosaic GPU kernel (32 q / 8 kv heads, d 128, bf16)", ""]
        if report.get("prefill_mgpu_error"):
            lines += [f"Failed: `{report['prefill_mgpu_error'][:500]}`", ""]
        lines += ["| case | config | rel err | ok |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['case']} | {r['config']} | {r['rel_err']:.2e} | "
                  f"{'yes' if r['ok'] else 'NO: ' + r.get('error', '')[:200]} |"
                  for r in mgpu.get("correctness", [])]
        lines += ["", "| case | kernel | config | TFLOP/s | % matmul | x cuDNN |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(mgpu.get("timing", []), key=lambda r: (r["case"], r.get("us", 1e30))):
            if "error" in r:
                lines.append(f"| {r['case']} | {r['kernel']} | {r['config']} | failed | | |")
                continue
            lines.append(f"| {r['case']} | {r['kernel']} | {r['config']} | {r['tflop_s']:.0f} | "
                         f"{100 * r['of_matmul']:.0f} % | {r.get('vs_cudnn', float('nan')):.2f} |")
    for w in report.get("write_kv", []):
        lines += ["", f"write_kv, {w['tokens']} tokens, block_t {w['block_t']}: {w['us']:.1f} us, "
                  f"{w['tb_s']:.2f} TB/s ({100*w['of_copy']:.0f} % of copy)."]
    if report.get("mps"):
        lines += ["", "## Decode under MPS SM limits", "",
                  "| SMs | copy TB/s | " + " | ".join(f"decode B={b} ctx={c} TB/s (best / table)"
                                                     for b, c in MPS_SHAPES) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in MPS_SHAPES) + " |"]
        for m in report["mps"]:
            lines.append(f"| {m['percent']} % | {m['copy_tb_s']:.2f} | " +
                         " | ".join(f"{r['kv_tb_s']:.2f} / {r['table_kv_tb_s']:.2f}"
                                    for r in m["decode"]) + " |")
    if report.get("decode_fp8"):
        lines += ["", "## Decode over a bf16 and an e4m3 (FP8) pool: the table's tiles, and "
                  "e4m3 with longer key blocks or bfloat16 dot operands", "",
                  "| B | ctx | KV dtype | dot operands | tiles (block_k / stages) | us | KV TB/s | "
                  "% copy | speed-up over bf16 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['ctx']} | {r['kv_dtype']} | {r.get('fp8_operands') or '-'} | "
                  + (f"{r['config']['block_k']} / {r['config']['num_stages']}"
                     + (" (table)" if r["table_choice"] else "") if "config" in r else "-")
                  + f" | {r['us']:.1f} | {r['kv_tb_s']:.2f} | {100 * r['of_copy']:.0f} % | "
                  + (f"{r['speedup']:.2f}x |" if r["speedup"] else "- |")
                  for r in report["decode_fp8"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kernel_bench.json")
    parser.add_argument("--table", default="kernel_bench.md")
    parser.add_argument("--quick", action="store_true", help="fewer tiles in each sweep")
    parser.add_argument("--skip", default="", help="comma list of: correctness,decode,"
                        "variants,locality,prefill,write,prefill-mgpu,decode-fp8; decode-mgpu runs "
                        "alone (--sections decode-mgpu)")
    parser.add_argument("--sections", default="", help="run only these (same names as --skip)")
    parser.add_argument("--tune", action="store_true",
                        help="prefill-mgpu: race several tile/stage configurations")
    parser.add_argument("--mps", nargs="?", const="20,30,50", default=None,
                        help="SM percentages (default 20,30,50). Alone: only the MPS runs of the "
                        "Triton decode, added to --out. With --sections decode-mgpu: that "
                        "section at these shares too")
    parser.add_argument("--mps-child", type=int, default=None)
    parser.add_argument("--decode-mgpu-child", type=int, default=None)
    args = parser.parse_args()
    if args.mps_child is not None:
        mps_child(args.mps_child)
        return
    if args.decode_mgpu_child is not None:
        decode_mgpu_child(args.decode_mgpu_child)
        return
    percents = [int(p) for p in args.mps.split(",")] if args.mps else []
    if set(filter(None, args.sections.split(","))) == {"decode-mgpu"}:
        runs = decode_mgpu_runs(percents)
        report = {"env": {"gpu": runs[0]["gpu"] if runs else "?", "jax": jax.__version__,
                          "date": datetime.date.today().isoformat(),
                          "command": "python " + " ".join(sys.argv)},
                  "decode_mgpu": runs}
        table = "\n".join([f"# Decode kernels on Mosaic GPU: {report['env']['gpu']}, "
                           f"{report['env']['date']}", "",
                           f"jax {jax.__version__}, command `{report['env']['command']}`"]
                          + decode_mgpu_markdown(runs))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(args.table, "w") as f:
            f.write(table)
        log(table)
        failed = [r for run in runs for r in run["correctness"] if not r["ok"]]
        sys.exit(1 if not runs or failed else 0)
    if args.mps:
        with open(args.out) as f:
            report = json.load(f)
        report["mps"] = mps_runs(percents)
        report["env"]["command"] += " && python " + " ".join(sys.argv)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(args.table, "w") as f:
            f.write(markdown(report))
        log(markdown(report))
        return
    skip = set(filter(None, args.skip.split(",")))
    jax.config.update("jax_default_matmul_precision", "highest")  # for the fp32 references
    report = {"env": {"gpu": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "date": datetime.date.today().isoformat(),
                      "command": "python " + " ".join(sys.argv)}}
    t0 = time.time()
    report["ceilings"] = ceilings()
    log("ceilings", report["ceilings"])

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(args.table, "w") as f:
            f.write(markdown(report))

    stages = [("correctness", correctness), ("decode", lambda: decode_sweep(args.quick,
                                                                            report["ceilings"])),
              ("prefill", lambda: prefill_sweep(args.quick, report["ceilings"])),
              ("decode_variants", lambda: decode_variants(report["ceilings"])),
              ("decode_locality", lambda: decode_locality(report["ceilings"])),
              ("write_kv", lambda: write_kv_bench(report["ceilings"])),
              ("decode_fp8", lambda: decode_fp8(report["ceilings"])),
              ("prefill_mgpu", lambda: prefill_mgpu_bench(args.tune, report["ceilings"]))]
    names = {"decode_variants": "variants", "decode_locality": "locality", "write_kv": "write",
             "prefill_mgpu": "prefill-mgpu", "decode_fp8": "decode-fp8"}
    sections = set(filter(None, args.sections.split(",")))
    for key, stage in stages:
        if names.get(key, key) in skip or (sections and names.get(key, key) not in sections):
            continue
        log(f"== {key} ({time.time() - t0:.0f} s)")
        try:
            report[key] = stage()
        except Exception as e:  # keep what the other stages measured
            log(f"{key} failed: {type(e).__name__}: {e}")
            report[key + "_error"] = f"{type(e).__name__}: {e}"[:2000]
        if key == "correctness":
            for r in report.get(key, []):
                log(f"  {r['kernel']:28s} {r['case']:30s} {r['dtype']:9s} {r['rel_err']:.2e} "
                    f"{'ok' if r['ok'] else 'FAIL'}")
        save()
    log(markdown(report))


if __name__ == "__main__":
    main()
