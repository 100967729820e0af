"""Which GPUs each replica gets: replica i the i-th group of ``tensor_parallel_size`` GPUs.

The front process never creates a CUDA context (JAX would take most of a GPU's memory for it),
so it counts GPUs with ``nvidia-smi -L`` and hands each replica its group as the replica
process's ``CUDA_VISIBLE_DEVICES``, set before the process starts. GPUs already narrowed by
the front's own ``CUDA_VISIBLE_DEVICES`` are split in the order it lists them.
"""
from __future__ import annotations

import os
import subprocess
from typing import Callable, Mapping

from ..config import ConfigError


def count_gpus() -> int:
    """NVIDIA GPUs on this host (0 without ``nvidia-smi``, or when it fails)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if listed.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def replica_devices(data_parallel_size: int, tensor_parallel_size: int,
                    environ: Mapping[str, str] = os.environ,
                    gpu_count: Callable[[], int] = count_gpus) -> list[str | None]:
    """Each replica's ``CUDA_VISIBLE_DEVICES``, or None for every replica where JAX runs
    without GPUs (each replica process then has the host's devices to itself). A ConfigError
    naming ``data_parallel_size`` when the replicas need more GPUs than there are."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
        return [None] * data_parallel_size
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    else:
        gpus = [str(i) for i in range(gpu_count())]
    if not gpus:
        return [None] * data_parallel_size
    needed = data_parallel_size * tensor_parallel_size
    if needed > len(gpus):
        raise ConfigError("data_parallel_size",
                          f"{data_parallel_size} x tensor_parallel_size {tensor_parallel_size} "
                          f"needs {needed} GPUs; {len(gpus)} are visible ({','.join(gpus)})")
    size = tensor_parallel_size
    return [",".join(gpus[i * size:(i + 1) * size]) for i in range(data_parallel_size)]
