"""A data-parallel replica: one ``Engine`` in its own process, driven over a socket.

Started by ``client.ReplicaClient`` as ``python -m duetjax.data_parallel FD``, with
its GPUs already in ``CUDA_VISIBLE_DEVICES`` (set in the new process's environment, so before
anything imports JAX). FD is its end of a private socket pair, on which pickled tuples go:

1. the front sends one ``ReplicaSetup``; the replica builds its Engine and answers
   (READY, ``ReplicaInfo``) or (FAILED, the error, its traceback);
2. then the front sends (ADD, request id, prompt, params), (ABORT, request id) and (STOP,).
   The replica answers each ADD with (ACCEPTED, request id, None or the error that refused
   it), sends (OUTPUTS, output deltas, stats or None) after each step with outputs
   (``deltas.py``: what each request's output changed; its stats
   every ``STATS_INTERVAL`` seconds, with every finished request's last output, and when it
   runs out of work), and (DEAD, why) when a step raises (a device failure), after which it
   exits.

Between steps it takes every command waiting; without work it blocks on the socket. It exits
on STOP or when the front goes away (end of file), aborting whatever it still runs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

ADD, ABORT, STOP = "add", "abort", "stop"
KILL = "kill"
"""The front's order to another host to kill one of its replicas (hung); no replica gets it."""
READY, FAILED, ACCEPTED, OUTPUTS, DEAD = "ready", "failed", "accepted", "outputs", "dead"
STATS_INTERVAL = 0.1
"""Seconds between the stats snapshots a busy replica sends (with its outputs)."""

log = logging.getLogger("duetjax.data_parallel.replica")


@dataclasses.dataclass(frozen=True)
class ReplicaSetup:
    """What a replica needs to start; pickled once over the socket."""

    index: int
    model: str | None
    """``Engine``'s model argument (None: the embedded default)."""
    options: dict[str, Any]
    """``Engine``'s keyword arguments: dtype, load_format and EngineConfig fields."""
    gpus: str | None
    """The ``CUDA_VISIBLE_DEVICES`` it was given; None: no GPU (it runs where JAX finds)."""
    log_level: int = logging.INFO
    init: Callable[[Any], None] | None = None
    """Called with the built Engine before serving (an importable function: it is pickled by
    name)."""


@dataclasses.dataclass(frozen=True)
class ReplicaInfo:
    """What a ready replica tells the front about its engine."""

    pid: int
    devices: list[str]
    tokenizer: Any
    sampling_defaults: Any
    max_model_len: int
    vocab_size: int
    model_path: Path
    stats: Any
    """Its ``EngineStats`` once started (``stats.portable``)."""


def portable_error(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def start(setup: ReplicaSetup) -> Any:
    """The replica's Engine, on the GPUs it was given."""
    import jax

    from ..engine import Engine

    if setup.gpus is not None and jax.default_backend() != "gpu":
        raise RuntimeError(f"replica {setup.index} was given GPUs {setup.gpus}, but JAX runs on "
                           f"{jax.default_backend()}: is JAX's CUDA build installed?")
    engine = Engine(setup.model, show_progress=False, **setup.options)
    if setup.init is not None:
        setup.init(engine)
    return engine


def info(engine: Any) -> ReplicaInfo:
    import jax

    from .stats import portable

    return ReplicaInfo(os.getpid(), [str(d) for d in jax.local_devices()], engine.tokenizer,
                       engine.sampling_defaults, engine.max_model_len, engine.vocab_size,
                       engine.model_path, portable(engine.stats()))


def serve(conn: Connection, engine: Any) -> int:
    """Runs commands and steps until STOP or the front's end of file (0), or a step that
    raises (1)."""
    from .deltas import OutputEncoder
    from .stats import portable

    encoder = OutputEncoder()
    stats_due = 0.0
    reported_idle = False
    try:
        while True:
            if not engine.has_unfinished_requests():
                if not reported_idle:  # (what a finished request freed shows at once)
                    conn.send((OUTPUTS, [], portable(engine.stats())))
                    reported_idle = True
                if not _handle(conn.recv(), conn, engine, encoder):  # no work: wait for one
                    return 0
                continue
            while conn.poll(0):
                if not _handle(conn.recv(), conn, engine, encoder):
                    return 0
            reported_idle = False
            try:
                outputs = engine.step()
            except Exception as error:
                log.exception("a step failed: this replica stops")
                conn.send((DEAD, f"{type(error).__name__}: {error}"))
                return 1
            deltas = [encoder.encode(output) for output in outputs]
            stats = None
            # (with a finished request's last output: the front's stats then count it)
            if time.monotonic() >= stats_due or any(d.finished for d in deltas):
                stats, stats_due = portable(engine.stats()), time.monotonic() + STATS_INTERVAL
            if deltas or stats is not None:
                conn.send((OUTPUTS, deltas, stats))
    except (EOFError, OSError):
        return 0  # the front went away


def _handle(message: tuple, conn: Connection, engine: Any, encoder: Any) -> bool:
    """Runs one command; False for STOP."""
    kind = message[0]
    if kind == ADD:
        _, request_id, prompt, params = message
        try:
            engine.add_request(prompt, params, request_id)
        except Exception as error:  # a ValueError / TypeError names what to fix
            conn.send((ACCEPTED, request_id, portable_error(error)))
        else:
            conn.send((ACCEPTED, request_id, None))
    elif kind == ABORT:
        engine.abort(message[1])
        encoder.forget(message[1])
    elif kind == STOP:
        return False
    else:
        raise ValueError(f"unknown command {kind!r}")
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m duetjax.data_parallel FD  (started by DataParallelEngine)",
              file=sys.stderr)
        return 2
    conn = Connection(int(argv[0]))
    setup: ReplicaSetup = conn.recv()
    logging.basicConfig(level=setup.log_level,
                        format=f"%(asctime)s %(levelname)s replica {setup.index} %(name)s: "
                               "%(message)s")
    try:
        engine = start(setup)
        ready = info(engine)
    except Exception as error:
        conn.send((FAILED, portable_error(error), traceback.format_exc()))
        return 1
    from ..gc_pauses import freeze_startup_heap

    with engine:
        conn.send((READY, ready))
        freeze_startup_heap()  # (a full collection over the start-up heap would stall a step)
        return serve(conn, engine)
