"""The Mosaic GPU decode kernel against the float32 reference.

On CPU it runs in Mosaic GPU interpret mode, which supports neither wgmma with a register
operand nor ``pl.run_state`` (P goes through shared memory, ``p_in_registers=False``), runs the
grid's programs one after another, and checks barrier protocols but not register layouts.
Interpret mode can stall on machines with few cores, so each interpreted test has a time limit
(as in test_prefill_mgpu.py). The GPU-marked tests run the compiled kernel on Hopper.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops, reference
from pallas_kernels.decode_attention_mgpu import (MgpuDecodeConfig, item_keys,
                                                  paged_decode_attention_mgpu, q_box_rows,
                                                  unsupported_reason, work_order)
from pallas_kernels.persistent_grid import balanced_splits, sm_share
from tests.pallas_kernels.fresh_process import STALL_SECONDS, in_fresh_process
from tests.pallas_kernels.test_kernels import make_batch, rel_err

TOL = 1e-2  # bf16 inputs and P; the reference is float32

CASES = [
    # name, ctx_lens, page, hkv, group, d, window, soft_cap, block_kv, splits, programs
    ("ragged g4 d128, one split, direct", [1, 37, 64, 100], 16, 2, 4, 128, 0, None, 32, 1, 3),
    ("splits g8 d64, lengths not page multiples", [3, 77, 130], 16, 2, 8, 64, 0, None, 32, 3, 4),
    ("g4 d256 window, splits", [50, 9, 64], 16, 2, 4, 256, 20, None, 16, 2, 3),
    ("soft cap g4, pages larger than a block", [64, 200, 1], 64, 2, 4, 64, 0, 30.0, 32, 2, 2),
    ("window + soft cap g8 d128, direct", [90, 5, 33], 16, 1, 8, 128, 37, 20.0, 32, 1, 2),
    ("more programs than items", [40], 8, 1, 4, 64, 0, None, 16, 1, 5),
    ("g1 d64 splits, rows at every tile offset", [20, 70, 33], 16, 3, 1, 64, 0, None, 16, 2, 3),
    ("g2 d128 soft cap, splits", [45, 9, 64], 16, 2, 2, 128, 0, 30.0, 16, 3, 4),
]


def interpret_config(case, num_stages=2) -> MgpuDecodeConfig:
    return MgpuDecodeConfig(block_kv=case[8], num_stages=num_stages, p_in_registers=False)


def run_case(case, config, *, interpret, seed=0):
    _, ctx_lens, page, hkv, group, d, window, cap, _, splits, programs = case
    batch = len(ctx_lens)
    q, pool, tables, ctx, _ = make_batch(seed + d + batch, [1] * batch, ctx_lens, page=page,
                                         hkv=hkv, group=group, d=d, dtype=jnp.bfloat16,
                                         pad_tokens=1)
    qsl = jnp.arange(batch + 2, dtype=jnp.int32)  # the padding sequence owns the padding token
    kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
    out = paged_decode_attention_mgpu(q, pool, jnp.int32(1), tables, ctx, config=config,
                                      num_programs=programs if interpret else None,
                                      num_splits=splits if interpret else None,
                                      interpret=interpret, **kw)
    want = reference.paged_attention_reference(q.astype(jnp.float32), pool.astype(jnp.float32),
                                               1, tables, ctx, qsl, **kw)
    return np.asarray(out, np.float32), np.asarray(want, np.float32), batch


def check(out, want, batch):
    assert out.shape == want.shape
    assert rel_err(out[:batch], want[:batch]) < TOL
    assert np.all(out[batch:] == 0)  # the padding sequence (context 0): zeros


@pytest.mark.timeout(2 * STALL_SECONDS + 30)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@in_fresh_process
def test_interpret_matches_reference(case):
    check(*run_case(case, interpret_config(case), interpret=True))


@pytest.mark.timeout(2 * STALL_SECONDS + 30)
@in_fresh_process
def test_interpret_deep_ring_wraps_across_items():
    case = ("deep ring", [130, 47, 1, 96], 16, 2, 4, 64, 0, None, 16, 2, 3)
    check(*run_case(case, interpret_config(case, num_stages=4), interpret=True))


def test_item_keys_cover_the_visible_keys_once():
    ctx, window, splits, block = 203, 70, 3, 16
    ranges = [item_keys(jnp.int32(ctx), jnp.int32(window), s, num_splits=splits, block_kv=block)
              for s in range(splits)]
    lowest = int(ranges[0][2])
    assert lowest == ctx - window
    covered = np.zeros(ctx, int)
    for start, end, _ in ranges:
        assert int(start) % block == 0
        covered[int(start):max(int(start), int(end))] += 1
    assert np.all(covered[lowest:] == 1) and np.all(covered[:int(ranges[0][0])] == 0)


def test_work_order_puts_heaviest_items_first():
    order = np.asarray(work_order(jnp.asarray([5, 300, 0, 64], jnp.int32), jnp.int32(0),
                                  num_kv_heads=2, num_splits=2, block_kv=16))
    assert sorted(order.tolist()) == list(range(16))
    assert {int(i) // 4 for i in order[:4]} == {1}  # sequence 1's 4 items (2 heads x 2 splits)
    assert {int(i) // 4 for i in order[-4:]} == {2} or int(order[-1]) // 4 == 2


def test_q_box_holds_the_group_wherever_it_starts():
    """Groups start at multiples of the group in q's rows; the box starts on the 8-row tile
    of the first row and is the fewest whole tiles that reach the group's last row."""
    for group in range(1, 65):
        reach = max(row0 % 8 + group for row0 in range(0, 8 * group, group))
        assert q_box_rows(group) == -(-reach // 8) * 8
    assert [q_box_rows(g) for g in (1, 2, 3, 4, 8, 16)] == [8, 8, 16, 8, 8, 16]


def test_sm_share_and_balanced_splits():
    assert sm_share(132, "") == 132
    assert sm_share(132, "30") == 39  # rounded down: never a second wave
    assert sm_share(132, "100") == 132
    with pytest.raises(ValueError):
        sm_share(132, "0")
    assert balanced_splits(512, 64, 132) == 1  # 64 x 2k, 8 kv heads: 4 rounds, 97 % full
    assert balanced_splits(8, 1024, 132) == 16  # 1 x 32k: 128 items on 132 programs
    for items, programs in ((8, 39), (512, 39), (1024, 66)):
        work = items * balanced_splits(items, 1024, programs)
        assert work / (-(-work // programs) * programs) >= 0.95
    assert balanced_splits(8, 2, 132) == 1  # a split keeps two blocks


def test_the_device_count_is_taken_as_the_share_under_mps(monkeypatch):
    """CUDA already reports an MPS client's share as the device's SM count (38 of 132 at
    30 % on an H100): taking the share of it again gave 11 programs on 38 SMs."""
    import jax

    reported = getattr(jax.devices()[0], "core_count", None) or 1
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "30")
    assert sm_share() == reported
    with pytest.raises(ValueError, match="already the MPS share"):
        sm_share(None, "30")


def test_unsupported_shapes_say_why():
    cfg = MgpuDecodeConfig()
    pool = (2, 10, 2, 2, 16, 128)
    assert unsupported_reason((8, 8, 128), jnp.bfloat16, pool, jnp.bfloat16, cfg) is None
    assert "head_dim" in unsupported_reason((8, 8, 96), jnp.bfloat16, (2, 10, 2, 2, 16, 96),
                                            jnp.bfloat16, cfg)
    assert "dtypes" in unsupported_reason((8, 8, 128), jnp.float32, pool, jnp.float32, cfg)
    assert "even" in unsupported_reason((8, 8, 128), jnp.bfloat16, pool, jnp.bfloat16,
                                        MgpuDecodeConfig(num_stages=3))
    assert unsupported_reason((8, 8, 128), jnp.bfloat16, (2, 10, 8, 2, 16, 128), jnp.bfloat16,
                              cfg) is None  # groups of 1
    assert "q heads" in unsupported_reason((8, 12, 128), jnp.bfloat16, (2, 10, 8, 2, 16, 128),
                                           jnp.bfloat16, cfg)
    assert "shared memory" in unsupported_reason((8, 8, 128), jnp.bfloat16, pool, jnp.bfloat16,
                                                 MgpuDecodeConfig(block_kv=64, num_stages=8))


def test_decode_kernel_choice(monkeypatch):
    monkeypatch.delenv("DUETJAX_DECODE_KERNEL", raising=False)
    assert ops.decode_kernel_choice(compute_capability="9.0") == "triton"  # the default
    monkeypatch.setenv("DUETJAX_DECODE_KERNEL", "mgpu")
    assert ops.decode_kernel_choice(compute_capability="9.0") == "mgpu"
    assert ops.decode_kernel_choice(compute_capability="8.0") == "triton"  # no TMA/wgmma
    monkeypatch.setenv("DUETJAX_DECODE_KERNEL", "cuda")
    with pytest.raises(ValueError, match="DUETJAX_DECODE_KERNEL"):
        ops.decode_kernel_choice(compute_capability="9.0")


# ------------------------------------------------------------------ on the GPU (Hopper)
GPU_CONFIGS = [MgpuDecodeConfig(), MgpuDecodeConfig(p_in_registers=False),
               MgpuDecodeConfig(block_kv=64, num_stages=4)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_reference(case, config):
    from pallas_kernels import tuning
    d = case[5]
    if unsupported_reason((8, 8, d), jnp.bfloat16, (1, 1, 1, 2, case[2], d), jnp.bfloat16,
                          config):
        config = tuning.decode_mgpu_config(d)
    check(*run_case(case, config, interpret=False))


@pytest.mark.gpu
@pytest.mark.parametrize("programs,splits", [(7, 1), (7, 3), (132, None), (39, None)])
def test_gpu_grid_and_splits_match_reference(programs, splits):
    """Rounds, snake order and the combine at the grid sizes of a whole H100 and a 30 % share."""
    q, pool, tables, ctx, _ = make_batch(11, [1] * 6, [1, 300, 2048, 77, 16, 1000], page=16,
                                         hkv=8, group=4, d=128, dtype=jnp.bfloat16, pad_tokens=1)
    kw = dict(scale=128 ** -0.5, soft_cap=None, sliding_window=jnp.int32(0))
    got = paged_decode_attention_mgpu(q, pool, jnp.int32(1), tables, ctx, num_programs=programs,
                                      num_splits=splits, **kw)
    want = reference.paged_attention_reference(q.astype(jnp.float32), pool.astype(jnp.float32),
                                               1, tables, ctx, jnp.arange(8, dtype=jnp.int32),
                                               **kw)
    check(np.asarray(got, np.float32), np.asarray(want, np.float32), 6)


@pytest.mark.gpu
def test_gpu_ops_dispatch_to_mgpu_matches_reference(monkeypatch):
    monkeypatch.setenv("DUETJAX_DECODE_KERNEL", "mgpu")
    ops.decode_kernel.cache_clear()
    assert ops.decode_kernel() == "mgpu", "not a Hopper GPU"
    q, pool, tables, ctx, qsl = make_batch(3, [1, 1, 1, 1], [300, 37, 1, 1000], page=16,
                                           hkv=2, group=4, d=128, dtype=jnp.bfloat16)
    kw = dict(scale=128 ** -0.5, soft_cap=None, sliding_window=jnp.int32(0))
    got = jax.jit(lambda *a: ops.paged_attention(*a, impl="pallas", decode_only=True, **kw))(
        q[:4], pool, jnp.int32(1), tables[:4], ctx[:4], qsl[:5])
    want = reference.paged_attention_reference(q.astype(jnp.float32), pool.astype(jnp.float32),
                                               1, tables, ctx, qsl, **kw)
    ops.decode_kernel.cache_clear()
    assert rel_err(got, want[:4]) < TOL
