"""The CPU (plain XLA) paged attention against the reference, on random ragged batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.xla_attention import paged_attention_xla


def ragged_batch(rng, q_lens, ctx_lens, num_pages, page, num_kv_heads, group, head_dim, width):
    pool = rng.standard_normal((2, num_pages, num_kv_heads, 2, page, head_dim)).astype(np.float32)
    perm = rng.permutation(num_pages)  # pages scattered through the pool
    tables = np.zeros((len(ctx_lens) + 1, width), np.int32)  # one padding sequence at the end
    used = 0
    for s, c in enumerate(ctx_lens):
        n = -(-c // page)
        tables[s, :n] = perm[used:used + n]
        used += n
    qsl = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)]]).astype(np.int32)
    total = sum(q_lens) + 3  # three padding tokens
    q = rng.standard_normal((total, num_kv_heads * group, head_dim)).astype(np.float32)
    return (jnp.asarray(q), jnp.asarray(pool), jnp.asarray(tables),
            jnp.asarray(list(ctx_lens) + [0], jnp.int32), jnp.asarray(qsl))


@pytest.mark.parametrize("window, soft_cap", [(0, None), (5, None), (0, 30.0), (7, 20.0)])
@pytest.mark.parametrize("group", [1, 4])
def test_matches_reference(window, soft_cap, group):
    rng = np.random.default_rng(window + group)
    q_lens, ctx_lens = [1, 7, 16, 1], [1, 23, 16, 40]
    q, pool, tables, ctx, qsl = ragged_batch(rng, q_lens, ctx_lens, 32, 8, 2, group, 16, width=16)
    kwargs = dict(scale=0.3, soft_cap=soft_cap, sliding_window=jnp.int32(window))
    got = jax.jit(lambda *a: paged_attention_xla(*a, **kwargs))(q, pool, jnp.int32(1), tables, ctx, qsl)
    want = paged_attention_reference(q, pool, 1, tables, ctx, qsl, **kwargs)
    real = sum(q_lens)
    np.testing.assert_allclose(np.asarray(got[:real]), np.asarray(want[:real]), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[real:]) == 0)  # padding rows come out as zeros
