"""Named buffers shared zero-copy between DuetServe worker processes.

DuetServe runs prefill and decode in separate worker processes (MPS clients, see mps.py) that
must use ONE copy of the model weights and ONE paged KV pool (plus small tables such as token
counts): two copies would halve the KV capacity, and the pages prefill writes are the pages
decode reads. An owner allocates each buffer once (:meth:`SharedBuffers.allocate`), fills the
weights (:meth:`~SharedBuffers.fill`) and sends the small, picklable :class:`SharedHandles` to
its workers, which :func:`attach` and get JAX arrays over the same memory.

* ``cuda_ipc`` (GPU): one raw ``cudaMalloc`` per buffer (not CuPy's pool, so an IPC handle covers
  exactly that allocation), opened by workers with ``cudaIpcOpenMemHandle``; both sides wrap the
  pointer in a CuPy array and ``jax.dlpack.from_dlpack`` it without a copy. A jitted function
  donating such an array writes in place. CUDA cannot open an IPC handle in the process that made
  it, so the owner uses its own :meth:`~_Buffers.array`. CuPy is imported lazily.
* ``cpu_shm`` (tests, CPU workers): one POSIX shared-memory segment per buffer, viewed as numpy
  and imported with ``from_dlpack``. Reads are zero-copy, but XLA:CPU does not update donated
  imported buffers in place: write results back explicitly through :meth:`~_Buffers.numpy_view`.

Transport dtype: neither CuPy nor numpy's DLPack knows bfloat16 (nor other ml_dtypes types), and
``.view(bfloat16)`` of an imported array makes XLA copy it, so such buffers live as same-width
unsigned ints (:func:`transport_dtype`: bfloat16 -> uint16); bitcast inside the jitted function
with ``jax.lax.bitcast_convert_type(x, jnp.bfloat16)``.

Security: the handles give read and write access to the weights and every request's KV cache.
Pass them only over a private pipe inherited by the workers, never through files or logs (their
repr hides the payload). Segment names are random (``secrets.token_hex``) and mode 0600.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
import secrets
from multiprocessing import shared_memory
from typing import Any, Iterable, Self

import jax
import jax.numpy as jnp
import numpy as np

CUDA_IPC = "cuda_ipc"
CPU_SHM = "cpu_shm"
BACKENDS = (CUDA_IPC, CPU_SHM)
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (what shm_open opens)
_SHM_PREFIX = "duetjax_"
_CUDA_IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (UVA) pointers


def transport_dtype(dtype: Any) -> np.dtype:
    """The dtype a buffer of ``dtype`` is stored and exchanged as (bfloat16 -> uint16)."""
    dt = np.dtype(jnp.dtype(dtype))
    if dt.kind == "V" and dt.itemsize not in (1, 2, 4, 8):
        raise ValueError(f"dtype {dt} ({dt.itemsize} bytes) cannot be shared")
    return np.dtype(f"uint{8 * dt.itemsize}") if dt.kind == "V" else dt


@dataclasses.dataclass(frozen=True)
class BufferSpec:
    """One named buffer: its shape and logical dtype (e.g. ``'bfloat16'``), normalized."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"buffer name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(jnp.dtype(self.dtype)).name)
        if any(d < 0 for d in self.shape):
            raise ValueError(f"buffer {self.name!r}: negative dimension in shape {self.shape}")
        transport_dtype(self.dtype)  # rejects dtypes that cannot travel

    @property
    def transport_dtype(self) -> np.dtype:
        return transport_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class SharedHandles:
    """What a worker needs to attach: small and picklable. Send it over a private pipe only."""

    backend: str
    specs: tuple[BufferSpec, ...]
    payload: tuple[Any, ...] = dataclasses.field(repr=False)
    """Per spec: the shm segment name (cpu_shm) or the 64-byte CUDA IPC handle (cuda_ipc)."""
    owner_pid: int
    device_id: int = 0
    """CUDA ordinal of the buffers; workers must see the same device numbering."""


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise ValueError("the cuda_ipc backend needs CuPy: pip install cupy-cuda12x (CUDA 12) "
                         "or cupy-cuda13x (CUDA 13)") from e
    return cupy


def _map_segment(segment: str, spec: BufferSpec) -> mmap.mmap:
    """Map a segment ourselves: numpy views of this mmap pin it (mmap.close refuses while they
    live; views of SharedMemory.buf do not), and no resource tracker is involved."""
    try:
        fd = os.open(os.path.join(SHM_DIR, segment), os.O_RDWR)
    except FileNotFoundError:
        raise ValueError(f"the shared memory of buffer {spec.name!r} no longer exists: its "
                         "owner closed the buffers or exited") from None
    try:
        if os.fstat(fd).st_size < spec.nbytes:
            raise ValueError(f"the shared memory of buffer {spec.name!r} is too small")
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class _Buffers:
    """Owner and worker alike: named zero-copy views of the buffers, and close()."""

    def __init__(self, backend: str, specs: Iterable[BufferSpec], device_id: int,
                 owner: bool) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown shared-buffer backend {backend!r}; expected one of "
                             f"{BACKENDS}")
        if backend == CPU_SHM and not os.path.isdir(SHM_DIR):
            raise ValueError(f"the cpu_shm backend needs Linux POSIX shared memory at {SHM_DIR}")
        self.backend, self.device_id, self._owner = backend, device_id, owner
        self._specs: dict[str, BufferSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"duplicate buffer name {spec.name!r}")
            self._specs[spec.name] = spec
        self._mem: dict[str, Any] = {}  # name -> mmap (cpu_shm) or device pointer (cuda_ipc)
        self._payload: list[Any] = []  # owner: shm segment names or IPC handles
        self._segments: list[shared_memory.SharedMemory] = []  # owner, cpu_shm: to unlink
        self._closed = False

    @property
    def specs(self) -> tuple[BufferSpec, ...]:
        return tuple(self._specs.values())

    def _spec(self, name: str) -> BufferSpec:
        if self._closed:
            raise ValueError(f"shared buffers are closed (asked for {name!r})")
        if name not in self._specs:
            raise ValueError(f"unknown shared buffer {name!r}; known: {sorted(self._specs)}")
        return self._specs[name]

    def array(self, name: str) -> jax.Array:
        """A fresh zero-copy JAX array over buffer ``name``, in its transport dtype."""
        spec = self._spec(name)
        if self.backend == CPU_SHM:
            return jax.dlpack.from_dlpack(self.numpy_view(name))
        cp = _cupy()
        mem = cp.cuda.UnownedMemory(self._mem[name], max(spec.nbytes, 1), self, self.device_id)
        view = cp.ndarray(spec.shape, spec.transport_dtype, cp.cuda.MemoryPointer(mem, 0))
        return jax.dlpack.from_dlpack(view)

    def numpy_view(self, name: str) -> np.ndarray:
        """cpu_shm only: a writable numpy view (transport dtype) to write results back through."""
        spec = self._spec(name)
        if self.backend != CPU_SHM:
            raise ValueError(f"numpy_view needs the cpu_shm backend, not {self.backend}: on the "
                             "GPU, update buffers by donating array(name) to a jitted function")
        flat = np.frombuffer(self._mem[name], spec.transport_dtype, math.prod(spec.shape))
        return flat.reshape(spec.shape)

    def close(self) -> None:
        """Unmap (worker) or free and unlink (owner); idempotent. On cuda_ipc, arrays from
        :meth:`array` must not be used afterwards; on cpu_shm they pin their mapping."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.backend == CPU_SHM:
                for segment in self._segments:  # owner: no new attach; memory lives while mapped
                    with contextlib.suppress(FileNotFoundError):
                        segment.unlink()  # also unregisters it from the resource tracker
                for mm in self._mem.values():
                    with contextlib.suppress(BufferError):  # views alive: unmapped when freed
                        mm.close()
            elif self._mem:
                cp = _cupy()
                with cp.cuda.Device(self.device_id):
                    cp.cuda.runtime.deviceSynchronize()  # let queued kernels finish with it
                    for ptr in self._mem.values():
                        if self._owner:
                            cp.cuda.runtime.free(ptr)
                        else:
                            cp.cuda.runtime.ipcCloseMemHandle(ptr)
        finally:
            self._mem.clear()
            self._payload.clear()
            self._segments.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedBuffers(_Buffers):
    """Owner side: allocates the buffers, fills them, hands out handles, frees on close."""

    @classmethod
    def allocate(cls, specs: Iterable[BufferSpec], backend: str | None = None,
                 device_id: int = 0) -> SharedBuffers:
        """Allocate zero-filled buffers; ``backend`` None: cuda_ipc when JAX runs on a GPU.

        cuda_ipc buffers live outside XLA's allocator: leave them room (e.g.
        ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` or a lower ``XLA_PYTHON_CLIENT_MEM_FRACTION``).
        """
        if backend is None:
            backend = CUDA_IPC if jax.default_backend() == "gpu" else CPU_SHM
        self = cls(backend, specs, device_id, owner=True)
        try:
            if backend == CPU_SHM:
                for spec in self.specs:  # registered with the resource tracker: unlinked if we
                    segment = shared_memory.SharedMemory(  # die without close()
                        _SHM_PREFIX + secrets.token_hex(16), create=True, size=max(spec.nbytes, 1))
                    self._segments.append(segment)
                    segment.close()  # its own mapping is unused: see _map_segment
                    self._mem[spec.name] = _map_segment(segment.name, spec)
                    self._payload.append(segment.name)
            else:
                cp = _cupy()
                with cp.cuda.Device(device_id):
                    for spec in self.specs:
                        size = max(spec.nbytes, 1)
                        self._mem[spec.name] = ptr = cp.cuda.runtime.malloc(size)
                        cp.cuda.runtime.memset(ptr, 0, size)
                        self._payload.append(bytes(cp.cuda.runtime.ipcGetMemHandle(ptr)))
                    cp.cuda.runtime.deviceSynchronize()
        except BaseException:
            self.close()
            raise
        return self

    def handles(self) -> SharedHandles:
        """The picklable handles workers :func:`attach` with (send over a private pipe only)."""
        if self._closed:
            raise ValueError("shared buffers are closed: no handles to give")
        return SharedHandles(self.backend, self.specs, tuple(self._payload), os.getpid(),
                             self.device_id)

    def fill(self, name: str, value: Any) -> None:
        """Copy ``value`` (numpy or JAX, logical or transport dtype, same shape) into ``name``."""
        spec = self._spec(name)
        if not isinstance(value, (jax.Array, np.ndarray)):
            value = np.asarray(value)
        if tuple(value.shape) != spec.shape:
            raise ValueError(f"buffer {name!r} has shape {spec.shape}, value has {value.shape}")
        tdt, vdt = spec.transport_dtype, np.dtype(value.dtype)
        if vdt not in (np.dtype(spec.dtype), tdt):
            also = f" (or its transport dtype {tdt.name})" if tdt != np.dtype(spec.dtype) else ""
            raise ValueError(f"buffer {name!r} has dtype {spec.dtype}{also}, value has {vdt.name}")
        if self.backend == CPU_SHM:
            self.numpy_view(name)[...] = np.asarray(value).view(tdt)
            return
        if spec.nbytes == 0:
            return
        cp = _cupy()
        with cp.cuda.Device(self.device_id):
            if isinstance(value, jax.Array) and [d.platform for d in value.devices()] == ["gpu"]:
                if vdt != tdt:  # CuPy has no bfloat16: a one-off device copy as uint16
                    value = jax.lax.bitcast_convert_type(value, tdt)
                src = cp.ascontiguousarray(cp.from_dlpack(value.block_until_ready()))
                src_ptr = src.data.ptr
            else:
                src = np.ascontiguousarray(np.asarray(value)).view(tdt)
                src_ptr = src.ctypes.data
            cp.cuda.runtime.memcpy(self._mem[name], src_ptr, spec.nbytes, _CUDA_MEMCPY_DEFAULT)
            cp.cuda.runtime.deviceSynchronize()  # visible to the workers once fill returns


class AttachedBuffers(_Buffers):
    """Worker side: the owner's buffers mapped into this process (see :func:`attach`)."""

    def __init__(self, handles: SharedHandles) -> None:
        super().__init__(handles.backend, handles.specs, handles.device_id, owner=False)
        if len(handles.payload) != len(self._specs):
            raise ValueError(f"handles carry {len(handles.payload)} payloads for "
                             f"{len(self._specs)} buffers")
        if handles.backend == CUDA_IPC and handles.owner_pid == os.getpid():
            raise ValueError("CUDA cannot open an IPC handle in the process that created it; "
                             "use the owner's SharedBuffers.array() there")
        try:
            if handles.backend == CPU_SHM:
                # Not SharedMemory(name): on 3.12 that registers the segment with this process's
                # resource tracker, which unlinks it (and warns) once its workers exit; and
                # unregistering would also drop the owner's entry from a tracker it shares.
                for spec, segment in zip(self.specs, handles.payload):
                    self._mem[spec.name] = _map_segment(segment, spec)
            else:
                cp = _cupy()
                with cp.cuda.Device(self.device_id):
                    for spec, handle in zip(self.specs, handles.payload):
                        try:
                            self._mem[spec.name] = cp.cuda.runtime.ipcOpenMemHandle(
                                bytes(handle), _CUDA_IPC_LAZY_PEER_ACCESS)
                        except cp.cuda.runtime.CUDARuntimeError as e:
                            raise ValueError(f"cannot open the CUDA IPC handle of {spec.name!r} "
                                             f"(owner pid {handles.owner_pid}): {e}") from e
        except BaseException:
            self.close()
            raise


def attach(handles: SharedHandles) -> AttachedBuffers:
    """Worker side: map the owner's buffers; close() unmaps and never frees or unlinks them."""
    return AttachedBuffers(handles)
