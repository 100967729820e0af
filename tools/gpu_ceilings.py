"""The two hardware ceilings every GPU figure is compared with, measured in the same run:
device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def time_fn(fn, *args, reps: int = 20, per_call: int = 1, min_s: float = 0.25) -> float:
    """Median seconds per call after a warm-up; ``fn`` runs ``per_call`` units back to back."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    while time.perf_counter() - start < 0.1:
        jax.block_until_ready(fn(*args))
    times = []
    begin = time.perf_counter()
    while len(times) < reps or time.perf_counter() - begin < min_s:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / per_call


def copy_bandwidth(gib: float = 2.0) -> dict[str, float]:
    """TB/s of a few elementwise passes over ``gib`` GiB (bytes read + written)."""
    out = {}
    for name, dtype, fn in (("copy bf16", jnp.bfloat16, jnp.copy),
                            ("neg bf16", jnp.bfloat16, lambda a: -a),
                            ("add u32", jnp.uint32, lambda a: a + 1)):
        shape = (int(gib * (1 << 30)) // jnp.dtype(dtype).itemsize // (1 << 20), 1 << 20)
        if dtype == jnp.uint32:
            x = jax.random.bits(jax.random.key(0), shape, jnp.uint32)
        else:
            x = jax.random.normal(jax.random.key(0), shape, dtype)
        out[name] = 2 * x.nbytes / time_fn(jax.jit(fn), x) / 1e12
        del x
    return out


def ceilings(copy_gib: float = 2.0) -> dict:
    """{'copy_tb_s', 'copy_variants_tb_s', 'matmul_tflop_s'} on random (never zero) data."""
    copies = copy_bandwidth(copy_gib)
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    t = time_fn(jax.jit(lambda a, b: a @ b), a, b)
    return {"copy_tb_s": max(copies.values()), "copy_variants_tb_s": copies,
            "matmul_tflop_s": 2 * 8192 ** 3 / t / 1e12}
