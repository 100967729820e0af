"""Python's cyclic garbage collector in a serving process: keep its pauses short, and measure
them.

A collection of the oldest generation walks every tracked object of the process, and after
importing JAX, Flax and a tokenizer that is a million or more: pauses of tens to hundreds of
milliseconds, at moments the loop does not choose, which every running request sees as one
long gap between tokens. Objects that exist once the engine is up (modules, the model's
Python structures, compiled executables) live as long as the process, so ``freeze_startup_heap``
moves them out of the collector's reach, as vLLM does after start-up; later collections then
walk only what serving created. ``GcPauses`` times every collection, for the loop's metrics.
"""
from __future__ import annotations

import dataclasses
import gc
import time


def freeze_startup_heap() -> None:
    """Collects once, then exempts every surviving object from later collections."""
    gc.collect()
    gc.freeze()


@dataclasses.dataclass
class GcPauses:
    """Collections in this process since ``install`` (cumulative: take differences)."""

    collections: int = 0
    """Collections of any generation."""
    full_collections: int = 0
    """Collections of the oldest generation (the long ones)."""
    seconds: float = 0.0
    """Time spent collecting."""
    longest_seconds: float = 0.0
    """The longest single collection."""
    _started: float = dataclasses.field(default=0.0, repr=False)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.collections += 1
        self.full_collections += info.get("generation") == 2
        self.seconds += pause
        self.longest_seconds = max(self.longest_seconds, pause)

    def snapshot(self) -> dict[str, float]:
        return {"collections": self.collections, "full_collections": self.full_collections,
                "seconds": self.seconds, "longest_seconds": self.longest_seconds}


_installed: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """This process's collection timer (installed on first use)."""
    global _installed
    if _installed is None:
        _installed = GcPauses()
        gc.callbacks.append(_installed._callback)
    return _installed
