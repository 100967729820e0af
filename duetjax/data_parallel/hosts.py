"""Serving over several hosts: every host's replicas behind host 0's front.

Each host's serving process joins the cluster with ``jax.distributed.initialize`` (``join``):
the coordination service on host 0 is the rendezvous, and its key-value store publishes the
address of host 0's relay listener. The serving processes never create a JAX backend; their
replicas are child processes (``client.py``), as on one host.

Host R > 0 (``serve_host``) starts its replicas and relays them to host 0 over one TCP
connection, authenticated with the cluster key (``multiprocessing.connection``'s HMAC
challenge, both ways): pickled messages from an unauthenticated peer could run code. On that
connection go (replica's index on its host, message), the messages of ``replica.py`` plus
(EXITED, exit code) when a replica's process has ended. Host 0 (``FrontHosts``) hands the
front one ``RemoteReplica`` per remote replica, with ``ReplicaClient``'s interface, so the
front treats it as a local one; a lost connection is a set of dead replicas.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable

from .client import STOP_TIMEOUT, ReplicaClient, ReplicaStartError, ready_payload
from .replica import DEAD, FAILED, KILL, READY, STOP, ReplicaInfo, portable_error

log = logging.getLogger(__name__)

CLUSTER_KEY_ENV = "DUETJAX_CLUSTER_KEY"
JOIN_TIMEOUT = 300
"""Seconds hosts wait for each other: to form the cluster, and for host 0 to hear from each."""
RELAY_ADDRESS_KEY = "duetjax/relay_address"
JOIN, EXITED = "join", "exited"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this host stands in the cluster (the serving command's flags)."""

    coordinator_address: str
    num_hosts: int
    host_rank: int
    key: bytes

    @property
    def coordinator_host(self) -> str:
        return self.coordinator_address.rpartition(":")[0].strip("[]")


def cluster_key() -> bytes:
    """The shared secret from the environment (never a flag: ``ps`` shows those)."""
    key = os.environ.get(CLUSTER_KEY_ENV, "")
    if not key:
        raise ValueError(f"serving on several hosts needs a shared secret in the environment "
                         f"variable {CLUSTER_KEY_ENV} (the same on every host)")
    return key.encode()


def join(cluster: Cluster) -> None:
    """Forms the cluster: returns once every host has joined (or raises after JOIN_TIMEOUT)."""
    import jax

    # Recoverable tasks: the coordination service then does not stop every host when one
    # misses its heartbeats, and the shutdown barrier does not wait for a dead host.
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_hosts, cluster.host_rank,
                               initialization_timeout=JOIN_TIMEOUT,
                               # (JAX binds every interface unless told)
                               coordinator_bind_address=cluster.coordinator_address)


def _key_value_store() -> Any:
    """JAX's internal coordination-service client (``key_value_set``,
    ``blocking_key_value_get``): JAX has no public API for its key-value store."""
    from jax._src.distributed import global_state

    return global_state.client


def _shut(conn: Connection) -> None:
    """Ends a connection both ways, so a thread blocked reading it sees end of file."""
    try:
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


# ---- host 0 -----------------------------------------------------------------------------------

class FrontHosts:
    """Host 0's side: joins the cluster, listens on the coordinator's address (published for
    the other hosts), and hands over their replicas once they have joined (``accept``)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._listener: Listener | None = None
        self._links: list[_Link] = []
        self._closed = False

    def accept(self, first_index: int, start_timeout: float | None) -> list["RemoteReplica"]:
        """The other hosts' replicas, numbered from ``first_index`` in host order, once each
        host has joined and connected (JOIN_TIMEOUT) and its replicas have started
        (start_timeout)."""
        try:
            join(self.cluster)
        except Exception as error:  # (the coordination service's own error says who is missing)
            raise ReplicaStartError(f"the cluster of {self.cluster.num_hosts} hosts did not form "
                                    f"in {JOIN_TIMEOUT}s: {error}") from error
        self._listener = Listener((self.cluster.coordinator_host, 0), authkey=self.cluster.key)
        host, port = self._listener.address[:2]
        _key_value_store().key_value_set(RELAY_ADDRESS_KEY, f"{host}:{port}")
        joined: dict[int, Connection] = {}
        accepting = threading.Thread(target=self._accept, args=(joined,), daemon=True)
        accepting.start()
        accepting.join(JOIN_TIMEOUT)
        self._closed = True
        self._listener.close()  # (no host joins later; a blocked accept ends)
        missing = sorted(set(range(1, self.cluster.num_hosts)) - set(joined))
        if missing:
            for conn in joined.values():
                conn.close()
            raise ReplicaStartError(f"hosts {missing} did not connect in {JOIN_TIMEOUT}s")
        replicas = []
        for rank, conn in sorted(joined.items()):
            link = _Link(rank, conn)
            self._links.append(link)
            for info in link.wait_ready(start_timeout):
                replicas.append(RemoteReplica(link, first_index + len(replicas), info))
        return replicas

    def _accept(self, joined: dict[int, Connection]) -> None:
        while len(joined) < self.cluster.num_hosts - 1:
            try:
                conn = self._listener.accept()
            except AuthenticationError as error:
                log.error("refused a host whose %s differs from this one's (%s)",
                          CLUSTER_KEY_ENV, error)
                continue
            except OSError:
                if self._closed:  # (accept's time is up)
                    return
                continue  # a peer that went away mid-handshake
            try:
                kind, rank = conn.recv()
            except (EOFError, OSError, ValueError):
                kind = rank = None
            if kind != JOIN or not isinstance(rank, int) or not 0 < rank < self.cluster.num_hosts or rank in joined:
                log.error("refused a host that joined as rank %r", rank)
                conn.close()
                continue
            log.info("host %d connected", rank)
            joined[rank] = conn

    def close(self) -> None:
        """Drops every host (their replicas stop)."""
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        for link in self._links:
            _shut(link.conn)


class _Link:
    """One remote host's connection: a writer thread for its replicas' commands, a reader
    thread handing their messages to the front."""

    def __init__(self, rank: int, conn: Connection):
        self.rank = rank
        self.conn = conn
        self.replicas: list[RemoteReplica] = []
        self.outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()

    def wait_ready(self, timeout: float | None) -> list[ReplicaInfo]:
        if not self.conn.poll(timeout):
            raise ReplicaStartError(f"host {self.rank}'s replicas did not start in {timeout:.0f}s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as error:
            raise ReplicaStartError(f"host {self.rank} went away during start-up") from error
        return ready_payload(message, f"host {self.rank}'s replicas")

    def serving(self) -> None:
        """Starts the threads once the front listens to every replica of this host."""
        if all(replica.on_message is not None for replica in self.replicas):
            threading.Thread(target=self._write, name=f"host-{self.rank}-writer",
                             daemon=True).start()
            threading.Thread(target=self._read, name=f"host-{self.rank}-reader",
                             daemon=True).start()

    def _write(self) -> None:
        while (item := self.outbox.get()) is not None:
            try:
                self.conn.send(item)
            except OSError:
                return  # the host is gone: the reader reports it

    def _read(self) -> None:
        try:
            while True:
                local, message = self.conn.recv()
                replica = self.replicas[local]
                if message[0] == EXITED:
                    replica.exited(message[1])
                    continue
                try:
                    replica.on_message(replica.index, message)
                except Exception:  # (a bug here must not stop the host's outputs)
                    log.exception("replica %d: handling %s failed", replica.index, message[0])
        except (EOFError, OSError):
            pass
        finally:
            for replica in self.replicas:
                if not replica.done.is_set():
                    replica.on_message(replica.index,
                                       (DEAD, f"was lost with host {self.rank} (its connection "
                                              f"ended)"))
                    replica.exited(-1)
            self.outbox.put(None)
            self.conn.close()


class RemoteReplica:
    """A replica of another host, as the front sees it: ``ReplicaClient``'s interface."""

    def __init__(self, link: _Link, index: int, info: ReplicaInfo):
        self.link = link
        self.local = len(link.replicas)
        self.index = index
        self.info = info
        self.on_message: Callable[[int, tuple], None] | None = None
        self._on_exit: Callable[[int, int], None] | None = None
        self.done = threading.Event()
        link.replicas.append(self)

    @property
    def pid(self) -> int:
        """Its process id on its own host."""
        return self.info.pid

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    def start(self) -> None:
        """Nothing: its host started it."""

    def wait_ready(self, timeout: float | None = None) -> ReplicaInfo:
        return self.info

    def serve(self, on_message: Callable[[int, tuple], None],
              on_exit: Callable[[int, int], None]) -> None:
        self.on_message, self._on_exit = on_message, on_exit
        self.link.serving()

    def send(self, message: tuple) -> None:
        self.link.outbox.put((self.local, message))

    def kill(self) -> None:
        """Asks its host to kill it (a hung replica); the host then reports the exit."""
        self.send((KILL,))

    def exited(self, code: int) -> None:
        if not self.done.is_set():
            self.done.set()
            self._on_exit(self.index, code)

    def stop(self) -> None:
        """Tells it to stop and waits; drops its host after ``STOP_TIMEOUT``."""
        if self.on_message is None:  # (never served: its host is dropped)
            _shut(self.link.conn)
            return
        self.send((STOP,))
        if not self.done.wait(STOP_TIMEOUT + 5):
            log.warning("host %d did not stop replica %d: dropping the host", self.link.rank,
                        self.index)
            _shut(self.link.conn)
            self.done.wait()


# ---- host R > 0 -------------------------------------------------------------------------------

def serve_host(cluster: Cluster, replicas: list[ReplicaClient], start_timeout: float | None,
               on_ready: Callable[[str], None] = lambda address: None) -> int:
    """Host R's life: connects to host 0, starts ``replicas``, relays them until host 0 stops
    them or goes away; 0 then. Raises ValueError when host 0 refuses the cluster key."""
    address = _key_value_store().blocking_key_value_get(RELAY_ADDRESS_KEY, JOIN_TIMEOUT * 1000)
    host, _, port = address.rpartition(":")
    try:
        conn = Client((host, int(port)), authkey=cluster.key)
    except (AuthenticationError, EOFError, ConnectionResetError) as error:
        raise ValueError(f"host 0 ({address}) refused this host: its {CLUSTER_KEY_ENV} differs "
                         f"from host 0's") from error
    conn.send((JOIN, cluster.host_rank))
    lock = threading.Lock()  # (the replicas' reader threads share the connection)
    remaining = [len(replicas)]

    def relay(local: int, message: tuple) -> None:
        with lock:
            try:
                conn.send((local, message))
            except OSError:
                pass  # host 0 is gone: the main loop sees it

    def exited(local: int, code: int) -> None:
        relay(local, (EXITED, code))
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:  # nothing left to relay
                _shut(conn)

    try:
        try:
            for replica in replicas:
                replica.start()
            infos = [replica.wait_ready(start_timeout) for replica in replicas]
        except Exception as error:
            conn.send((FAILED, portable_error(error), traceback.format_exc()))
            raise
        conn.send((READY, infos))
        for replica in replicas:
            replica.serve(relay, exited)
        on_ready(address)
        while True:
            local, command = conn.recv()
            if command[0] == KILL:
                replicas[local].kill()
            else:
                replicas[local].send(command)
    except (EOFError, OSError):
        return 0  # host 0 stopped our replicas, or went away
    finally:
        for replica in replicas:
            replica.stop()
        conn.close()
