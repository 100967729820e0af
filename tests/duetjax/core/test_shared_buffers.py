"""Buffers shared between processes: the cpu_shm backend end to end, the CUDA path's checks.

The CUDA IPC path needs a GPU and CuPy; here only its pure logic (errors raised before CuPy is
touched) is tested.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from duetjax.core.shared_buffers import (CPU_SHM, CUDA_IPC, SHM_DIR, BufferSpec, SharedBuffers,
                                    SharedHandles, attach, transport_dtype)

REPO = Path(__file__).resolve().parents[3]
SPECS = (BufferSpec("weights", (4, 16), "bfloat16"), BufferSpec("kv", (2, 3, 8), "float32"),
         BufferSpec("counts", (7,), "int32"))
HAS_CUPY = importlib.util.find_spec("cupy") is not None


def random_values(seed: int = 0) -> dict[str, np.ndarray]:
    """Non-zero values for SPECS, in their logical dtypes."""
    rng = np.random.default_rng(seed)
    return {"weights": (rng.standard_normal((4, 16)) + 3).astype(ml_dtypes.bfloat16),
            "kv": rng.uniform(1, 2, (2, 3, 8)).astype(np.float32),
            "counts": rng.integers(1, 1000, 7).astype(np.int32)}


def filled(seed: int = 0) -> tuple[SharedBuffers, dict[str, np.ndarray]]:
    buffers = SharedBuffers.allocate(SPECS, backend=CPU_SHM)
    values = random_values(seed)
    for name, value in values.items():
        buffers.fill(name, value)
    return buffers, values


def segment_paths(handles: SharedHandles) -> list[Path]:
    return [Path(SHM_DIR) / name for name in handles.payload]


def worker(conn: Any, expected: dict[str, np.ndarray]) -> None:
    """Spawned worker: attach, check values and zero-copy, write back through numpy views."""
    try:
        with attach(conn.recv()) as buffers:
            report: dict[str, Any] = {"pid": os.getpid()}
            for name, value in expected.items():
                got = buffers.array(name)
                report[f"{name}_equal"] = bool(np.array_equal(
                    np.asarray(got), value.view(transport_dtype(value.dtype))))
                report[f"{name}_zero_copy"] = (
                    got.unsafe_buffer_pointer() == buffers.numpy_view(name).ctypes.data)
            weights = jax.lax.bitcast_convert_type(buffers.array("weights"), jnp.bfloat16)
            report["weights_bitcast_equal"] = bool(np.array_equal(np.asarray(weights),
                                                                  expected["weights"]))
            doubled = jax.jit(lambda x: x * 2)(buffers.array("kv"))
            buffers.numpy_view("kv")[...] = np.asarray(doubled)  # the explicit CPU write-back
            buffers.numpy_view("counts")[3] = -5
        conn.send(("ok", report))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def test_transport_dtype_maps_extension_types_to_same_width_uints() -> None:
    """bfloat16 and float8 travel as uints; DLPack-native dtypes are unchanged."""
    assert transport_dtype("bfloat16") == np.uint16
    assert transport_dtype(jnp.bfloat16) == np.uint16
    assert transport_dtype(ml_dtypes.float8_e4m3fn) == np.uint8
    assert transport_dtype("float32") == np.float32 and transport_dtype(np.int32) == np.int32


def test_spec_is_normalized_and_validated() -> None:
    """Shapes become int tuples, dtypes canonical names; bad specs are refused."""
    spec = BufferSpec("w", [2, 3], jnp.bfloat16)
    assert spec.shape == (2, 3) and spec.dtype == "bfloat16" and spec.nbytes == 12
    assert spec.transport_dtype == np.uint16
    with pytest.raises(ValueError, match="negative"):
        BufferSpec("w", (2, -1), "float32")
    with pytest.raises(ValueError, match="non-empty"):
        BufferSpec("", (2,), "float32")
    with pytest.raises(ValueError, match="duplicate"):
        SharedBuffers.allocate([BufferSpec("a", (1,), "int32")] * 2, backend=CPU_SHM)


def test_owner_fills_and_views_zero_copy() -> None:
    """Buffers start zeroed; fill takes logical or transport dtype; array() aliases the memory."""
    with SharedBuffers.allocate(SPECS) as buffers:  # CPU JAX: the default backend is cpu_shm
        assert buffers.backend == CPU_SHM
        assert not np.asarray(buffers.array("kv")).any()
        values = random_values()
        buffers.fill("weights", jnp.asarray(values["weights"]))  # a JAX bf16 array
        buffers.fill("kv", values["kv"])
        buffers.fill("counts", values["counts"].view(np.int32))
        weights = buffers.array("weights")
        assert weights.dtype == np.uint16
        assert weights.unsafe_buffer_pointer() == buffers.numpy_view("weights").ctypes.data
        assert np.array_equal(np.asarray(jax.lax.bitcast_convert_type(weights, jnp.bfloat16)),
                              values["weights"])
        buffers.fill("weights", values["weights"].view(np.uint16))  # transport dtype works too
        assert np.array_equal(np.asarray(buffers.array("counts")), values["counts"])


def test_spawned_worker_reads_and_writes_the_same_memory() -> None:
    """A spawned worker sees the owner's data zero-copy; its write-backs reach the owner."""
    buffers, values = filled()
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=worker, args=(theirs, values))
    try:
        child.start()
        ours.send(buffers.handles())  # handles only ever travel over the private pipe
        assert ours.poll(60), "worker did not answer"
        status, report = ours.recv()
        child.join(30)
        assert status == "ok", report
        assert child.exitcode == 0 and report["pid"] != os.getpid()
        assert all(report.values()), report
        assert np.array_equal(buffers.numpy_view("kv"), values["kv"] * 2)
        expected_counts = values["counts"].copy()
        expected_counts[3] = -5
        assert np.array_equal(np.asarray(buffers.array("counts")), expected_counts)
        assert all(path.exists() for path in segment_paths(buffers.handles()))
    finally:
        if child.is_alive():
            child.kill()
        buffers.close()


def test_close_unlinks_segments_and_later_attach_fails() -> None:
    """The owner's close unlinks; arrays handed out stay readable; everything else refuses."""
    buffers, values = filled()
    handles = buffers.handles()
    kept = buffers.array("kv")
    attached = attach(handles)  # same process is fine on CPU
    attached.close()
    attached.close()
    assert all(path.exists() for path in segment_paths(handles))  # workers never unlink
    buffers.close()
    buffers.close()  # idempotent
    assert not any(path.exists() for path in segment_paths(handles))
    assert np.array_equal(np.asarray(kept), values["kv"])  # its mapping is pinned by the array
    with pytest.raises(ValueError, match="no longer exists"):
        attach(handles)
    with pytest.raises(ValueError, match="closed"):
        buffers.array("kv")
    with pytest.raises(ValueError, match="closed"):
        buffers.handles()
    with pytest.raises(ValueError, match="closed"):
        attached.numpy_view("kv")


def test_errors_name_the_problem() -> None:
    """Unknown names, shape and dtype mismatches and bad backends get clear ValueErrors."""
    with SharedBuffers.allocate(SPECS, backend=CPU_SHM) as buffers:
        with pytest.raises(ValueError, match=r"unknown shared buffer 'nope'.*counts"):
            buffers.array("nope")
        with pytest.raises(ValueError, match=r"shape \(2, 3, 8\), value has \(2, 3\)"):
            buffers.fill("kv", np.ones((2, 3), np.float32))
        with pytest.raises(ValueError, match="dtype float32, value has float64"):
            buffers.fill("kv", np.ones((2, 3, 8)))
        with pytest.raises(ValueError, match="bfloat16 \\(or its transport dtype uint16\\)"):
            buffers.fill("weights", np.ones((4, 16), np.float32))
    with pytest.raises(ValueError, match="unknown shared-buffer backend"):
        SharedBuffers.allocate(SPECS, backend="nccl")
    cuda_handles = SharedHandles(CUDA_IPC, SPECS, (b"\0" * 64,) * 3, owner_pid=os.getpid())
    with pytest.raises(ValueError, match="process that created it"):
        attach(cuda_handles)


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed")
def test_cuda_backend_without_cupy_says_what_to_install() -> None:
    """Without CuPy, cuda_ipc fails at once with the pip command to run."""
    with pytest.raises(ValueError, match="pip install cupy-cuda12x"):
        SharedBuffers.allocate(SPECS, backend=CUDA_IPC)
    foreign = SharedHandles(CUDA_IPC, SPECS, (b"\0" * 64,) * 3, owner_pid=os.getpid() + 1)
    with pytest.raises(ValueError, match="cupy-cuda13x"):
        attach(foreign)


def test_handles_are_small_picklable_and_hide_the_payload() -> None:
    """Handles pickle compactly and their repr never shows segment names."""
    with SharedBuffers.allocate(SPECS, backend=CPU_SHM) as buffers:
        handles = buffers.handles()
        assert pickle.loads(pickle.dumps(handles)) == handles
        assert len(pickle.dumps(handles)) < 2048
        assert not any(name in repr(handles) for name in handles.payload)
        assert all(len(name) >= 32 for name in handles.payload)  # random, unguessable


OWNER_SCRIPT = '''
import multiprocessing, pickle, subprocess, sys, time
import numpy as np
from duetjax.core.shared_buffers import CPU_SHM, BufferSpec, SharedBuffers, attach

def spawned(conn):
    with attach(conn.recv()) as buffers:
        buffers.numpy_view("x")[0] += 1

FOREIGN = """
import pickle, sys
from duetjax.core.shared_buffers import attach
buffers = attach(pickle.load(sys.stdin.buffer))
buffers.numpy_view("x")[1] += 1
"""

if __name__ == "__main__":
    owner = SharedBuffers.allocate([BufferSpec("x", (4,), "int32")], backend=CPU_SHM)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=spawned, args=(theirs,))
    child.start()
    ours.send(owner.handles())
    child.join()
    # A worker not started by multiprocessing has its own resource tracker, which would
    # unlink a segment it registered when that worker exits.
    subprocess.run([sys.executable, "-W", "error", "-c", FOREIGN], check=True,
                   input=pickle.dumps(owner.handles()))
    time.sleep(0.5)  # a tracker would unlink just after its worker exits
    again = attach(owner.handles())  # the segment survived both workers
    assert list(again.numpy_view("x")) == [1, 1, 0, 0], again.numpy_view("x")
    again.close()
    owner.close()
    print("done")
'''


def test_workers_neither_unlink_nor_trip_the_resource_tracker(tmp_path: Path) -> None:
    """Spawned and foreign workers exit without unlinking or any tracker warning (-W error)."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(OWNER_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert result.stderr == "", result.stderr  # no leak warnings, no KeyError tracebacks
