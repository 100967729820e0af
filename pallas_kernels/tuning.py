"""Kernel tuning, looked up by GPU and shape class (never searched at run time).

The entries come from ``tools/kernel_bench.py`` sweeps on the named GPU (see
``pallas_kernels/NOTES.md`` and ``benchmarks/results/kernels-*``). A GPU missing from the tables
gets the H100/H200 ("hopper") entries, which are also sane on Ampere-class parts.

Everything here is decided from static shapes at trace time: the block table's width times the
page size stands in for the context length (the engine buckets it), and ``batch * kv_heads``
says how many programs a decode step has before split-K.
"""
from __future__ import annotations

import dataclasses

import jax

from . import decode_attention_mgpu
from .decode_attention_mgpu import MgpuDecodeConfig
from .prefill_attention_mgpu import MgpuPrefillConfig, unsupported_reason


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_k: int
    """Keys per loop iteration (a power of two, at least 16)."""
    num_splits: int
    """Split-K shares per (sequence, KV head); 1 writes the output directly."""
    num_warps: int
    num_stages: int
    """Triton software-pipelining depth: K/V loads of later blocks in flight during this one."""


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    """(token, group head) query rows per program."""
    block_n: int
    """Keys per loop iteration."""
    num_warps: int
    num_stages: int


def gpu_family(device: jax.Device | None = None) -> str:
    """Table key for a device: "h200", "h100" or "hopper" (the fallback)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for family in ("h200", "h100"):
        if family in kind:
            return family
    return "hopper"


# (block_k, num_warps, num_stages) per head_dim: K+V tiles of block_k rows, num_stages deep,
# must fit shared memory with room for a second program per SM. H200 races of 2026-11-21
# (benchmarks/results/kernels-h200-2026-11-21.*): 64 keys, 3 stages is the one tile within ~10 %
# of the best at every d128 decode shape in both sweeps; run-to-run noise there was 20-30 %, so
# finer choices are not supported by the data. d256: 32 keys keeps the same bytes per stage.
_DECODE_TILES: dict[str, dict[int, tuple[int, int, int]]] = {
    "hopper": {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 4)},
}

# Splits by shape class: the first row whose program count (batch * kv_heads) is at most
# `programs` and whose context bucket (max keys) is at least `min_context` gives the split count.
# Aim: enough programs to keep every SM busy with several in flight, while each split still
# walks several blocks so its fixed costs (q load, output write, combine) stay small.
# H200: B=1 ctx 32k (8 programs) 2.1 TB/s at 32 splits vs 0.15 unsplit; B >= 32 at ctx 2k-4k
# (256+ programs) gains nothing from splitting. The re-time with this table
# (kernels-decode-retime-h200-2026-11-21.*) gave B=1 ctx 32k 2.02 TB/s at 64 splits against
# 1.40 at 32, hence the first row.
_DECODE_SPLITS: dict[str, list[tuple[int, int, int]]] = {
    "hopper": [
        (16, 32768, 64), (16, 16384, 32), (16, 4096, 16), (16, 1024, 8),
        (64, 16384, 16), (64, 4096, 8), (64, 1024, 4),
        (128, 8192, 4), (128, 2048, 2),
        (512, 8192, 2),
    ],
}

# H200 sweep at 8k causal tokens: 128 x 128 tiles, 8 warps, 3 stages best for d128 (261 TFLOP/s
# vs 232-239 for the 64-key tiles). d64/d256: scaled to keep the tiles' shared memory alike.
_PREFILL: dict[str, dict[int, PrefillConfig]] = {
    "hopper": {64: PrefillConfig(128, 128, 8, 3), 128: PrefillConfig(128, 128, 8, 3),
               256: PrefillConfig(64, 64, 8, 2)},
}


# Mosaic GPU prefill (Hopper): 128-key tiles in a 2-deep ring for d64/d128 (2 x 64 KiB of K/V at
# d128 next to 64 KiB of Q and O tiles); d256 halves to 32 keys to fit 227 KiB. Not yet measured:
# the schedule barrier stays off until the GPU tests and the bench have run it.
_PREFILL_MGPU: dict[str, dict[int, MgpuPrefillConfig]] = {
    "hopper": {64: MgpuPrefillConfig(block_kv=128, num_stages=3, schedule_barrier=False),
               128: MgpuPrefillConfig(block_kv=128, num_stages=2, schedule_barrier=False),
               256: MgpuPrefillConfig(block_kv=32, num_stages=2, schedule_barrier=False)},
}


# Mosaic GPU decode (Hopper): 16 KiB of K+V per ring slot, 8 slots (6 in flight while the two
# consumers compute on 2): about 96 KiB in flight per SM, what ~60 GB/s per SM (a 30 % share
# of HBM3) needs at ~1.5 us of loaded latency. d256: 16-key slots keep 16 KiB, 4 fit.
# Not yet measured.
_DECODE_MGPU: dict[str, dict[int, MgpuDecodeConfig]] = {
    "hopper": {64: MgpuDecodeConfig(block_kv=64, num_stages=8),
               128: MgpuDecodeConfig(block_kv=32, num_stages=8),
               256: MgpuDecodeConfig(block_kv=16, num_stages=4)},
}


# Triton keeps about (num_stages - 1) bf16 K and V tiles in shared memory (bf16 d256 decode with
# 64 keys and 4 stages fits); float32 tiles take more (float32 prefill at 128 x 128 tiles asked
# for 262,144 bytes at 2 stages and 262,656 at 3, on the H200). Hopper gives a program 227 KB.
_SHARED_BYTES = 200 * 1024


def _fit(block: int, num_stages: int, head_dim: int, itemsize: int) -> tuple[int, int]:
    """Shrinks stages, then the key block, until the pipelined K/V tiles fit shared memory."""
    def buffers() -> int:
        # float32 (tests only): double, a margin the sizes seen above need.
        return num_stages - 1 if itemsize <= 2 else 2 * num_stages

    while buffers() * block * head_dim * itemsize * 2 > _SHARED_BYTES:
        if num_stages > 2:
            num_stages -= 1
        else:
            block //= 2
    return block, num_stages


def _table(tables: dict, family: str):
    return tables.get(family, tables["hopper"])


def decode_config(head_dim: int, batch: int, num_kv_heads: int, max_context: int,
                  itemsize: int = 2, family: str | None = None) -> DecodeConfig:
    """Tiles for the decode kernel on this GPU and shape class (``itemsize``: KV bytes)."""
    family = family or gpu_family()
    tiles = _table(_DECODE_TILES, family)
    block_k, num_warps, num_stages = tiles.get(head_dim, tiles[128])
    block_k, num_stages = _fit(block_k, num_stages, head_dim, itemsize)
    programs = batch * num_kv_heads
    splits = 1
    for max_programs, min_context, row_splits in _table(_DECODE_SPLITS, family):
        if programs <= max_programs and max_context >= min_context:
            splits = row_splits
            break
    return DecodeConfig(block_k, splits, num_warps, num_stages)


def prefill_config(head_dim: int, itemsize: int = 2, family: str | None = None) -> PrefillConfig:
    """Tiles for the ragged prefill kernel on this GPU (``itemsize``: KV bytes)."""
    table = _table(_PREFILL, family or gpu_family())
    cfg = table.get(head_dim, table[128])
    block_n, num_stages = _fit(cfg.block_n, cfg.num_stages, head_dim, itemsize)
    return dataclasses.replace(cfg, block_n=block_n, num_stages=num_stages)


def prefill_mgpu_config(head_dim: int, family: str | None = None) -> MgpuPrefillConfig:
    """Tiles for the Mosaic GPU prefill kernel on this GPU."""
    table = _table(_PREFILL_MGPU, family or gpu_family())
    return table.get(head_dim, table[128])


def prefill_mgpu_supports(q_shape, q_dtype, kv_pool_shape, kv_dtype) -> bool:
    """Whether the Mosaic GPU prefill kernel runs this shape with its table tiles."""
    return unsupported_reason(q_shape, q_dtype, kv_pool_shape, kv_dtype,
                              prefill_mgpu_config(q_shape[2])) is None


def decode_mgpu_config(head_dim: int, family: str | None = None) -> MgpuDecodeConfig:
    """Ring geometry for the Mosaic GPU decode kernel on this GPU."""
    table = _table(_DECODE_MGPU, family or gpu_family())
    return table.get(head_dim, table[128])


def decode_mgpu_supports(q_shape, q_dtype, kv_pool_shape, kv_dtype) -> bool:
    """Whether the Mosaic GPU decode kernel runs this shape with its table's ring."""
    return decode_attention_mgpu.unsupported_reason(
        q_shape, q_dtype, kv_pool_shape, kv_dtype, decode_mgpu_config(q_shape[2])) is None
