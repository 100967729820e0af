"""FP8 KV pools: the write quantizes, every attention path dequantizes.

Two questions, kept apart:
- the kernels (interpret mode) and the XLA path read the same e4m3 pool as the reference does
  (tight tolerances: the same quantized values, only the arithmetic's order differs);
- the e4m3 pool against the high-precision one it was quantized from (a measured bound: the
  rounding of 3 mantissa bits).
Random inputs throughout, ragged batches with cached prefixes, GQA, soft-cap and windows.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops, reference
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_layout import FP8_KV_DTYPE, FP8_KV_MAX, fp8_operand_dtype, quantize_kv
from pallas_kernels.kv_write import write_kv_pallas
from pallas_kernels.prefill_attention import paged_prefill_attention
from pallas_kernels.prefill_attention_mgpu import MgpuPrefillConfig, unsupported_reason
from pallas_kernels.xla_attention import paged_attention_xla
from tests.pallas_kernels.test_kernels import make_batch, rel_err

KV_SCALE = jnp.asarray([0.5, 0.125], jnp.float32)
"""K and V scales of the tests' layer: not 1, so a scale applied twice or not at all shows."""
HEAD_FACTORS = (1.0, 4.0, 0.25, 2.0)
"""Per-head scales are ``KV_SCALE`` times these (first ``hkv``): a head's scale read for
another head shows."""
SCALE_FORMS = ["per-layer", "per-head"]


def kv_scale_for(form: str, hkv: int) -> jax.Array:
    """The tests' scales: ``KV_SCALE`` ``[2]``, or ``[2, hkv]`` differing per head."""
    if form == "per-layer":
        return KV_SCALE
    return KV_SCALE[:, None] * jnp.asarray(HEAD_FACTORS[:hkv], jnp.float32)[None, :]


def pool_scales(kv_scale: jax.Array, hkv: int) -> jax.Array:
    """``kv_scale`` shaped to divide a pool's ``[..., Hkv, 2, page, D]`` values."""
    return jnp.broadcast_to(kv_scale.reshape(2, -1), (2, hkv)).T[:, :, None, None]
KV_MAGNITUDE = 4.0
"""Pool values are this times a unit normal: stored as values up to ~16 / 0.125 = 128."""
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def fp8_batch(seed, q_lens, ctx_lens, *, dtype, kv_scale=KV_SCALE, **geometry):
    """``make_batch`` with its pool scaled by ``KV_MAGNITUDE`` (and per head as ``kv_scale``
    is) and quantized to e4m3 with ``kv_scale``: (q, the high-precision pool, the e4m3 pool,
    tables, context lengths, query start locations)."""
    q, pool, tables, ctx, qsl = make_batch(seed, q_lens, ctx_lens, dtype=jnp.float32, **geometry)
    scales = pool_scales(kv_scale, pool.shape[2])
    pool = pool * KV_MAGNITUDE * scales / pool_scales(KV_SCALE, pool.shape[2])
    fp8 = quantize_kv(pool, scales)
    return q.astype(dtype), pool, fp8, tables, ctx, qsl


def check_against_reference(out, q, fp8_pool, tables, ctx, qsl, dtype, real, kv_scale=KV_SCALE,
                            **kw):
    want = reference.paged_attention_reference(q.astype(jnp.float32), fp8_pool, 1, tables, ctx,
                                               qsl, kv_scale=kv_scale, **kw)
    assert rel_err(out[:real], want[:real]) < TOL[dtype]
    assert np.all(np.asarray(out[real:], np.float32) == 0)  # padding tokens: zeros


PREFILL_CASES = [
    # name, q_lens, ctx_lens, page, hkv, group, d, window, soft_cap
    ("ragged, cached prefixes, g4 d128", [1, 7, 16, 20], [1, 23, 40, 20], 8, 2, 4, 128, 0, None),
    ("sliding window g8 d64", [9, 1, 33], [40, 17, 33], 16, 1, 8, 64, 6, None),
    ("soft cap + window, g3", [5, 12], [30, 12], 4, 2, 3, 64, 9, 20.0),
]


@pytest.mark.parametrize("form", SCALE_FORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_reads_fp8_pool(case, dtype, form):
    _, q_lens, ctx_lens, page, hkv, group, d, window, cap = case
    kv_scale = kv_scale_for(form, hkv)
    q, _, fp8, tables, ctx, qsl = fp8_batch(len(q_lens) + d, q_lens, ctx_lens, page=page, hkv=hkv,
                                            group=group, d=d, dtype=dtype, kv_scale=kv_scale)
    kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
    out = paged_prefill_attention(q, fp8, jnp.int32(1), tables, ctx, qsl, block_m=16,
                                  block_n=16, interpret=True, kv_scale=kv_scale, **kw)
    check_against_reference(out, q, fp8, tables, ctx, qsl, dtype, sum(q_lens), kv_scale, **kw)


DECODE_CASES = [
    # name, ctx_lens, page, hkv, group, d, window, soft_cap, splits
    ("ragged g4 d128 one split", [1, 37, 64, 100], 8, 2, 4, 128, 0, None, 1),
    ("split-K g8 d64", [3, 77, 130], 16, 2, 8, 64, 0, None, 4),
    ("split-K g1 window", [50, 9, 64], 32, 2, 1, 64, 20, None, 3),
    ("soft cap g3", [64, 200, 1], 64, 2, 3, 64, 0, 30.0, 2),
]


@pytest.mark.parametrize("form", SCALE_FORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_reads_fp8_pool(case, dtype, form):
    _, ctx_lens, page, hkv, group, d, window, cap, splits = case
    batch = len(ctx_lens)
    kv_scale = kv_scale_for(form, hkv)
    q, _, fp8, tables, ctx, _ = fp8_batch(batch + d, [1] * batch, ctx_lens, page=page, hkv=hkv,
                                          group=group, d=d, dtype=dtype, pad_tokens=1,
                                          kv_scale=kv_scale)
    qsl = jnp.arange(batch + 2, dtype=jnp.int32)
    kw = dict(scale=0.7, soft_cap=cap, sliding_window=jnp.int32(window))
    out = paged_decode_attention(q, fp8, jnp.int32(1), tables, ctx, block_k=16,
                                 num_splits=splits, interpret=True, kv_scale=kv_scale, **kw)
    check_against_reference(out, q, fp8, tables, ctx, qsl, dtype, batch, kv_scale, **kw)


@pytest.mark.parametrize("form", SCALE_FORMS)
@pytest.mark.parametrize("window, soft_cap", [(0, None), (7, 20.0)])
def test_xla_path_and_mixed_dispatch_read_fp8_pool(window, soft_cap, form):
    q_lens, ctx_lens = [1, 9, 1, 12], [70, 30, 5, 33]
    kv_scale = kv_scale_for(form, 2)
    q, _, fp8, tables, ctx, qsl = fp8_batch(11, q_lens, ctx_lens, page=16, hkv=2, group=4, d=64,
                                            dtype=jnp.float32, kv_scale=kv_scale)
    kw = dict(scale=0.125, soft_cap=soft_cap, sliding_window=jnp.int32(window))
    xla = paged_attention_xla(q, fp8, 1, tables, ctx, qsl, kv_scale=kv_scale, **kw)
    check_against_reference(xla, q, fp8, tables, ctx, qsl, jnp.float32, sum(q_lens), kv_scale,
                            **kw)
    mixed = ops.paged_attention(q, fp8, jnp.int32(1), tables, ctx, qsl, kv_scale=kv_scale,
                                impl="interpret", **kw)
    check_against_reference(mixed, q, fp8, tables, ctx, qsl, jnp.float32, sum(q_lens), kv_scale,
                            **kw)


def test_per_head_scales_are_each_heads_own():
    """The reference applies head h's scale to head h: the same stored values read with the
    heads' scales swapped give another result, and scales equal across heads give the
    per-layer result exactly."""
    q_lens, ctx_lens = [1, 9], [40, 30]
    per_head = kv_scale_for("per-head", 2)
    q, _, fp8, tables, ctx, qsl = fp8_batch(12, q_lens, ctx_lens, page=16, hkv=2, group=4, d=64,
                                            dtype=jnp.float32, kv_scale=per_head)
    kw = dict(scale=0.125)
    attend = lambda s: reference.paged_attention_reference(q, fp8, 1, tables, ctx, qsl,
                                                           kv_scale=s, **kw)
    assert rel_err(attend(per_head[:, ::-1])[:10], attend(per_head)[:10]) > 0.1
    np.testing.assert_array_equal(np.asarray(attend(jnp.stack([KV_SCALE] * 2, axis=1))),
                                  np.asarray(attend(KV_SCALE)))


def test_a_scale_of_the_wrong_shape_is_refused():
    pool = jnp.ones((1, 2, 3, 2, 4, 16), FP8_KV_DTYPE)
    k = jnp.ones((1, 3, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\[2, 3\] \(one per KV head"):
        ops.write_kv(pool, 0, k, k, jnp.zeros(1, jnp.int32), kv_scale=jnp.ones((2, 2)), impl="xla")


FP8_ERROR_BOUND = 0.05
"""Relative (Frobenius) error of attention over an e4m3 pool against the float32 pool it was
quantized from. e4m3 rounds to 3 mantissa bits: at most 1/16 relative per element, 2.6 % RMS
over this pool; the attention outputs measured 3.2 % (with and without window and soft-cap):
averaging over keys shrinks the outputs more than their independent rounding errors."""


@pytest.mark.parametrize("window, soft_cap", [(0, None), (6, 30.0)])
def test_fp8_pool_error_against_high_precision_pool(window, soft_cap):
    q_lens, ctx_lens = [1, 16, 1, 40], [90, 16, 33, 100]
    q, pool, fp8, tables, ctx, qsl = fp8_batch(5, q_lens, ctx_lens, page=16, hkv=2, group=4,
                                               d=128, dtype=jnp.float32)
    kw = dict(scale=128 ** -0.5 / KV_MAGNITUDE, soft_cap=soft_cap,
              sliding_window=jnp.int32(window))
    exact = reference.paged_attention_reference(q, pool, 1, tables, ctx, qsl, **kw)
    quantized = reference.paged_attention_reference(q, fp8, 1, tables, ctx, qsl,
                                                    kv_scale=KV_SCALE, **kw)
    real = sum(q_lens)
    assert 0 < rel_err(quantized[:real], exact[:real]) < FP8_ERROR_BOUND


@pytest.mark.parametrize("form", SCALE_FORMS)
def test_write_quantizes_like_the_reference_and_clamps(form):
    kv_scale = kv_scale_for(form, 3)
    rng = np.random.default_rng(3)
    pool = jnp.asarray(rng.standard_normal((3, 9, 3, 2, 8, 64)), FP8_KV_DTYPE)
    k = rng.standard_normal((21, 3, 64)).astype(np.float32)
    k[4, 1, :5] = [1e4, -1e4, 300.0, -250.0, 1e-3]  # past e4m3's range once scaled: clamped
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(rng.standard_normal((21, 3, 64)), jnp.bfloat16)
    slots = rng.permutation(9 * 8)[:21].astype(np.int32)
    slots[[0, 5, 20]] = -1  # padding tokens write nothing
    got = write_kv_pallas(pool, jnp.int32(2), k, v, jnp.asarray(slots), kv_scale, block_t=8,
                          interpret=True)
    want = reference.write_kv_reference(pool, 2, k, v, jnp.asarray(slots), kv_scale)
    got_bits, want_bits = (np.asarray(a).view(np.uint8) for a in (got, want))
    np.testing.assert_array_equal(got_bits, want_bits)
    stored = np.asarray(got, np.float32)
    assert np.all(np.isfinite(stored)) and np.abs(stored).max() == FP8_KV_MAX
    page, offset = divmod(int(slots[4]), 8)
    np.testing.assert_array_equal(stored[2, page, 1, 0, offset, :2], [FP8_KV_MAX, -FP8_KV_MAX])
    # Dequantized, a written row is the input to within e4m3's rounding.
    page, offset = divmod(int(slots[7]), 8)
    v_scale = np.broadcast_to(np.asarray(kv_scale).reshape(2, -1)[1], (3,))[:, None]
    np.testing.assert_allclose(stored[2, page, :, 1, offset] * v_scale,
                               np.asarray(v[7], np.float32), rtol=1 / 16, atol=v_scale.max() / 2 ** 9)
    untouched = np.ones(9, bool)
    untouched[[int(s) // 8 for s in slots if s >= 0]] = False
    np.testing.assert_array_equal(got_bits[:, untouched], np.asarray(pool).view(np.uint8)[:, untouched])


@pytest.mark.parametrize("form", SCALE_FORMS)
def test_write_then_attend_in_a_layer_scan_on_fp8_pool(form):
    """The model's pattern over an e4m3 pool: each layer's scales (per layer or per head)
    scanned with the layer index."""
    layers, hkv, group, d, page = 3, 2, 2, 64, 8
    q_lens, ctx_lens = [1, 12], [21, 12]
    _, _, pool, tables, ctx, qsl = fp8_batch(9, q_lens, ctx_lens, page=page, hkv=hkv, group=group,
                                             d=d, dtype=jnp.float32, layers=layers, pad_tokens=2)
    rng = np.random.default_rng(4)
    total = sum(q_lens) + 2
    pos = np.concatenate([np.arange(c - n, c) for n, c in zip(q_lens, ctx_lens)])
    seq = np.repeat(np.arange(len(q_lens)), q_lens)
    slots = np.asarray(tables)[seq, pos // page] * page + pos % page
    slots = jnp.asarray(np.concatenate([slots, [-1, -1]]), jnp.int32)
    layer_scales = jnp.asarray([[0.5, 0.125], [1.0, 1.0], [0.25, 2.0]], jnp.float32)
    if form == "per-head":
        layer_scales = layer_scales[:, :, None] * jnp.asarray(HEAD_FACTORS[:hkv], jnp.float32)
    xs = (jnp.arange(layers, dtype=jnp.int32),
          jnp.asarray(rng.standard_normal((layers, total, hkv * group, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((layers, total, hkv, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((layers, total, hkv, d)), jnp.float32),
          jnp.asarray([0, 5, 0], jnp.int32),
          layer_scales)

    def run(pool, impl):
        def step(pool, x):
            layer, q, k, v, window, kv_scale = x
            pool = ops.write_kv(pool, layer, k, v, slots, kv_scale=kv_scale, impl=impl)
            out = ops.paged_attention(q, pool, layer, tables, ctx, qsl, scale=0.125,
                                      sliding_window=window, kv_scale=kv_scale, impl=impl)
            return pool, out
        return jax.jit(lambda p: jax.lax.scan(step, p, xs))(pool)

    want_pool, want = run(pool, "reference")
    got_pool, got = run(pool, "interpret")
    np.testing.assert_array_equal(np.asarray(got_pool).view(np.uint8),
                                  np.asarray(want_pool).view(np.uint8))
    assert rel_err(got[:, :13], want[:, :13]) < 1e-5
    assert np.all(np.asarray(got[:, 13:]) == 0)


def test_a_scale_for_a_high_precision_pool_is_refused():
    pool = jnp.ones((1, 2, 1, 2, 4, 16), jnp.bfloat16)
    k = jnp.ones((1, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="kv_scale applies to an FP8 KV pool only"):
        ops.write_kv(pool, 0, k, k, jnp.zeros(1, jnp.int32), kv_scale=KV_SCALE, impl="xla")


def test_mosaic_gpu_prefill_refuses_fp8_pools_by_name():
    reason = unsupported_reason((64, 8, 128), jnp.bfloat16, (2, 4, 2, 2, 16, 128), FP8_KV_DTYPE,
                                MgpuPrefillConfig(block_kv=128, num_stages=2))
    assert reason is not None and "FP8" in reason


def test_fp8_pool_dots_run_in_float16_for_bfloat16_queries():
    """Over an e4m3 pool, bf16 queries meet the keys as float16 operands (every e4m3 value is a
    float16; Hopper converts e4m3 to float16 in one instruction): as exact as bf16 operands on
    q and K, finer on the softmax weights, so closer to the reference. A query beyond float16's
    range is clamped, never infinite."""
    ctx_lens = [37, 64, 100]
    batch = len(ctx_lens)
    q, _, fp8, tables, ctx, _ = fp8_batch(31, [1] * batch, ctx_lens, page=8, hkv=2, group=4,
                                          d=64, dtype=jnp.bfloat16, pad_tokens=1)
    qsl = jnp.arange(batch + 2, dtype=jnp.int32)
    assert fp8_operand_dtype(jnp.bfloat16) == jnp.float16
    assert fp8_operand_dtype(jnp.float32) == jnp.float32
    want = reference.paged_attention_reference(q.astype(jnp.float32), fp8, 1, tables, ctx, qsl,
                                               kv_scale=KV_SCALE, scale=0.7)
    errors = {}
    for operands in ("float16", "bfloat16"):
        out = paged_decode_attention(q, fp8, jnp.int32(1), tables, ctx, scale=0.7, block_k=16,
                                     interpret=True, kv_scale=KV_SCALE, fp8_dot_dtype=operands)
        assert out.dtype == jnp.bfloat16
        errors[operands] = rel_err(out[:batch], want[:batch])
    assert errors["float16"] < errors["bfloat16"] < TOL[jnp.bfloat16], errors
    huge = q.at[0, 0, 0].set(1e6)
    out = paged_decode_attention(huge, fp8, jnp.int32(1), tables, ctx, scale=0.7, block_k=16,
                                 interpret=True, kv_scale=KV_SCALE)
    assert np.isfinite(np.asarray(out, np.float32)).all()


def _conversions(jaxpr) -> set[tuple[str, str]]:
    """(from, to) dtypes of every convert_element_type in ``jaxpr``, kernels' bodies included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type":
            found.add((str(eqn.invars[0].aval.dtype), str(eqn.params["new_dtype"])))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found |= _conversions(inner)
    return found


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_e4m3_rows_convert_once_to_float16(kernel):
    """The point of float16 operands: each e4m3 K/V element is converted once, straight to
    float16 (one instruction a pair on Hopper), never through bfloat16."""
    spec = jax.ShapeDtypeStruct
    q = spec((4, 32, 128), jnp.bfloat16)
    pool = spec((2, 64, 8, 2, 16, 128), FP8_KV_DTYPE)
    tables, lens = spec((4, 32), jnp.int32), spec((4,), jnp.int32)
    scale = spec((2, 8), jnp.float32)
    if kernel == "decode":
        fn = lambda q, p, t, c, s: paged_decode_attention(q, p, 1, t, c, scale=0.1, block_k=64,
                                                          num_splits=2, kv_scale=s)
        args = (q, pool, tables, lens, scale)
    else:
        fn = lambda q, p, t, c, qsl, s: paged_prefill_attention(q, p, 1, t, c, qsl, scale=0.1,
                                                                block_m=64, block_n=64,
                                                                kv_scale=s)
        args = (q, pool, tables, lens, spec((5,), jnp.int32), scale)
    conversions = {(a, b) for a, b in _conversions(jax.make_jaxpr(fn)(*args).jaxpr)
                   if a == "float8_e4m3fn"}
    assert conversions == {("float8_e4m3fn", "float16")}
