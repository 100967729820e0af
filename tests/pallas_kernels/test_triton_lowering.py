"""The Triton kernels lowered for an NVIDIA GPU on the CPU: bf16 and FP8 pools.

Interpret mode (test_kernels.py, test_fp8_kv.py) checks the arithmetic but never runs the
Pallas-to-Triton lowering, where dtype rules live: Triton cannot, for one, fill masked float8
loads with a constant. ``jit(f).trace(...).lower(lowering_platforms=("cuda",))`` runs that
lowering without a GPU; Pallas asks which GPU it lowers for, so the tests name one (an H100).
Only the PTX compile is left for a GPU. Inputs are abstract: nothing is allocated.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import gpu_info, pallas_call_registration

from pallas_kernels import tuning
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_write import write_kv_pallas
from pallas_kernels.prefill_attention import paged_prefill_attention

pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu",
                                reason="the GPU tests compile and run these kernels")

POOL_DTYPES = [jnp.bfloat16, jnp.float8_e4m3fn]
POOL_IDS = ["bf16", "fp8"]
SHAPES = [dict(hkv=8, group=4, d=128, page=16), dict(hkv=4, group=2, d=256, page=16),
          dict(hkv=2, group=8, d=64, page=64)]
SHAPE_IDS = ["llama3-8b", "d256", "d64 page 64"]


@pytest.fixture(autouse=True)
def lower_for_h100(monkeypatch):
    info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)


def triton_calls(fn, *args) -> int:
    """Triton kernel calls in ``fn``'s module lowered for CUDA (raises where lowering fails)."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text))


def spec(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


def pool_and_scale(hkv, d, page, dtype):
    """An abstract pool and, for FP8 pools, per-head scales (``[2]`` ones are broadcast to
    them before the kernel)."""
    scale = spec((2, hkv), jnp.float32) if jnp.dtype(dtype).itemsize == 1 else None
    return spec((2, 64, hkv, 2, page, d), dtype), scale


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=POOL_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_lowers(shape, pool_dtype, batch):
    hkv, group, d, page = shape["hkv"], shape["group"], shape["d"], shape["page"]
    pool, scale = pool_and_scale(hkv, d, page, pool_dtype)
    cfg = tuning.decode_config(d, batch, hkv, 32 * page, jnp.dtype(pool_dtype).itemsize)

    def fn(q, pool, tables, context_lens, scale):
        return paged_decode_attention(q, pool, 1, tables, context_lens, scale=d ** -0.5,
                                      block_k=cfg.block_k, num_splits=cfg.num_splits,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                      kv_scale=scale)
    assert triton_calls(fn, spec((batch, hkv * group, d), jnp.bfloat16), pool,
                        spec((batch, 32)), spec((batch,)), scale) >= 1


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=POOL_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_lowers(shape, pool_dtype):
    hkv, group, d, page = shape["hkv"], shape["group"], shape["d"], shape["page"]
    pool, scale = pool_and_scale(hkv, d, page, pool_dtype)
    cfg = tuning.prefill_config(d, jnp.dtype(pool_dtype).itemsize)
    tokens, seqs = 300, 4

    def fn(q, pool, tables, context_lens, query_start_loc, scale):
        return paged_prefill_attention(q, pool, 1, tables, context_lens, query_start_loc,
                                       scale=d ** -0.5, soft_cap=30.0, block_m=cfg.block_m,
                                       block_n=cfg.block_n, num_warps=cfg.num_warps,
                                       num_stages=cfg.num_stages, skip_single_token=True,
                                       kv_scale=scale)
    assert triton_calls(fn, spec((tokens, hkv * group, d), jnp.bfloat16), pool,
                        spec((seqs, 32)), spec((seqs,)), spec((seqs + 1,)), scale) == 1


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=POOL_IDS)
def test_kv_write_lowers(pool_dtype):
    pool, scale = pool_and_scale(8, 128, 16, pool_dtype)
    new = spec((300, 8, 128), jnp.bfloat16)

    def fn(pool, k, v, slots, scale):
        return write_kv_pallas(pool, 1, k, v, slots, scale)
    assert triton_calls(fn, pool, new, new, spec((300,)), scale) == 1
