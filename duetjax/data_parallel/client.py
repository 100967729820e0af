"""The front's handle on one replica process (see ``replica.py`` for what crosses the socket).

A fresh interpreter per replica (not a fork of the front, whose threads and JAX state must not
be copied), with its own environment, so its ``CUDA_VISIBLE_DEVICES`` holds before JAX loads,
and outside the server's process group, so a Ctrl-C meant for the server does not kill it
mid-drain. Two threads per replica: one sends the queued commands (a full socket never blocks
the event loop), one reads the replica's messages and hands them to ``on_message``; at end of
file it waits for the process and calls ``on_exit`` with its exit code.
"""
from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping

from ..child_process import start_child
from .replica import FAILED, READY, STOP, ReplicaInfo, ReplicaSetup

log = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0
"""Seconds a replica may take to exit once told to stop, before it is killed."""


class ReplicaStartError(RuntimeError):
    """A replica process could not start its engine."""


def ready_payload(message: tuple, who: str) -> Any:
    """What a (READY, payload) start-up answer carries; a (FAILED, error, traceback) one raises
    the error where it is an option's (ValueError, TypeError, OSError: the command line names
    it), else ReplicaStartError with the traceback."""
    if message[0] == FAILED:
        _, error, trace = message
        if isinstance(error, (ValueError, TypeError, OSError)):
            log.debug("%s failed to start:\n%s", who, trace)
            raise error
        raise ReplicaStartError(f"{who} failed to start:\n{trace}")
    assert message[0] == READY, message
    return message[1]


class ReplicaClient:
    """Starts one replica process, sends it commands and reads its messages."""

    def __init__(self, setup: ReplicaSetup, env: Mapping[str, str]):
        self.setup = setup
        self.index = setup.index
        self.env = dict(env)
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.info: ReplicaInfo | None = None
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Launches the process, which builds its engine in the background (``wait_ready``)."""
        self.process, self.conn = start_child("duetjax.data_parallel", self.env)
        self.conn.send(self.setup)
        where = f"GPUs {self.setup.gpus}" if self.setup.gpus is not None else "no GPU"
        log.info("replica %d starting (pid %d, %s)", self.index, self.process.pid, where)

    def wait_ready(self, timeout: float | None = None) -> ReplicaInfo:
        """Blocks until the engine is up; raises the replica's own start-up error when it is an
        option's (ValueError, TypeError, OSError: the command line names it), else
        ReplicaStartError with its traceback."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.conn.poll(0.5):
            if not self.alive:
                raise ReplicaStartError(f"replica {self.index} exited during start-up (exit code "
                                        f"{self.process.poll()}; its log says why)")
            if deadline is not None and time.monotonic() > deadline:
                raise ReplicaStartError(f"replica {self.index} did not start in {timeout:.0f}s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as error:
            raise ReplicaStartError(f"replica {self.index} exited during start-up") from error
        self.info = ready_payload(message, f"replica {self.index}")
        log.info("replica %d ready (pid %d on %s)", self.index, self.info.pid,
                 ", ".join(self.info.devices))
        return self.info

    def serve(self, on_message: Callable[[int, tuple], None],
              on_exit: Callable[[int, int], None]) -> None:
        """Starts the threads that send commands and hand the replica's messages over."""
        self._threads = [
            threading.Thread(target=self._write, name=f"replica-{self.index}-writer", daemon=True),
            threading.Thread(target=self._read, args=(on_message, on_exit),
                             name=f"replica-{self.index}-reader", daemon=True)]
        for thread in self._threads:
            thread.start()

    def send(self, message: tuple) -> None:
        """Queues a command (never blocks; sent in order)."""
        self._outbox.put(message)

    def stop(self) -> None:
        """Tells the replica to stop (after the commands queued before), waits for it, kills it
        after ``STOP_TIMEOUT``, and waits for its threads (``on_exit`` has run then). One that
        is still starting is killed at once."""
        if self.process is None:
            return
        if not self._threads:
            self.process.kill()
        self._outbox.put((STOP,))
        self._outbox.put(None)
        self._wait_or_kill(STOP_TIMEOUT)
        for thread in self._threads:
            thread.join()
        self.conn.close()

    def kill(self) -> None:
        """Kills the process now (a hung replica); its reader then reports the exit."""
        if self.process is not None:
            self.process.kill()

    def _wait_or_kill(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("replica %d did not exit in %.0fs: killing it", self.index, timeout)
            self.process.kill()
            return self.process.wait()

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:
                return  # the replica is gone: the reader reports it

    def _read(self, on_message: Callable[[int, tuple], None],
              on_exit: Callable[[int, int], None]) -> None:
        try:
            while True:
                message = self.conn.recv()
                try:
                    on_message(self.index, message)
                except Exception:  # (a bug here must not stop the replica's outputs)
                    log.exception("replica %d: handling %s failed", self.index, message[0])
        except (EOFError, OSError):
            pass
        finally:
            code = self._wait_or_kill(STOP_TIMEOUT)
            self._outbox.put(None)  # (ends the writer if it still waits)
            on_exit(self.index, code)
