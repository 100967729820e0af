"""duetjax/core/step_inputs.py: the packed step inputs round-trip on the host and inside an
executable."""
import jax
import numpy as np
import pytest

from duetjax.config import EngineConfig
from duetjax.core.step_inputs import (Bucket, advanced, build_inputs, layout_of, pack, plan_buckets,
                                 unpack, unpack_on_device)


def random_like(inputs, seed: int):
    """The bucket's arrays with random contents (padding is mostly zeros: a layout bug could
    hide behind it)."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        leaf = np.asarray(leaf)
        if leaf.dtype == np.bool_:
            return rng.random(leaf.shape) < 0.5
        if np.issubdtype(leaf.dtype, np.floating):
            return rng.standard_normal(leaf.shape).astype(leaf.dtype)
        info = np.iinfo(leaf.dtype)
        return rng.integers(max(info.min, -2**31), min(info.max, 2**31 - 1), leaf.shape, dtype=leaf.dtype)

    return jax.tree_util.tree_map(fill, inputs)


@pytest.mark.parametrize("b", plan_buckets(EngineConfig(max_num_seqs=4, max_num_batched_tokens=32), (1, 2)),
                         ids=str)
def test_pack_round_trips_on_host_and_device(b):
    inputs = random_like(build_inputs(b, None, page_size=16, max_pages_per_seq=5), seed=b.num_tokens)
    data = pack(inputs)
    on_host = unpack(inputs, data)
    on_device = jax.jit(unpack_on_device, static_argnums=0)(layout_of(inputs),
                                                            np.frombuffer(data, np.uint8))
    for got in (on_host, on_device):
        for want, leaf in zip(jax.tree_util.tree_leaves(inputs), jax.tree_util.tree_leaves(got)):
            assert np.asarray(leaf).dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(leaf), want)


def test_advancing_a_decode_step_moves_live_rows_only_the_same_on_host_and_device():
    import jax.numpy as jnp

    page, width = 4, 6
    x = random_like(build_inputs(Bucket(True, 8, 8), None, page_size=page, max_pages_per_seq=width), 3)
    rng = np.random.default_rng(4)
    context = rng.integers(1, page * width - 3, 8).astype(np.int32)
    context[[2, 7]] = 0  # padding rows
    x = x.replace(advance=np.array([3], np.int32),
                  meta=x.meta.replace(context_lens=context,
                                      positions=np.where(context > 0, context - 1, 0).astype(np.int32),
                                      block_tables=rng.integers(0, 50, (8, width)).astype(np.int32)))
    on_host = advanced(x, page)
    on_device = jax.jit(lambda x: advanced(x, page, jnp))(x)
    for want, got in zip(jax.tree_util.tree_leaves(on_host), jax.tree_util.tree_leaves(on_device)):
        np.testing.assert_array_equal(np.asarray(got), want)
    live = context > 0
    pos = np.where(live, context + 2, 0)  # the newest position, 3 steps on
    np.testing.assert_array_equal(on_host.meta.positions, pos)
    np.testing.assert_array_equal(on_host.meta.context_lens, np.where(live, context + 3, 0))
    slots = x.meta.block_tables[np.arange(8), pos // page] * page + pos % page
    np.testing.assert_array_equal(on_host.meta.slot_mapping, np.where(live, slots, -1))
    np.testing.assert_array_equal(on_host.sampling.counters,
                                  np.where(live, x.sampling.counters + 3, x.sampling.counters))
    mixed = build_inputs(Bucket(False, 16, 4), None, page_size=page, max_pages_per_seq=width)
    assert advanced(mixed, page) is mixed


def test_unpack_on_device_rejects_a_wrong_size():
    inputs = build_inputs(Bucket(True, 2, 2), None, page_size=16, max_pages_per_seq=3)
    with pytest.raises(ValueError, match="do not match the layout"):
        unpack_on_device(layout_of(inputs), np.zeros(len(pack(inputs)) + 4, np.uint8))


def test_step_padding_agrees_with_the_buckets():
    """The roofline costs the bucket a step runs in: its padding must be ``bucket_for``'s."""
    from types import SimpleNamespace

    from duetjax.core.step_inputs import bucket_for, step_padding

    rng = np.random.default_rng(0)
    for max_seqs, max_tokens in ((4, 32), (64, 2048), (48, 3000)):
        config = EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens)
        padding = step_padding(config, max_model_len=1000)
        assert padding.max_context == 1008  # whole pages of 16: the block tables' width
        for _ in range(200):
            seqs = int(rng.integers(1, max_seqs + 1))
            decode_only = bool(rng.random() < 0.4)
            tokens = seqs if decode_only else int(rng.integers(seqs, max_tokens + 1))
            batch = SimpleNamespace(decode_only=decode_only, scheduled=[None] * seqs, continues=None,
                                    num_tokens=tokens, num_steps=1)
            b = bucket_for(batch, config)
            assert padding.padded(tokens, seqs, decode_only) == (b.num_tokens, b.num_seqs)
