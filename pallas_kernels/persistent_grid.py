"""Sizing a persistent grid: how many programs this process can keep resident, and how many
key splits keep them evenly loaded.

Under MPS a client's kernels run on a share of the SMs (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``),
and CUDA reports that share as the device's SM count (an H100 client at 30 % sees 38 of 132).
A persistent kernel wants one program per SM of the share: more run in waves, fewer leave SMs
idle (taking the share of the reported count again gave 11 programs and 18 % of a copy's
bandwidth).
"""
from __future__ import annotations

import os

import jax

MPS_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def sm_share(sm_count: int | None = None, percentage: str | None = None) -> int:
    """SMs this process's kernels run on. ``sm_count`` None: the device's reported count,
    which under MPS is already the share. Else ``sm_count`` is the whole GPU's, times the MPS
    share (``percentage``, default the environment's) when one is set.

    Rounded down: one program too many waits for a whole program's time on a busy SM, one too
    few loses 1/n of the bandwidth.
    """
    if sm_count is None:
        if percentage is not None:
            raise ValueError("percentage applies to a whole GPU's sm_count: the device's own "
                             "count is already the MPS share")
        return getattr(jax.devices()[0], "core_count", None) or 1
    if percentage is None:
        percentage = os.environ.get(MPS_PERCENTAGE, "")
    if not percentage:
        return sm_count
    share = float(percentage)
    if not 0 < share <= 100:
        raise ValueError(f"{MPS_PERCENTAGE}={percentage!r}: expected a percentage in (0, 100]")
    return max(1, int(sm_count * share / 100))


def balanced_splits(num_items: int, max_blocks: int, num_programs: int,
                    min_efficiency: float = 0.95) -> int:
    """Splits per item so that ``num_items * splits`` work items fill ``num_programs`` evenly.

    Work items of equal size dealt to the programs take ``ceil(work / programs)`` rounds; the
    efficiency is the fraction of those rounds' slots that hold work. Returns the fewest splits
    (each split costs a partial result and a share of the combine) reaching ``min_efficiency``,
    else the most efficient; a split keeps at least two key blocks.
    """
    most = max(1, max_blocks // 2)
    best, best_eff = 1, 0.0
    for splits in range(1, most + 1):
        work = num_items * splits
        rounds = -(-work // num_programs)
        efficiency = work / (rounds * num_programs)
        if efficiency >= min_efficiency:
            return splits
        if efficiency > best_eff + 1e-9:
            best, best_eff = splits, efficiency
    return best
