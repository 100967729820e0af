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


def test_reused_inputs_equal_fresh_ones():
    """``Reuse`` shares the settings and block tables of consecutive steps of the same requests:
    every array must equal a fresh build's, also after a table grew, after a request lost its
    pages and got as many new ones, in another order, and for a mixed step."""
    from duetjax.core.block_manager import BlockManager
    from duetjax.core.request import PENDING, Request
    from duetjax.core.scheduler import ScheduledRequest, SchedulerOutput
    from duetjax.core.step_inputs import Reuse, bucket_for
    from duetjax.sampling_params import SamplingParams

    page, width = 4, 8
    blocks = BlockManager(num_pages=40, page_size=page, enable_prefix_caching=False)
    rng = np.random.default_rng(1)
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, logprobs=2),
                SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5,
                               repetition_penalty=1.25, logit_bias={3: -1.0})]
    requests = []
    for i, params in enumerate(settings):
        r = Request(f"r{i}", rng.integers(3, 100, 5 + i).tolist(), params, seed=i)
        r.penalty_slot = 7 if params.penalized else None
        blocks.grow(r, len(r.prompt_token_ids))
        r.num_computed_tokens = len(r.prompt_token_ids) - 1  # its last prompt token decodes next
        requests.append(r)
    reuse = Reuse()
    in_flight: list = []  # the dispatch in flight: the row of each request's PENDING token

    def check(items, steps=1):
        batch = SchedulerOutput([ScheduledRequest(r, n, steps) for r, n in items], [], steps)
        b = bucket_for(batch, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32))
        fresh = build_inputs(b, batch, page, width, in_flight=in_flight)
        reused = build_inputs(b, batch, page, width, reuse, in_flight)
        for want, got in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(reused)):
            assert want.dtype == got.dtype
            np.testing.assert_array_equal(got, want)
        return reused

    def decode_all(rows):
        """Each request's next token is sampled into row ``rows[i]`` of a step in flight."""
        in_flight[:] = [None] * len(rows)
        for r, row in zip(requests, rows):
            r.num_computed_tokens = r.num_tokens
            r.output_token_ids.append(PENDING)
            in_flight[row] = ScheduledRequest(r, 1)
            blocks.grow(r, r.num_tokens)

    x = check([(r, 1) for r in requests])
    assert x.tokens[:3].tolist() == [r.prompt_token_ids[-1] for r in requests]
    assert x.from_previous[:3].tolist() == [-1, -1, -1]
    assert x.penalties.repetition.tolist() == [1, 1, 1.25, 1]  # (padding rows: off)
    assert x.penalties.biased.tolist() == [False, False, True, False]
    for rows in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # tables grow past page boundaries meanwhile
        decode_all(rows)
        x = check([(r, 1) for r in requests])
        assert x.tokens[:3].tolist() == [PENDING] * 3 and x.from_previous[:3].tolist() == rows
    assert check([(r, 1) for r in requests]).meta.block_tables is x.meta.block_tables  # shared
    blocks.free(requests[1])  # as a preemption does; then as many pages again, other ones
    blocks.grow(requests[1], requests[1].num_tokens)
    assert check([(r, 1) for r in requests]).meta.block_tables is not x.meta.block_tables
    check([(r, 1) for r in requests[::-1]])
    requests[2].num_computed_tokens = 2  # recomputing: a chunk of its prompt, then one token of it
    check([(requests[0], 1), (requests[2], 3)])
    x = check([(requests[0], 1), (requests[2], 1)])
    assert x.tokens[1] == requests[2].prompt_token_ids[2] and x.from_previous[1] == -1
