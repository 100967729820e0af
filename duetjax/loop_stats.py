"""Where the engine's host loop spends its time (``Engine.stats().loop``)."""
from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class LoopStats:
    """Where the host loop's time goes (the device is busy meanwhile when pipelining works)."""

    steps: int = 0
    """Model steps run (a k-step decode counts k)."""
    dispatches: int = 0
    """Executable launches (loop iterations that launched nothing record no dispatch)."""
    host_seconds: float = 0.0
    """Python work: scheduling, input preparation and output processing."""
    launch_seconds: float = 0.0
    """Inside the executable call (the runtime blocks there while its queue is full)."""
    wait_seconds: float = 0.0
    """Blocked on the device for a step's results."""
    schedule_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: the scheduler's pass."""
    prepare_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: building and packing the inputs."""
    launch_bookkeeping_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: reserving output slots, committing."""
    apply_seconds: float = 0.0
    """Of ``host_seconds``, aggregated steps only: applying sampled tokens (stop checks,
    detokenizing, outputs)."""

    def record(self, host: float, launch: float, wait: float, steps: int = 1) -> None:
        self.steps += steps
        self.dispatches += 1 if steps else 0
        self.host_seconds += host
        self.launch_seconds += launch
        self.wait_seconds += wait

    def record_aggregated(self, started: float, drain: float, scheduled: float, prepared: float,
                          marked: float, launch: float, waited: float, steps: int) -> None:
        """An aggregated step: started at ``started`` (perf_counter), ``drain`` seconds reading
        a step early, scheduled by ``scheduled``, inputs prepared and launched (``launch``
        seconds of it in the executable call) by ``prepared``, outputs reserved by ``marked``,
        then results applied until now (``waited`` of it on the device)."""
        now = time.perf_counter()
        self.schedule_seconds += scheduled - started - drain
        self.prepare_seconds += prepared - scheduled - launch
        self.launch_bookkeeping_seconds += marked - prepared
        self.apply_seconds += now - marked + drain - waited
        self.record(now - started - waited - launch, launch, waited, steps)

    def since(self, before: "LoopStats") -> "LoopStats":
        """What was recorded after ``before`` (an earlier copy, e.g. ``Engine.stats().loop``)."""
        return LoopStats(**{f.name: getattr(self, f.name) - getattr(before, f.name)
                            for f in dataclasses.fields(self)})

    @property
    def host_ms_per_step(self) -> float:
        return 1e3 * self.host_seconds / max(self.steps, 1)
