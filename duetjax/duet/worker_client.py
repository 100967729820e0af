"""The engine's handle on one worker process (see ``worker.py`` for the protocol)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from multiprocessing.connection import Connection
from typing import Mapping

import jax
import numpy as np

from ..child_process import start_child
from ..core.model_runner import InFlight
from ..core.sampler import SampledTokens
from ..core.scheduler import SchedulerOutput
from ..core.step_inputs import StepInputs, bucket_for, build_inputs, pack
from .worker import ERROR, REPLY, REQUEST, STEP, STOP, USE_PREVIOUS, WorkerSetup, worker_buckets

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """The worker process exited (killed, crashed, or a step failed); its steps are lost."""


class RemoteInFlight(InFlight):
    """A step running in a worker: ``fetch`` reads its reply from the socket."""

    def __init__(self, batch: SchedulerOutput, client: "WorkerClient", step_id: int, rows: int):
        super().__init__(batch, sampled=None, last_tokens=None)
        self.client, self.step_id, self.rows = client, step_id, rows
        self.worker_seconds: float | None = None
        """The worker's own time on the step (known once fetched)."""

    def done(self) -> bool:
        """The reply has arrived (or the worker is gone): ``fetch`` will not wait."""
        conn = self.client.conn
        return conn is None or conn.poll(0) or not self.client.alive

    def fetch(self) -> SampledTokens:
        n = len(self.batch.scheduled)
        sampled, self.worker_seconds = self.client.receive(self.step_id, self.batch.num_steps,
                                                           self.rows)
        return jax.tree_util.tree_map(lambda a: a[:, :n], sampled)


class WorkerClient:
    """Starts, feeds and watches one worker process."""

    def __init__(self, setup: WorkerSetup, env: Mapping[str, str], name: str):
        self.setup = setup
        self.env = dict(env)
        self.name = name
        self.buckets = {b: i for i, b in enumerate(worker_buckets(setup.engine_config, setup.role))}
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.info: dict = {}
        self.restarts = 0
        self._step_ids = 0
        self._top_n = None

    def start(self) -> None:
        """Launches the process (it attaches and compiles in the background: see ``poll_ready``)."""
        self.process, self.conn = start_child("duetjax.duet.worker", self.env)
        self.conn.send(self.setup)
        self.ready = False
        log.info("worker %s starting (pid %d, %d %% of SMs)", self.name, self.process.pid,
                 self.setup.sm_percentage)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def poll_ready(self, timeout: float = 0.0) -> bool:
        """True once the worker has compiled; raises WorkerDied if it failed to start."""
        if self.ready:
            return True
        if self.conn is None:
            return False
        try:
            if not self.conn.poll(timeout):
                if not self.alive:
                    raise WorkerDied(f"worker {self.name} exited during start-up "
                                     f"(code {self.process.returncode})")
                return False
            message = self.conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerDied(f"worker {self.name} exited during start-up") from e
        if "error" in message:
            hint = ""
            if "RESOURCE_EXHAUSTED" in message["error"] or "out of memory" in message["error"].lower():
                hint = ("\nthe worker ran out of GPU memory: raise duet_worker_reserve_gib (the "
                        "memory kept free for each worker), or lower kv_cache_tokens or "
                        "kv_cache_memory_fraction, or start fewer worker pairs (duet_pairs)")
            raise WorkerDied(f"worker {self.name} failed to start:\n{message['error']}{hint}")
        self.info = message
        self.ready = True
        log.info("worker %s ready (pid %d, compiled in %.1fs)", self.name, message["pid"],
                 message["compile_seconds"])
        return True

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_ready(timeout=0.2):
            if time.monotonic() > deadline:
                raise WorkerDied(f"worker {self.name} not ready after {timeout:.0f}s")

    def dispatch(self, batch: SchedulerOutput, use_previous: bool) -> RemoteInFlight:
        """Sends one step (a prefill batch, or a k-step decode) without waiting for it."""
        b = bucket_for(batch, self.setup.engine_config)
        index = self.buckets.get(b)
        if index is None:
            raise RuntimeError(f"worker {self.name} has no executable for {b}: a scheduler bug")
        inputs = self.step_inputs(batch)
        self._step_ids += 1
        header = REQUEST.pack(STEP, self._step_ids, index, batch.num_steps,
                              USE_PREVIOUS if use_previous else 0)
        try:
            self.conn.send_bytes(header + pack(inputs))
        except OSError as e:
            raise WorkerDied(f"worker {self.name} is gone") from e
        return RemoteInFlight(batch, self, self._step_ids, b.num_seqs)

    def step_inputs(self, batch: SchedulerOutput) -> StepInputs:
        """The host arrays of ``batch``'s step, as this worker's step reads them."""
        config = self.setup.engine_config
        return build_inputs(bucket_for(batch, config), batch, config.page_size,
                            -(-self.setup.max_model_len // config.page_size))

    def receive(self, step_id: int, num_steps: int, rows: int) -> tuple[SampledTokens, float]:
        """Waits for a step's reply: (sampled tokens with a leading step axis, the worker's
        seconds on it)."""
        try:
            message = self.conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise WorkerDied(f"worker {self.name} died (exit code {self.process.poll()})") from e
        kind, got, seconds = REPLY.unpack_from(message)
        if kind == ERROR:
            raise WorkerDied(f"worker {self.name} failed a step:\n"
                             f"{bytes(message[REPLY.size:]).decode(errors='replace')}")
        if got != step_id:
            raise WorkerDied(f"worker {self.name} answered step {got}, expected {step_id}")
        return _unpack_sampled(memoryview(message)[REPLY.size:], num_steps, rows), seconds

    def kill(self) -> None:
        """Stops the process now (also its children); safe to call twice."""
        if self.conn is not None:
            try:
                self.conn.send_bytes(REQUEST.pack(STOP, 0, 0, 0, 0))
            except OSError:
                pass
            self.conn.close()
            self.conn = None
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.ready = False

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()


def _unpack_sampled(data: memoryview, num_steps: int, rows: int) -> SampledTokens:
    from ..sampling_params import MAX_LOGPROBS

    # The vocabulary caps the top-n width (as in ``sampler.sample``): infer it from the size.
    fixed = num_steps * rows * 8  # token ids and their logprobs
    top = (len(data) - fixed) // (num_steps * rows * 8)
    if top > MAX_LOGPROBS or fixed + top * num_steps * rows * 8 != len(data):
        raise WorkerDied(f"a reply of {len(data)} bytes does not fit {num_steps} steps x {rows} rows")
    shapes = [(np.int32, (num_steps, rows)), (np.float32, (num_steps, rows)),
              (np.int32, (num_steps, rows, top)), (np.float32, (num_steps, rows, top))]
    arrays, at = [], 0
    for dtype, shape in shapes:
        size = int(np.prod(shape))
        arrays.append(np.frombuffer(data, dtype, size, at).reshape(shape))
        at += size * 4
    return SampledTokens(*arrays)
