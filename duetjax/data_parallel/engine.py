"""``DataParallelEngine``: M engine replicas in their own processes, behind one interface.

Each replica (``replica.py``) is a full ``Engine`` on its own GPU, or its own group of
``tensor_parallel_size`` GPUs (``devices.py``), in its own process. This front process holds
no weights and never touches a GPU: it tokenizes text prompts (with the tokenizer replica 0
sent when it started), routes each request to a replica (``router.py``), and hands each
replica's outputs to the request's stream, as ``AsyncEngine`` does for its one engine, so the
server takes either unchanged.

A request the replica fails alone fails with ``RequestFailedError``, as with ``AsyncEngine``.
A replica whose step raises (a device failure) or whose process dies takes only its own
requests down (``EngineDeadError``); the others serve on, and new requests go to them. When
its process died without a step raising (killed, crashed), the requests it had not yet
answered at all go to another replica, once: nothing of theirs reached a client, and none of
them can have been what broke a step. A replica that sends nothing for ``replica_timeout``
seconds while it has requests (a step that never returns: a hung device or collective) is
killed and counts as one whose step raised.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..async_engine import (EngineDeadError, EngineDrainingError, QueueFullError,
                            RequestAbortedError, RequestStream, ServingEngine, deliver_output)
from ..config import ConfigError, EngineConfig
from ..core.admission import Prompt, prompt_ids
from ..engine_stats import EngineStats
from ..sampling_params import SamplingParams
from .client import ReplicaClient
from .deltas import OutputState
from .devices import replica_devices
from .hosts import FrontHosts
from .replica import ABORT, ACCEPTED, ADD, DEAD, OUTPUTS, ReplicaSetup
from .router import Route, Router, RouterSnapshot
from .stats import IDLE, combine

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Tracked:
    """A request in flight: its stream, where it went, and its output so far."""

    stream: RequestStream
    route: Route
    output: OutputState
    params: SamplingParams
    answered: bool = False
    """A replica sent an output of it (the client may have seen it)."""
    moved: bool = False
    """It was sent again, to another replica, after its first one died."""


class DataParallelEngine(ServingEngine):
    """Serves ``data_parallel_size`` replicas of one model, each an ``Engine`` in its own
    process on its own GPUs, with ``AsyncEngine``'s interface.

    Replica i gets GPUs [i * tp, (i + 1) * tp) (tp: ``tensor_parallel_size``; without GPUs,
    every replica runs on the host's devices). ``config``: ``Engine``'s keyword arguments
    (dtype, load_format, EngineConfig fields), the same for every replica; aggregated mode
    only. max_queued_requests: requests that may wait beyond the ``max_num_seqs`` each live
    replica runs at once. balance_threshold: ``Router``'s. start_timeout: seconds a replica
    may take to start (None: as long as its process lives). replica_init: an importable
    function each replica calls with its Engine before serving. hosts: the other hosts of a
    cluster (``hosts.py``), whose replicas join this one's after them. replica_timeout: seconds
    a replica with requests may send nothing before it is killed as hung (a working replica
    reports every 0.1 s, and after every step; None: never). The constructor returns once
    every replica has started, or raises the first one's start-up error after stopping them
    all. ``close()`` (or leaving a ``with`` block) stops the replicas; they also exit on their
    own when this process ends.
    """

    def __init__(self, model: str | Path | None = None, *, data_parallel_size: int,
                 max_queued_requests: int = 256, balance_threshold: int = 16,
                 start_timeout: float | None = None,
                 replica_init: Callable[[Any], None] | None = None,
                 hosts: FrontHosts | None = None, replica_timeout: float | None = 300.0,
                 **config: Any):
        config.pop("show_progress", None)  # (replicas show no progress bars)
        if replica_timeout is not None and not replica_timeout > 0:
            raise ValueError(f"replica_timeout must be > 0 seconds (None: never), got "
                             f"{replica_timeout}")
        self.engine_config = check_config(data_parallel_size, max_queued_requests, config)
        self.max_queued_requests = max_queued_requests
        self._replicas: list[Any] = local_replicas(model, data_parallel_size,
                                                   self.engine_config, config, replica_init)
        try:
            for replica in self._replicas:
                replica.start()
            if hosts is not None:  # (they start while ours do)
                self._replicas += hosts.accept(len(self._replicas), start_timeout)
            infos = [replica.wait_ready(start_timeout) for replica in self._replicas]
        except BaseException:
            for replica in self._replicas:
                replica.stop()
            if hosts is not None:
                hosts.close()
            raise
        self.data_parallel_size = len(self._replicas)  # (every host's)
        first = infos[0]
        self._model = first  # (the model's facts, from replica 0)
        self._lock = threading.Lock()
        self._requests: dict[str, _Tracked] = {}  # guarded by _lock, as is what follows
        self._router = Router(len(self._replicas), self.engine_config.page_size,
                              balance_threshold=balance_threshold,
                              max_blocks=first.stats.num_pages)
        self._stats: list[EngineStats] = [info.stats for info in infos]
        self._failures: dict[int, str] = {}
        self._last_heard = [time.monotonic()] * len(self._replicas)
        """When each replica last sent something (or last got work while it had none)."""
        self._draining = False
        self._stopping = False
        self._closed = threading.Event()
        for replica in self._replicas:
            replica.serve(self._on_message, self._on_exit)
        if replica_timeout is not None:
            threading.Thread(target=self._watch, args=(replica_timeout,), name="replica-watchdog",
                             daemon=True).start()

    # ---- what the engine is -----------------------------------------------------------------

    @property
    def replica_pids(self) -> list[int]:
        return [replica.pid for replica in self._replicas]

    @property
    def capacity(self) -> int:
        """Most requests in flight: ``max_num_seqs`` per live replica + max_queued_requests."""
        live = sum(self._router.alive)
        return live * self.engine_config.max_num_seqs + self.max_queued_requests

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    @property
    def stats(self) -> EngineStats:
        """Every replica's latest snapshot in one (``stats.combine``: counts summed, ratios
        recomputed). A replica that died counts as idle, its counters kept."""
        with self._lock:
            return combine(self._stats)

    @property
    def replica_stats(self) -> list[EngineStats]:
        """Each replica's latest snapshot (sent at most ``STATS_INTERVAL`` apart while it
        works, and whenever it runs out of work)."""
        with self._lock:
            return list(self._stats)

    @property
    def routing(self) -> RouterSnapshot:
        """Requests in flight per replica, which replicas live, and how requests were routed."""
        with self._lock:
            return self._router.snapshot()

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def is_healthy(self) -> bool:
        """Every replica is alive. One that died is never restarted, so the server reports
        itself unhealthy (for its orchestrator to restart it) rather than run on at a fraction
        of its capacity unseen; meanwhile the live replicas keep serving."""
        return all(self._router.alive) and not self._stopping

    @property
    def failure(self) -> str | None:
        """Which replicas died and why (None while every one serves)."""
        if self._failures:
            return "; ".join(f"replica {i} (pid {self._replicas[i].pid}) {why}"
                             for i, why in sorted(self._failures.items()))
        return "the replicas have stopped" if self._stopping else None

    # ---- requests ---------------------------------------------------------------------------

    async def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Routes a request to a replica and returns its output stream once that replica
        accepted it. Raises what ``AsyncEngine.add_request`` raises, before anything ran."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        params = params or self.sampling_defaults.params()
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt_ids(prompt, self.tokenizer, self.model_path)
        else:  # the router needs token ids, and the replicas may as well get them
            text, ids = await asyncio.to_thread(prompt_ids, prompt, self.tokenizer, self.model_path)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        with self._lock:
            self._check_admission()
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            tracked = _Tracked(stream, self._route(ids), OutputState(request_id, text, ids), params)
            self._requests[request_id] = tracked
            self._send_add(request_id, tracked)  # (under the lock: an abort of it comes after)
        try:
            await stream.accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV pages; safe from any thread, unknown ids ignored."""
        with self._lock:
            tracked = self._forget(request_id)
            if tracked is None:
                return
            self._replicas[tracked.route.replica].send((ABORT, request_id))
        tracked.stream.resolve(None)  # (an add still waiting returns; its stream ends here)

    def _check_admission(self) -> None:
        if not any(self._router.alive) and not self._stopping:
            raise EngineDeadError(f"every replica stopped after an error: {self.failure}")
        if self._draining or self._stopping:
            raise EngineDrainingError("the server is shutting down and takes no new requests")
        if len(self._requests) >= self.capacity:
            raise QueueFullError(
                f"{len(self._requests)} requests are in flight, the most this server queues "
                f"(max_num_seqs {self.engine_config.max_num_seqs} x {sum(self._router.alive)} "
                f"replicas + max_queued_requests {self.max_queued_requests}); retry later")

    def _route(self, token_ids: list[int]) -> Route:
        route = self._router.route(token_ids)
        if self._router.num_requests[route.replica] == 1:  # (its silence counts from now)
            self._last_heard[route.replica] = time.monotonic()
        return route

    def _send_add(self, request_id: str, tracked: _Tracked) -> None:
        output = tracked.output
        self._replicas[tracked.route.replica].send(
            (ADD, request_id, {"prompt": output.prompt, "prompt_token_ids": output.prompt_token_ids},
             tracked.params))

    def _forget(self, request_id: str) -> _Tracked | None:
        tracked = self._requests.pop(request_id, None)
        if tracked is not None:
            self._router.release(tracked.route)
        return tracked

    # ---- shutdown ---------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuses new requests from now on; requests in flight go on. Safe from a signal
        handler (it only sets a flag)."""
        self._draining = True

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuses new requests, lets those in flight finish for up to ``drain_timeout``
        seconds, aborts the rest (their streams raise RequestAbortedError), and stops every
        replica process."""
        self.begin_drain()
        deadline = time.monotonic() + drain_timeout
        while self._requests and time.monotonic() < deadline and any(self._router.alive):
            await asyncio.sleep(0.05)
        if self._requests:
            log.warning("aborting %d requests still running after the %.1fs drain timeout",
                        len(self._requests), drain_timeout)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stops every replica now, aborting whatever is in flight (blocking; idempotent)."""
        with self._lock:
            self._stopping = True
        self._closed.set()
        for replica in self._replicas:
            replica.stop()

    def __enter__(self) -> "DataParallelEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the replicas' messages (on their reader threads) ---------------------------------

    def _watch(self, timeout: float) -> None:
        """Kills a replica that has requests and has sent nothing for ``timeout`` seconds."""
        while not self._closed.wait(min(timeout / 4, 5.0)):
            now = time.monotonic()
            with self._lock:
                hung = [i for i, alive in enumerate(self._router.alive)
                        if alive and self._router.num_requests[i] and i not in self._failures
                        and now - self._last_heard[i] > timeout]
                for i in hung:  # (a failure first: its requests fail, none moves elsewhere)
                    self._failures[i] = (f"sent nothing for {now - self._last_heard[i]:.0f}s "
                                         f"with {self._router.num_requests[i]} requests (hung): "
                                         "killed")
            for i in hung:
                log.error("replica %d %s", i, self._failures[i])
                self._replicas[i].kill()

    def _on_message(self, index: int, message: tuple) -> None:
        self._last_heard[index] = time.monotonic()
        kind = message[0]
        if kind == OUTPUTS:
            _, deltas, stats = message
            ready = []
            with self._lock:
                if stats is not None:
                    self._stats[index] = stats
                for delta in deltas:
                    tracked = self._requests.get(delta.request_id)
                    if tracked is not None:
                        tracked.answered = True
                        if delta.finished:
                            self._forget(delta.request_id)
                        ready.append((tracked, delta))
            for tracked, delta in ready:  # (one reader thread per replica: one per request)
                deliver_output(tracked.stream, tracked.output.apply(delta))
        elif kind == ACCEPTED:
            _, request_id, error = message
            with self._lock:
                tracked = self._requests.get(request_id)
                if tracked is not None and error is not None:
                    self._forget(request_id)
            if tracked is not None:
                tracked.stream.resolve(error)
                if error is not None and tracked.moved:  # (its add has returned long since)
                    tracked.stream.fail(error)
        elif kind == DEAD:
            with self._lock:
                self._failures[index] = f"failed: {message[1]}"

    def _on_exit(self, index: int, code: int) -> None:
        with self._lock:
            stopping = self._stopping
            step_raised = index in self._failures  # (its DEAD message came first)
            if not stopping:
                self._failures.setdefault(index, f"exited with code {code}")
            self._router.remove(index)
            self._stats[index] = dataclasses.replace(self._stats[index], **IDLE)
            lost, moved = [], 0
            for request_id, tracked in list(self._requests.items()):
                if tracked.route.replica != index:
                    continue
                self._forget(request_id)
                if (stopping or step_raised or tracked.answered or tracked.moved
                        or not any(self._router.alive)):
                    lost.append(tracked)
                    continue
                tracked.route = self._route(tracked.output.prompt_token_ids)
                tracked.moved = True
                self._requests[request_id] = tracked
                self._send_add(request_id, tracked)
                moved += 1
        if stopping:
            error: Exception = RequestAbortedError("the request was aborted because the server "
                                                   "shut down")
        else:
            log.error("replica %d (pid %d) %s; %d requests on it failed, %d not yet started "
                      "went to other replicas", index, self._replicas[index].pid,
                      self._failures[index], len(lost), moved)
            error = EngineDeadError(f"replica {index} {self._failures[index]}")
        for tracked in lost:
            tracked.stream.resolve(error)  # (an add still waiting raises it)
            tracked.stream.fail(error)


def local_replicas(model: str | Path | None, data_parallel_size: int, engine_config: EngineConfig,
                   config: dict[str, Any],
                   replica_init: Callable[[Any], None] | None = None) -> list[ReplicaClient]:
    """This host's replicas (not started yet), each with its GPUs; ``config`` as
    ``DataParallelEngine``'s, checked (``check_config``)."""
    options = {**config, "mode": "aggregated"}
    level = logging.getLogger().getEffectiveLevel()
    replicas = []
    for index, gpus in enumerate(replica_devices(data_parallel_size,
                                                 engine_config.tensor_parallel_size)):
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        setup = ReplicaSetup(index, None if model is None else str(model), options, gpus,
                             level, replica_init)
        replicas.append(ReplicaClient(setup, env))
    return replicas


def check_config(data_parallel_size: int, max_queued_requests: int,
           config: dict[str, Any]) -> EngineConfig:
    """The replicas' EngineConfig, once every option was checked (before any process starts)."""
    if data_parallel_size < 1:
        raise ConfigError("data_parallel_size", f"must be >= 1, got {data_parallel_size}")
    if max_queued_requests < 0:
        raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
    if config.get("mode", "aggregated") == "duet":
        raise ConfigError("data_parallel_size", "does not run in duet mode yet (its MPS daemon and "
                          "workers serve one engine per host): use mode='aggregated'")
    # 'auto' means duet where available, and it is not: every replica runs aggregated.
    fields = {k: v for k, v in config.items() if k not in ("dtype", "load_format")}
    return EngineConfig(**{**fields, "mode": "aggregated"})
