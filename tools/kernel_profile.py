"""One decode attention case for Nsight Compute: the kernel's launches inside a CUDA profiler
range and nothing else, so ``ncu --profile-from-start off`` reads exactly those.

    ncu --clock-control none --profile-from-start off --launch-count 1 --set full \\
        python tools/kernel_profile.py --kernel triton --kv-dtype float8_e4m3fn --batch 64 --ctx 2048

The inputs are built, the executable compiled and run once outside the range (ncu replays
the profiled launch many times to read its counters, so one launch in range is enough). Under
MPS (``--mps PERCENT``) the process starts its own client of a running daemon, or a private
daemon it stops afterwards, and runs the case in a child with the share set.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_bench import D, HKV, PAGE, decode_fn, decode_mgpu_fn, decode_setup  # noqa: E402
from pallas_kernels import tuning  # noqa: E402
from pallas_kernels.kv_layout import quantize_kv  # noqa: E402

KV_DTYPES = ("bfloat16", "float8_e4m3fn")


def profiler_range(start: bool) -> None:
    """cuProfilerStart / cuProfilerStop from the driver (always loadable where CUDA runs), on
    the device's primary context (XLA's), made current on this thread first: XLA keeps its
    contexts current on its own threads."""
    driver = ctypes.CDLL("libcuda.so.1")
    context, device = ctypes.c_void_p(), ctypes.c_int()
    if driver.cuCtxGetCurrent(ctypes.byref(context)) != 0 or not context.value:
        driver.cuDeviceGet(ctypes.byref(device), 0)
        driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
        driver.cuCtxSetCurrent(context)
    status = (driver.cuProfilerStart if start else driver.cuProfilerStop)()
    if status != 0:
        raise RuntimeError(f"cuProfiler{'Start' if start else 'Stop'} returned {status}")


def run_case(args: argparse.Namespace, profiler=profiler_range, interpret: bool = False) -> None:
    """Builds, compiles and warms the case, then launches it ``args.launches`` times between
    ``profiler(True)`` and ``profiler(False)`` (``interpret``: the Triton kernel in Pallas's
    interpreter, for a CPU check of the tool)."""
    q, pool, tables, ctx_lens = decode_setup(args.batch, args.ctx, num_layers=1)
    if args.kv_dtype == "float8_e4m3fn":
        pool = quantize_kv(pool, jnp.ones((), jnp.float32))
    if args.kernel == "triton":
        cfg = tuning.decode_config(D, args.batch, HKV, tables.shape[1] * PAGE, pool.dtype.itemsize)
        fn = decode_fn(1, cfg, D, interpret, fp8_dot_dtype=args.fp8_operands)
    else:
        if args.kv_dtype != "bfloat16":
            raise SystemExit("the Mosaic GPU decode kernel reads bf16 pools only")
        fn = decode_mgpu_fn(1, D)
    jax.block_until_ready(fn(q, pool, tables, ctx_lens))  # compile and warm, out of range
    profiler(True)
    for _ in range(args.launches):
        out = fn(q, pool, tables, ctx_lens)
    jax.block_until_ready(out)
    profiler(False)
    print(f"profiled {args.launches} launch(es): {args.kernel} {args.kv_dtype} "
          f"B={args.batch} ctx={args.ctx}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=("triton", "mgpu"), default="triton")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="bfloat16")
    p.add_argument("--fp8-operands", choices=("float16", "bfloat16"), default=None,
                   help="the dots' operand type over an e4m3 pool (default: the kernel's)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--launches", type=int, default=1)
    p.add_argument("--mps", type=int, default=None, metavar="PERCENT",
                   help="run the case as an MPS client limited to PERCENT of the SMs")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.mps is None:
        run_case(args)
        return
    from duetjax.duet import mps
    daemon = mps.find_running_daemon() or mps.start_private_daemon()
    child = [sys.executable, os.path.abspath(__file__), "--kernel", args.kernel, "--kv-dtype",
             args.kv_dtype, "--batch", str(args.batch), "--ctx", str(args.ctx), "--launches",
             str(args.launches)] + (["--fp8-operands", args.fp8_operands] if args.fp8_operands else [])
    with daemon:  # (a private daemon stops on leaving)
        env = dict(os.environ, **daemon.client_env(args.mps))
        returncode = subprocess.run(child, env=env).returncode
    sys.exit(returncode)


if __name__ == "__main__":
    main()
