"""The Mosaic GPU kernels lowered for Hopper on the CPU, in every configuration in use.

``jit(f).trace(...).lower(lowering_platforms=("cuda",))`` runs all of Mosaic GPU's lowering
without a GPU: Pallas to Mosaic GPU, layout and shared-memory transform inference, the wgmma
operand and TMA checks, the shared-memory budget. Only the PTX compile needs the GPU. Interpret
mode (test_prefill_mgpu.py, test_decode_mgpu.py) checks the arithmetic and none of these:
register operands, swizzles, the tile alignment of TMA boxes.

The configurations: the tuning table's (what ``ops`` runs), the GPU tests' and the
benchmark's, at Llama-3-8B's shapes (32 q heads, 8 KV heads, d128, page 16) and across head
dims, GQA groups, page sizes and soft-cap (the sliding window is a run-time value). FP8 pools
are not among them: ``ops`` sends those to the Triton kernels. Inputs are abstract: nothing is
allocated.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import tuning
from pallas_kernels.decode_attention_mgpu import (paged_decode_attention_mgpu, stats_columns,
                                                  unsupported_reason as decode_unsupported)
from pallas_kernels.prefill_attention_mgpu import (MgpuPrefillConfig,
                                                   paged_prefill_attention_mgpu,
                                                   unsupported_reason as prefill_unsupported)
from tests.pallas_kernels import test_decode_mgpu, test_prefill_mgpu
from tools.kernel_bench import MGPU_TUNE

pytestmark = [
    # Mosaic GPU lowers for the local GPU's architecture, and for Hopper where there is none.
    pytest.mark.skipif(
        not str(getattr(jax.devices()[0], "compute_capability", "9.0")).startswith("9."),
        reason="the local GPU is not a Hopper"),
    # A lowering takes about a second. Layout inference that finds no solution can search
    # for many minutes before it says so: a failure either way.
    pytest.mark.timeout(120),
]

LLAMA3_8B = dict(hkv=8, group=4, d=128, page=16)


def mosaic_gpu_calls(fn, *args) -> int:
    """Mosaic GPU kernel calls in ``fn``'s module lowered for CUDA (raises where lowering
    fails)."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return len(re.findall(r"custom_call @mosaic_gpu", text))


def pool_spec(hkv, d, page, dtype=jnp.bfloat16, num_pages=64):
    return jax.ShapeDtypeStruct((2, num_pages, hkv, 2, page, d), dtype)


def i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def lower_prefill(config, *, hkv, group, d, page, soft_cap=None, dtype=jnp.bfloat16):
    tokens, seqs = 300, 4
    q = jax.ShapeDtypeStruct((tokens, hkv * group, d), dtype)

    def fn(q, pool, layer, tables, context_lens, query_start_loc, window):
        return paged_prefill_attention_mgpu(
            q, pool, layer, tables, context_lens, query_start_loc, scale=d ** -0.5,
            soft_cap=soft_cap, sliding_window=window, config=config, skip_single_token=True)
    return mosaic_gpu_calls(fn, q, pool_spec(hkv, d, page, dtype), i32(), i32(seqs, 32),
                            i32(seqs), i32(seqs + 1), i32())


def lower_decode(config, *, hkv, group, d, page, soft_cap=None, num_programs=132,
                 num_splits=1, batch=6):
    q = jax.ShapeDtypeStruct((batch, hkv * group, d), jnp.bfloat16)

    def fn(q, pool, layer, tables, context_lens, window):
        return paged_decode_attention_mgpu(
            q, pool, layer, tables, context_lens, scale=d ** -0.5, soft_cap=soft_cap,
            sliding_window=window, config=config, num_programs=num_programs,
            num_splits=num_splits)
    return mosaic_gpu_calls(fn, q, pool_spec(hkv, d, page), i32(), i32(batch, 32), i32(batch),
                            i32())


SHAPES = [dict(hkv=hkv, group=group, d=d, page=16)
          for d in (64, 128, 256) for hkv, group in ((8, 1), (8, 4), (4, 8))]
SHAPE_IDS = [f"d{s['d']} group {s['group']}" for s in SHAPES]
# Gemma-2-like: groups of 2, soft-cap; and pages larger than a K/V tile.
CAPPED = [dict(hkv=8, group=2, d=d, page=64, soft_cap=50.0) for d in (64, 128, 256)]
CAPPED_IDS = [f"d{s['d']}" for s in CAPPED]
DECODE_SHAPES = SHAPES + CAPPED
DECODE_SHAPE_IDS = [f"d{s['d']} group {s['group']}" + (" capped" if "soft_cap" in s else "")
                    for s in DECODE_SHAPES]


# ------------------------------------------------------------------ prefill
@pytest.mark.parametrize("shape", SHAPES + CAPPED, ids=SHAPE_IDS + CAPPED_IDS)
def test_prefill_table_config_lowers(shape):
    config = tuning.prefill_mgpu_config(shape["d"])
    assert lower_prefill(config, **shape) == 1


@pytest.mark.parametrize("config", MGPU_TUNE, ids=str)
def test_prefill_benchmark_configs_lower_at_llama3_8b(config):
    assert lower_prefill(config, **LLAMA3_8B) == 1


@pytest.mark.parametrize("case", test_prefill_mgpu.CASES + test_prefill_mgpu.SLOW_CASES,
                         ids=lambda c: c[0])
@pytest.mark.parametrize("config", test_prefill_mgpu.GPU_CONFIGS, ids=str)
def test_prefill_gpu_test_cases_lower(config, case):
    """What test_prefill_mgpu.py's GPU tests run: pages larger than a tile, soft-cap, d256."""
    _, _, _, page, hkv, group, d, _, soft_cap, _ = case
    if prefill_unsupported((8, hkv * group, d), jnp.bfloat16, (1, 1, hkv, 2, page, d),
                           jnp.bfloat16, config):
        config = tuning.prefill_mgpu_config(d)
    assert lower_prefill(config, hkv=hkv, group=group, d=d, page=page,
                         soft_cap=soft_cap) == 1


def test_prefill_float16_lowers():
    assert lower_prefill(MgpuPrefillConfig(), **LLAMA3_8B,
                         dtype=jnp.float16) == 1


# ------------------------------------------------------------------ decode
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=DECODE_SHAPE_IDS)
def test_decode_table_config_lowers(shape, num_splits):
    """One split writes the output (where its tile fits), several write partials."""
    config = tuning.decode_mgpu_config(shape["d"])
    assert lower_decode(config, **shape, num_splits=num_splits) == 1


@pytest.mark.parametrize("group", [1, 2, 3])
def test_decode_small_groups_store_aligned_statistics(group):
    """Groups that start mid-way through a 4-row span store 128-byte statistics rows."""
    assert stats_columns(group) * 4 == 128 and stats_columns(4) == stats_columns(8) == 8
    assert lower_decode(tuning.decode_mgpu_config(128), hkv=8, group=group, d=128, page=16,
                        num_splits=4) == 1


@pytest.mark.parametrize("num_programs,num_splits", [(132, 1), (39, 2)])
@pytest.mark.parametrize("config", test_decode_mgpu.GPU_CONFIGS, ids=str)
def test_decode_gpu_configs_lower_at_llama3_8b(config, num_programs, num_splits):
    """On a whole H100 and on a 30 % MPS share of it."""
    assert lower_decode(config, **LLAMA3_8B, num_programs=num_programs,
                        num_splits=num_splits) == 1


@pytest.mark.parametrize("case", test_decode_mgpu.CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("config", test_decode_mgpu.GPU_CONFIGS, ids=str)
def test_decode_gpu_test_cases_lower(config, case):
    """What test_decode_mgpu.py's GPU tests run: pages larger than a block, soft-cap, d256."""
    _, ctx_lens, page, hkv, group, d, _, soft_cap, _, splits, programs = case
    if decode_unsupported((8, hkv * group, d), jnp.bfloat16, (1, 1, hkv, 2, page, d),
                          jnp.bfloat16, config):
        config = tuning.decode_mgpu_config(d)
    assert lower_decode(config, hkv=hkv, group=group, d=d, page=page, soft_cap=soft_cap,
                        num_programs=programs, num_splits=splits,
                        batch=len(ctx_lens)) == 1
