"""The Mosaic GPU prefill kernel against the float32 reference.

On CPU it runs in Mosaic GPU interpret mode, which supports neither wgmma with a register
operand nor ``pl.run_state``: those tests take P through shared memory
(``p_in_registers=False``). Interpret mode runs each warpgroup as a host thread blocking on
simulated barriers; it has been seen to stall on a loaded machine with few cores, so each
interpreted test runs in a fresh process (``fresh_process.py``). The GPU-marked tests run the
kernel as compiled for Hopper, with the configurations the engine and the benchmark use.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops, reference, tuning
from pallas_kernels.prefill_attention_mgpu import (MgpuPrefillConfig,
                                                   paged_prefill_attention_mgpu,
                                                   unsupported_reason)
from tests.pallas_kernels.fresh_process import STALL_SECONDS, in_fresh_process
from tests.pallas_kernels.test_kernels import make_batch, rel_err

TOL = 1e-2  # bf16 inputs and P; the reference is float32

CASES = [
    # name, q_lens, ctx_lens, page, hkv, group, d, window, soft_cap, block_kv
    ("ragged g4 d128", [1, 7, 16, 1, 20], [1, 23, 16, 40, 20], 16, 2, 4, 128, 0, None, 64),
    ("cached prefix g1 d64", [20, 9], [70, 9], 16, 2, 1, 64, 0, None, 32),
    ("g8 d256", [12, 3], [12, 40], 16, 1, 8, 256, 0, None, 32),
    ("sliding window across tiles", [40, 5], [100, 5], 16, 1, 4, 64, 37, None, 32),
    ("soft cap + window", [5, 12], [30, 12], 16, 2, 1, 64, 9, 20.0, 32),
    ("pages larger than a tile", [9, 30], [80, 30], 64, 1, 4, 64, 0, 30.0, 32),
]
SLOW_CASES = [
    ("several q blocks, last rows clamped", [150, 40], [400, 40], 16, 1, 4, 64, 0, None, 64),
    ("long window, many skipped steps", [130], [300], 16, 1, 1, 128, 50, None, 64),
]


def run_case(case, config, *, interpret, skip_single_token=False, seed=0):
    _, q_lens, ctx_lens, page, hkv, group, d, window, cap, _ = case
    q, pool, tables, ctx, qsl = make_batch(seed + d, q_lens, ctx_lens, page=page, hkv=hkv,
                                           group=group, d=d, dtype=jnp.bfloat16)
    kw = dict(scale=d ** -0.5, soft_cap=cap, sliding_window=jnp.int32(window))
    out = paged_prefill_attention_mgpu(q, pool, jnp.int32(1), tables, ctx, qsl, config=config,
                                       interpret=interpret,
                                       skip_single_token=skip_single_token, **kw)
    want = reference.paged_attention_reference(q.astype(jnp.float32), pool.astype(jnp.float32),
                                               1, tables, ctx, qsl, **kw)
    return np.asarray(out, np.float32), np.asarray(want, np.float32), q_lens


def check(out, want, q_lens):
    real = sum(q_lens)
    assert out.shape == want.shape
    assert rel_err(out[:real], want[:real]) < TOL
    assert np.all(out[real:] == 0)  # padding tokens: zeros


def interpret_config(case) -> MgpuPrefillConfig:
    return MgpuPrefillConfig(block_kv=case[-1], p_in_registers=False, schedule_barrier=False)


@pytest.mark.timeout(2 * STALL_SECONDS + 30)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@in_fresh_process
def test_interpret_matches_reference(case):
    check(*run_case(case, interpret_config(case), interpret=True))


@pytest.mark.slow
@pytest.mark.timeout(2 * STALL_SECONDS + 30)
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c[0] for c in SLOW_CASES])
@in_fresh_process
def test_interpret_matches_reference_slow(case):
    check(*run_case(case, interpret_config(case), interpret=True))


@pytest.mark.timeout(2 * STALL_SECONDS + 30)
@in_fresh_process
def test_skip_single_token_leaves_those_rows_unwritten():
    case = CASES[0]
    out, want, q_lens = run_case(case, interpret_config(case), interpret=True,
                                 skip_single_token=True)
    starts = np.concatenate([[0], np.cumsum(q_lens)])
    single = {int(s) for s, n in zip(starts, q_lens) if n == 1}
    rows = [t for t in range(sum(q_lens)) if t not in single]
    assert rel_err(out[rows], want[rows]) < TOL
    assert not np.isfinite(out[sorted(single)]).any()  # interpret mode poisons outputs


def test_unsupported_shapes_say_why():
    cfg = MgpuPrefillConfig()
    pool = (2, 10, 2, 2, 16, 128)
    assert unsupported_reason((8, 8, 128), jnp.bfloat16, pool, jnp.bfloat16, cfg) is None
    assert "head_dim" in unsupported_reason((8, 8, 96), jnp.bfloat16, (2, 10, 2, 2, 16, 96),
                                            jnp.bfloat16, cfg)
    assert "dtypes" in unsupported_reason((8, 8, 128), jnp.float32, pool, jnp.float32, cfg)
    assert "shared memory" in unsupported_reason(
        (8, 8, 256), jnp.bfloat16, (2, 10, 2, 2, 16, 256), jnp.bfloat16,
        MgpuPrefillConfig(block_kv=128, num_stages=3))
    for d in (64, 128, 256):
        cfg = tuning.prefill_mgpu_config(d)
        assert unsupported_reason((8, 8, d), jnp.bfloat16, (2, 10, 2, 2, 16, d), jnp.bfloat16,
                                  cfg) is None


def test_prefill_kernel_choice(monkeypatch):
    monkeypatch.delenv("DUETJAX_PREFILL_KERNEL", raising=False)
    assert ops.prefill_kernel_choice(compute_capability="9.0") == "mgpu"  # the default on Hopper
    assert ops.prefill_kernel_choice(compute_capability="8.0") == "triton"  # no TMA/wgmma
    monkeypatch.setenv("DUETJAX_PREFILL_KERNEL", "triton")
    assert ops.prefill_kernel_choice(compute_capability="9.0") == "triton"
    assert ops.prefill_kernel_choice("mgpu", compute_capability="9.0") == "mgpu"  # over the env
    monkeypatch.setenv("DUETJAX_PREFILL_KERNEL", "mgpu")
    assert ops.prefill_kernel_choice(compute_capability="8.0") == "triton"
    monkeypatch.setenv("DUETJAX_PREFILL_KERNEL", "cuda")
    with pytest.raises(ValueError, match="DUETJAX_PREFILL_KERNEL"):
        ops.prefill_kernel_choice(compute_capability="9.0")


# ------------------------------------------------------------------ on the GPU (Hopper)
GPU_CONFIGS = [MgpuPrefillConfig(), MgpuPrefillConfig(schedule_barrier=False),
               MgpuPrefillConfig(p_in_registers=False), MgpuPrefillConfig(block_kv=64,
                                                                          num_stages=3)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=[c[0] for c in CASES + SLOW_CASES])
def test_gpu_matches_reference(case, config):
    d = case[6]
    if unsupported_reason((8, 8, d), jnp.bfloat16, (1, 1, 1, 2, case[3], d), jnp.bfloat16,
                          config):
        config = tuning.prefill_mgpu_config(d)
    check(*run_case(case, config, interpret=False))


@pytest.mark.gpu
def test_gpu_ops_dispatch_to_mgpu_matches_reference(monkeypatch):
    monkeypatch.setenv("DUETJAX_PREFILL_KERNEL", "mgpu")
    ops.prefill_kernel.cache_clear()
    assert ops.prefill_kernel() == "mgpu", "not a Hopper GPU"
    q, pool, tables, ctx, qsl = make_batch(3, [1, 37, 1, 128], [300, 37, 1, 1000], page=16,
                                           hkv=2, group=4, d=128, dtype=jnp.bfloat16)
    kw = dict(scale=128 ** -0.5, soft_cap=None, sliding_window=jnp.int32(0))
    got = jax.jit(lambda *a: ops.paged_attention(*a, impl="pallas", **kw))(
        q, pool, jnp.int32(1), tables, ctx, qsl)
    want = reference.paged_attention_reference(q.astype(jnp.float32), pool.astype(jnp.float32),
                                               1, tables, ctx, qsl, **kw)
    real = 1 + 37 + 1 + 128
    ops.prefill_kernel.cache_clear()
    assert rel_err(got[:real], want[:real]) < TOL
