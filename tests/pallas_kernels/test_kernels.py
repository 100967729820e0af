"""The Pallas kernels (interpret mode on CPU) against the float32 reference.

Random inputs (never zeros), pages scattered through the pool, unused block-table entries
random, outputs poisoned: Pallas interpret mode fills every output with NaN before the kernel
runs (checked below), and the comparisons reject any non-finite element.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import ops, reference, tuning
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_write import write_kv_pallas
from pallas_kernels.prefill_attention import paged_prefill_attention


def make_batch(seed, q_lens, ctx_lens, *, page, hkv, group, d, dtype, layers=2, pad_tokens=3,
               spare_pages=5):
    """Ragged batch with one padding sequence (ctx 0) and padding tokens at the end."""
    rng = np.random.default_rng(seed)
    pages_needed = [-(-c // page) for c in ctx_lens]
    num_pages = sum(pages_needed) + spare_pages
    width = max(pages_needed) + 1
    perm = rng.permutation(num_pages)  # pages scattered through the pool
    tables = rng.integers(0, num_pages, (len(ctx_lens) + 1, width)).astype(np.int32)
    used = 0
    for s, n in enumerate(pages_needed):
        tables[s, :n] = perm[used:used + n]
        used += n
    pool = rng.standard_normal((layers, num_pages, hkv, 2, page, d))
    total = sum(q_lens) + pad_tokens
    q = rng.standard_normal((total, hkv * group, d))
    qsl = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)]]).astype(np.int32)
    ctx = np.asarray(list(ctx_lens) + [0], np.int32)
    return (jnp.asarray(q, dtype), jnp.asarray(pool, dtype), jnp.asarray(tables),
            jnp.asarray(ctx), jnp.asarray(qsl))


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite output (an unwritten element?)"
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_interpret_mode_poisons_outputs():
    """The guard every test below relies on: an output element no kernel writes reads as NaN."""
    out = pl.pallas_call(lambda o_ref: None, out_shape=jax.ShapeDtypeStruct((4, 8), jnp.float32),
                         interpret=True)()
    assert np.all(np.isnan(np.asarray(out)))


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def check_attention(out, q, pool, tables, ctx, qsl, dtype, real, **kw):
    want = reference.paged_attention_reference(q.astype(jnp.float32), pool.astype(jnp.float32),
                                               1, tables, ctx, qsl, **kw)
    assert rel_err(out[:real], want[:real]) < TOL[dtype]
    assert np.all(np.asarray(out[real:], np.float32) == 0)  # padding tokens: zeros


PREFILL_CASES = [
    # name, q_lens, ctx_lens, page, hkv, group, d, window, soft_cap
    ("ragged g4 d128", [1, 7, 16, 1, 20], [1, 23, 16, 40, 20], 8, 2, 4, 128, 0, None),
    ("chunk ends on a page boundary, g1 d64", [16, 8], [32, 24], 8, 2, 1, 64, 0, None),
    ("sliding window g8 d256", [9, 1, 33], [40, 17, 33], 16, 1, 8, 256, 6, None),
    ("soft cap + window, g3 (not a power of 2)", [5, 12], [30, 12], 4, 2, 3, 64, 9, 20.0),
    ("long context, garbage table entries past it", [1, 3], [128, 125], 16, 1, 4, 64, 0, 50.0),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_matches_reference(case, dtype):
    _, q_lens, ctx_lens, page, hkv, group, d, window, cap = case
    q, pool, tables, ctx, qsl = make_batch(len(q_lens) + d, q_lens, ctx_lens, page=page, hkv=hkv,
                                           group=group, d=d, dtype=dtype)
    kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
    out = paged_prefill_attention(q, pool, jnp.int32(1), tables, ctx, qsl, block_m=16,
                                            block_n=16, interpret=True, **kw)
    check_attention(out, q, pool, tables, ctx, qsl, dtype, sum(q_lens), **kw)


DECODE_CASES = [
    # name, ctx_lens, page, hkv, group, d, window, soft_cap, splits
    ("ragged g4 d128 one split", [1, 37, 64, 100], 8, 2, 4, 128, 0, None, 1),
    ("split-K g8 d64, lengths not page multiples", [3, 77, 130], 16, 2, 8, 64, 0, None, 4),
    ("split-K g1 d256 window", [50, 9, 64], 32, 2, 1, 256, 20, None, 3),
    ("soft cap g3 page 64", [64, 200, 1], 64, 2, 3, 64, 0, 30.0, 2),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_matches_reference(case, dtype):
    _, ctx_lens, page, hkv, group, d, window, cap, splits = case
    batch = len(ctx_lens)
    q, pool, tables, ctx, _ = make_batch(batch + d, [1] * batch, ctx_lens, page=page, hkv=hkv,
                                         group=group, d=d, dtype=dtype, pad_tokens=1)
    qsl = jnp.arange(batch + 2, dtype=jnp.int32)  # the padding sequence owns the padding token
    kw = dict(scale=0.7, soft_cap=cap, sliding_window=jnp.int32(window))
    out = paged_decode_attention(q, pool, jnp.int32(1), tables, ctx, block_k=16,
                                           num_splits=splits, interpret=True, **kw)
    check_attention(out, q, pool, tables, ctx, qsl, dtype, batch, **kw)


MIXED_CASES = [
    # name, q_lens, ctx_lens, page, hkv, group, d, window, soft_cap
    ("decodes first and last, g4 d64", [1, 9, 1, 1], [70, 30, 5, 33], 16, 2, 4, 64, 0, None),
    ("window + soft cap, g3", [3, 1, 12, 1], [40, 17, 12, 64], 8, 2, 3, 64, 7, 30.0),
    ("decodes only, in a mixed bucket", [1, 1, 1], [20, 1, 48], 16, 1, 8, 128, 0, None),
]


@pytest.mark.parametrize("case", MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
def test_mixed_batch_splits_decodes_and_prefills(case):
    """Through ops: the one-token sequences take the decode kernel, the rest the prefill
    kernel, and the two results meet in one output (every row written, padding zeros)."""
    _, q_lens, ctx_lens, page, hkv, group, d, window, cap = case
    q, pool, tables, ctx, qsl = make_batch(len(q_lens) * 7 + d, q_lens, ctx_lens, page=page,
                                           hkv=hkv, group=group, d=d, dtype=jnp.float32)
    kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
    out = ops.paged_attention(q, pool, jnp.int32(1), tables, ctx, qsl, impl="interpret", **kw)
    check_attention(out, q, pool, tables, ctx, qsl, jnp.float32, sum(q_lens), **kw)


def test_ops_dispatch_interpret_matches_reference():
    """Through ops (the model's entry), tiles from the tuning table, decode and mixed."""
    q, pool, tables, ctx, qsl = make_batch(5, [1, 30, 1], [70, 30, 5], page=16, hkv=2, group=4,
                                           d=64, dtype=jnp.bfloat16)
    kw = dict(scale=0.125, soft_cap=None, sliding_window=jnp.int32(0))
    out = ops.paged_attention(q, pool, jnp.int32(1), tables, ctx, qsl, impl="interpret", **kw)
    check_attention(out, q, pool, tables, ctx, qsl, jnp.bfloat16, 32, **kw)
    dq, dqsl = q[:4], jnp.arange(5, dtype=jnp.int32)
    out = ops.paged_attention(dq, pool, jnp.int32(1), tables, ctx, dqsl, decode_only=True,
                              impl="interpret", **kw)
    check_attention(out, dq, pool, tables, ctx, dqsl, jnp.bfloat16, 3, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_write_kv_matches_reference_and_skips_padding(dtype):
    rng = np.random.default_rng(3)
    pool = jnp.asarray(rng.standard_normal((3, 9, 3, 2, 8, 64)), dtype)
    k = jnp.asarray(rng.standard_normal((21, 3, 64)), dtype)
    v = jnp.asarray(rng.standard_normal((21, 3, 64)), dtype)
    slots = rng.permutation(9 * 8)[:21].astype(np.int32)
    slots[[0, 5, 20]] = -1  # padding tokens write nothing
    got = write_kv_pallas(pool, jnp.int32(2), k, v, jnp.asarray(slots), block_t=8,
                          interpret=True)
    want = reference.write_kv_reference(pool, 2, k, v, jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_write_then_attend_in_a_layer_scan():
    """The model's pattern: traced layer, per-layer window, pool carried (and donated)."""
    layers, hkv, group, d, page = 3, 2, 2, 64, 8
    q_lens, ctx_lens = [1, 12], [21, 12]
    _, pool, tables, ctx, qsl = make_batch(9, q_lens, ctx_lens, page=page, hkv=hkv, group=group,
                                           d=d, dtype=jnp.float32, layers=layers, pad_tokens=2)
    rng = np.random.default_rng(4)
    total = sum(q_lens) + 2
    pos = np.concatenate([np.arange(c - n, c) for n, c in zip(q_lens, ctx_lens)])
    seq = np.repeat(np.arange(len(q_lens)), q_lens)
    slots = np.asarray(tables)[seq, pos // page] * page + pos % page
    slots = jnp.asarray(np.concatenate([slots, [-1, -1]]), jnp.int32)
    xs = (jnp.arange(layers, dtype=jnp.int32),
          jnp.asarray(rng.standard_normal((layers, total, hkv * group, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((layers, total, hkv, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((layers, total, hkv, d)), jnp.float32),
          jnp.asarray([0, 5, 0], jnp.int32))

    @functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
    def run(pool, impl):
        def step(pool, x):
            layer, q, k, v, window = x
            pool = ops.write_kv(pool, layer, k, v, slots, impl=impl)
            out = ops.paged_attention(q, pool, layer, tables, ctx, qsl, scale=0.125,
                                      sliding_window=window, impl=impl)
            return pool, out
        return jax.lax.scan(step, pool, xs)

    want_pool, want = run(jnp.array(pool), "reference")
    got_pool, got = run(jnp.array(pool), "interpret")
    np.testing.assert_array_equal(np.asarray(got_pool), np.asarray(want_pool))
    assert rel_err(got[:, :13], want[:, :13]) < 1e-5
    assert np.all(np.asarray(got[:, 13:]) == 0)


def test_tuning_fits_shared_memory_and_splits_small_batches():
    cfg = tuning.decode_config(128, 1, 8, 32768, family="h200")
    assert cfg.num_splits >= 32  # 8 programs alone cannot fill 132 SMs
    assert tuning.decode_config(128, 128, 8, 4096, family="h200").num_splits <= 2
    for d in (64, 128, 256):
        for itemsize in (2, 4):
            p = tuning.prefill_config(d, itemsize, family="h200")
            assert (p.num_stages - 1) * p.block_n * d * itemsize * 2 <= 200 * 1024
            assert p.block_n >= 16 and p.block_m >= 16
