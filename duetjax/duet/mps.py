"""CUDA MPS (Multi-Process Service) daemon management for the multiplexed mode.

JAX/XLA cannot pin a stream to a subset of SMs, so duetjax partitions the GPU between
processes instead: each worker is an MPS client with a fixed
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (docs/design.md, "DuetServe in duetjax"). This module
finds or starts the MPS control daemon those clients attach to, hands out the environment a
worker needs, and makes sure a daemon we started is stopped again — on ``stop()``, on leaving a
``with`` block, at interpreter exit and on SIGTERM/SIGINT — because a leaked daemon keeps the
GPU in MPS mode for every later process on the machine.

A daemon we did not start (``owned=False``) is never stopped: it belongs to the machine's
administrator or to another job.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import types
from typing import Callable, Mapping

DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
"""Where the real control daemon puts its pipes when CUDA_MPS_PIPE_DIRECTORY is unset."""
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"
"""Where the real control daemon logs when CUDA_MPS_LOG_DIRECTORY is unset."""
CONTROL_BINARY_NAME = "nvidia-cuda-mps-control"
FALLBACK_BIN_DIR = "/usr/local/nvidia/bin"
"""Where GPU containers commonly mount the NVIDIA driver tools, outside PATH."""
CONTROL_PIPE = "control"
"""Name of the control FIFO inside the pipe directory; its presence means a daemon was set up."""
PID_FILE = "nvidia-cuda-mps-control.pid"
"""The daemon's pid file inside the pipe directory (used to confirm it has exited)."""
CONTROL_LOG = "control.log"
"""The control daemon's log inside the log directory (its tail goes into start errors)."""


class MPSError(RuntimeError):
    """The MPS control daemon could not be started, reached or stopped."""


@dataclasses.dataclass(frozen=True)
class MPSConfig:
    """How to find and start a private MPS control daemon."""

    control_binary: str | None = None
    """Path of ``nvidia-cuda-mps-control``; None: found on PATH, else in /usr/local/nvidia/bin
    (GPU containers often mount it there, outside PATH)."""
    pipe_dir: str | None = None
    """CUDA_MPS_PIPE_DIRECTORY of the daemon; None: a private temporary directory (mode 0700,
    removed on stop) so our daemon never collides with a system-wide one in /tmp/nvidia-mps."""
    log_dir: str | None = None
    """CUDA_MPS_LOG_DIRECTORY of the daemon; None: a private temporary directory (mode 0700,
    removed on stop), because /var/log/nvidia-mps is usually not writable by us."""
    start_timeout_s: float = 10.0
    """How long to wait for a started daemon to answer on its control pipe before giving up."""
    stop_timeout_s: float = 5.0
    """How long to wait for the daemon to exit after ``quit`` before it is killed."""
    poll_interval_s: float = 0.02
    """Pause between readiness/exit checks: short, since start-up is usually sub-second."""
    nvidia_smi: str | None = None
    """Path of ``nvidia-smi`` used by :func:`mps_status`; None: PATH, else /usr/local/nvidia/bin."""


def _find_tool(name: str, explicit: str | None) -> str | None:
    """An explicit path if executable, else ``name`` on PATH, else in FALLBACK_BIN_DIR."""
    if explicit is not None:
        return explicit if os.access(explicit, os.X_OK) and os.path.isfile(explicit) else None
    found = shutil.which(name)
    if found:
        return found
    fallback = os.path.join(FALLBACK_BIN_DIR, name)
    return fallback if os.access(fallback, os.X_OK) and os.path.isfile(fallback) else None


def find_control_binary(config: MPSConfig | None = None) -> str | None:
    """Path of the MPS control binary per ``config``, or None when there is none."""
    return _find_tool(CONTROL_BINARY_NAME, (config or MPSConfig()).control_binary)


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (an orphaned daemon may wait to be reaped
    by an init that never reaps in containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _read_pid(pipe_dir: str) -> int | None:
    try:
        with open(os.path.join(pipe_dir, PID_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _mps_env(base: Mapping[str, str], pipe_dir: str, log_dir: str) -> dict[str, str]:
    env = dict(base)
    env["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
    env["CUDA_MPS_LOG_DIRECTORY"] = log_dir
    return env


def _control(binary: str, command: str, env: Mapping[str, str], timeout_s: float
             ) -> subprocess.CompletedProcess[str]:
    """Send one command to the daemon through the control binary's stdin (its only interface)."""
    return subprocess.run([binary], input=command + "\n", env=dict(env), capture_output=True,
                          text=True, timeout=max(timeout_s, 0.1), check=False)


def _answers(binary: str, env: Mapping[str, str], pipe_dir: str, timeout_s: float) -> bool:
    """Whether a daemon is set up in ``pipe_dir`` and answers ``get_server_list``."""
    if not os.path.exists(os.path.join(pipe_dir, CONTROL_PIPE)):
        return False
    try:
        return _control(binary, "get_server_list", env, timeout_s).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _log_tail(log_dir: str, lines: int = 20) -> str:
    try:
        with open(os.path.join(log_dir, CONTROL_LOG), errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError as e:
        return f"(no MPS control log: {e})"
    return "\n".join(tail) if tail else "(MPS control log is empty)"


class MPSDaemon:
    """A running MPS control daemon: where its pipes are, and (if we started it) how to stop it.

    Use as a context manager so the daemon is stopped even if the body raises.
    """

    def __init__(self, pipe_dir: str, log_dir: str, owned: bool, control_binary: str,
                 pid: int | None = None, private_dirs: tuple[str, ...] = (),
                 stop_timeout_s: float = 5.0, poll_interval_s: float = 0.02) -> None:
        self.pipe_dir = pipe_dir
        """CUDA_MPS_PIPE_DIRECTORY that clients must use to reach this daemon."""
        self.log_dir = log_dir
        """CUDA_MPS_LOG_DIRECTORY of the daemon."""
        self.owned = owned
        """True if we started it; only then does ``stop()`` do anything."""
        self.control_binary = control_binary
        self.pid = pid
        """The daemon's pid when known (from its pid file), to confirm it exited."""
        self._private_dirs = private_dirs
        self._stop_timeout_s = stop_timeout_s
        self._poll_s = poll_interval_s
        self._stopped = False
        if owned:
            _register(self)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __repr__(self) -> str:
        return (f"MPSDaemon(pipe_dir={self.pipe_dir!r}, log_dir={self.log_dir!r}, "
                f"owned={self.owned}, pid={self.pid}, stopped={self._stopped})")

    def client_env(self, active_thread_percentage: int) -> dict[str, str]:
        """The MPS variables a worker process needs (merge them into its environment).

        ``active_thread_percentage`` caps the share of SMs the worker's kernels may occupy.
        """
        if isinstance(active_thread_percentage, bool) or not isinstance(active_thread_percentage,
                                                                        int):
            raise TypeError(f"active_thread_percentage must be an int, got "
                            f"{type(active_thread_percentage).__name__}")
        if not 1 <= active_thread_percentage <= 100:
            raise ValueError(f"active_thread_percentage must be in 1..100, got "
                             f"{active_thread_percentage}")
        if self._stopped:
            raise MPSError(f"MPS daemon at {self.pipe_dir} has been stopped")
        return {
            "CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir,
            "CUDA_MPS_LOG_DIRECTORY": self.log_dir,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(active_thread_percentage),
        }

    def stop(self) -> None:
        """Quit a daemon we started, wait for it to exit, remove our private directories.

        Idempotent; a daemon we did not start is left running. If the daemon ignores ``quit``
        for ``stop_timeout_s`` it is killed (we started it, so no one else depends on it).
        """
        if not self.owned or self._stopped:
            return
        env = _mps_env(os.environ, self.pipe_dir, self.log_dir)
        deadline = time.monotonic() + self._stop_timeout_s
        if self.pid is None:
            self.pid = _read_pid(self.pipe_dir)
        try:
            _control(self.control_binary, "quit", env, self._stop_timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            pass  # fall through to waiting / killing
        control = os.path.join(self.pipe_dir, CONTROL_PIPE)
        while time.monotonic() < deadline:
            gone = (not _pid_alive(self.pid)) if self.pid is not None else (
                not os.path.exists(control))
            if gone:
                break
            time.sleep(self._poll_s)
        else:
            if self.pid is not None:
                _kill(self.pid, self._poll_s)
        for d in self._private_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._stopped = True
        _unregister(self)

    def stop_after_exit(self, pid: int | None = None) -> None:
        """Hands the stop to a detached watcher that quits the daemon (and removes our private
        directories) once process ``pid`` (default: this one) has exited.

        For a process that is itself an MPS client (the duet engine): quitting the daemon
        under its own live CUDA context breaks that context, and the watcher also cleans up
        after a SIGKILL, which no handler in the process can. A no-op for a daemon we did not
        start.
        """
        if not self.owned or self._stopped:
            return
        script = ('while kill -0 "$0" 2>/dev/null; do sleep 0.2; done; '
                  'echo quit | "$1" >/dev/null 2>&1; sleep 1; shift; rm -rf -- "$@"')
        subprocess.Popen(["/bin/sh", "-c", script, str(pid or os.getpid()), self.control_binary,
                          *self._private_dirs],
                         env=_mps_env(os.environ, self.pipe_dir, self.log_dir),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
        self.owned = False  # still running, but the watcher stops it, not ``stop()``
        _unregister(self)

    def __enter__(self) -> MPSDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill(pid: int, poll_s: float) -> None:
    """SIGTERM, then SIGKILL after a second, a daemon that ignored ``quit``."""
    for sig, wait_s in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 1.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            if not _pid_alive(pid):
                return
            time.sleep(poll_s)


def find_running_daemon(env: Mapping[str, str] = os.environ,
                        config: MPSConfig | None = None) -> MPSDaemon | None:
    """A usable daemon at ``env``'s CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps), or None.

    Usable means its control pipe exists and ``get_server_list`` succeeds. The result is not
    owned: stopping it is a no-op.
    """
    cfg = config or MPSConfig()
    binary = find_control_binary(cfg)
    if binary is None:
        return None
    pipe_dir = env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    log_dir = env.get("CUDA_MPS_LOG_DIRECTORY") or DEFAULT_LOG_DIR
    if not _answers(binary, _mps_env(env, pipe_dir, log_dir), pipe_dir, cfg.start_timeout_s):
        return None
    return MPSDaemon(pipe_dir, log_dir, owned=False, control_binary=binary,
                     pid=_read_pid(pipe_dir))


def start_private_daemon(config: MPSConfig | None = None) -> MPSDaemon:
    """Start ``nvidia-cuda-mps-control -d`` on private directories and wait until it answers.

    Raises MPSError (with the tail of the control log) if the binary is missing, refuses to
    start, or does not answer within ``config.start_timeout_s``; nothing is left behind then.
    """
    cfg = config or MPSConfig()
    binary = find_control_binary(cfg)
    if binary is None:
        raise MPSError(f"{CONTROL_BINARY_NAME} not found (config={cfg.control_binary!r}, PATH, "
                       f"{FALLBACK_BIN_DIR})")
    private: list[str] = []
    pipe_dir, log_dir = cfg.pipe_dir, cfg.log_dir
    if pipe_dir is None:
        pipe_dir = tempfile.mkdtemp(prefix="duetjax-mps-pipe-")
        private.append(pipe_dir)
    if log_dir is None:
        log_dir = tempfile.mkdtemp(prefix="duetjax-mps-log-")
        private.append(log_dir)
    for d in private:
        os.chmod(d, 0o700)  # mkdtemp already uses 0700; make it explicit, clients share our uid
    env = _mps_env(os.environ, pipe_dir, log_dir)
    _ensure_cleanup_hooks()
    # A caller-given pipe dir may already hold someone else's daemon (then ``-d`` refuses):
    # remember its pid so the cleanup below never quits or kills a daemon we did not start.
    preexisting = _read_pid(pipe_dir)

    def fail(reason: str) -> MPSError:
        tail = _log_tail(log_dir)
        pid = _read_pid(pipe_dir)
        if pid is not None and pid != preexisting:
            # It did start (we started it) but is unusable: do not leak it.
            try:
                _control(binary, "quit", env, 1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
            end = time.monotonic() + 1.0
            while _pid_alive(pid) and time.monotonic() < end:
                time.sleep(cfg.poll_interval_s)
            _kill(pid, cfg.poll_interval_s)
        for d in private:
            shutil.rmtree(d, ignore_errors=True)
        return MPSError(f"{reason}\n--- MPS control log ({log_dir}/{CONTROL_LOG}) tail ---\n{tail}")

    deadline = time.monotonic() + cfg.start_timeout_s
    # The daemon forks and keeps our stdout/stderr: capture into a file, not a pipe, so we never
    # wait for an EOF that only comes when the daemon exits. New session: a terminal's Ctrl-C
    # must reach us (we then send ``quit``), not kill the daemon behind our back.
    with tempfile.TemporaryFile(mode="w+") as out:
        try:
            rc = subprocess.run([binary, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, timeout=max(cfg.start_timeout_s, 0.1),
                                start_new_session=True, check=False).returncode
        except subprocess.TimeoutExpired:
            raise fail(f"{binary} -d did not return within {cfg.start_timeout_s} s") from None
        except OSError as e:
            raise fail(f"could not run {binary} -d: {e}") from None
        out.seek(0)
        output = out.read().strip()
    if rc != 0:
        raise fail(f"{binary} -d exited with {rc}: {output or '(no output)'}")
    while True:
        remaining = deadline - time.monotonic()
        if _answers(binary, env, pipe_dir, min(max(remaining, 0.1), 2.0)):
            break
        if remaining <= 0:
            raise fail(f"MPS control daemon in {pipe_dir} did not answer get_server_list within "
                       f"{cfg.start_timeout_s} s")
        time.sleep(cfg.poll_interval_s)
    return MPSDaemon(pipe_dir, log_dir, owned=True, control_binary=binary,
                     pid=_read_pid(pipe_dir), private_dirs=tuple(private),
                     stop_timeout_s=cfg.stop_timeout_s, poll_interval_s=cfg.poll_interval_s)


# --- cleanup at exit and on signals -------------------------------------------------------------

_live: list[MPSDaemon] = []
_hooks_lock = threading.Lock()
_atexit_registered = False
_Handler = Callable[[int, types.FrameType | None], object] | int | signal.Handlers | None
_previous: dict[int, _Handler] = {}


def _register(d: MPSDaemon) -> None:
    _ensure_cleanup_hooks()
    _live.append(d)


def _unregister(d: MPSDaemon) -> None:
    try:
        _live.remove(d)
    except ValueError:
        pass


def stop_all() -> None:
    """Stop every daemon this process started and has not stopped yet (best effort)."""
    for d in list(_live):
        try:
            d.stop()
        except Exception:  # noqa: BLE001 - cleanup must reach every daemon
            pass


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    """Stop our daemons, then behave as the handler that was there before ours."""
    stop_all()
    prev = _previous.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
    elif prev == signal.SIG_IGN:
        return
    else:  # SIG_DFL or unknown (installed outside Python): die by the signal as before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _ensure_cleanup_hooks() -> None:
    """Register the atexit hook once, and our SIGTERM/SIGINT handlers unless already in place.

    Handlers can only be installed from the main thread; elsewhere atexit still covers normal
    exits. Installed once per process; a handler someone installs after ours replaces it (and
    may chain to it), and we do not fight over the slot.
    """
    global _atexit_registered
    with _hooks_lock:
        if not _atexit_registered:
            atexit.register(stop_all)
            _atexit_registered = True
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig in _previous:
                continue  # once per process: re-wrapping a handler that chains to ours would loop
            current = signal.getsignal(sig)
            try:
                signal.signal(sig, _on_signal)
            except (ValueError, OSError):
                continue
            _previous[sig] = current


# --- status line ------------------------------------------------------------------------------

def mps_status(config: MPSConfig | None = None, env: Mapping[str, str] | None = None,
               try_start: bool = False) -> str:
    """One log line saying whether multiplexing (MPS) is available and, if not, why. Never raises.

    With ``try_start`` a private daemon is started and stopped again, to catch a daemon that
    refuses to start (e.g. GPU in a compute mode MPS cannot use).
    """
    try:
        cfg = config or MPSConfig()
        env = os.environ if env is None else env
        binary = find_control_binary(cfg)
        if binary is None:
            return (f"MPS unavailable: {CONTROL_BINARY_NAME} not found on PATH or in "
                    f"{FALLBACK_BIN_DIR}; running without multiplexing")
        smi = _find_tool("nvidia-smi", cfg.nvidia_smi)
        if smi is None:
            return "MPS unavailable: nvidia-smi not found, cannot confirm a visible GPU"
        try:
            r = subprocess.run([smi, "-L"], env=dict(env), stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"MPS unavailable: nvidia-smi -L failed: {e}"
        gpus = [ln for ln in r.stdout.splitlines() if ln.startswith("GPU ")]
        if r.returncode != 0 or not gpus:
            detail = (r.stderr or r.stdout).strip().splitlines()
            return ("MPS unavailable: no GPU visible via nvidia-smi -L"
                    + (f" ({detail[-1]})" if detail else ""))
        running = find_running_daemon(env, cfg)
        if running is not None:
            return (f"MPS available: daemon running at {running.pipe_dir} ({len(gpus)} GPU(s), "
                    f"not started by us)")
        if try_start:
            try:
                with start_private_daemon(cfg) as d:
                    where = d.pipe_dir
            except MPSError as e:
                first = str(e).splitlines()[0]
                return f"MPS unavailable: daemon refused to start: {first}"
            return (f"MPS available: {binary}, {len(gpus)} GPU(s); a private daemon started and "
                    f"answered in {where}")
        return (f"MPS available: {binary}, {len(gpus)} GPU(s); no daemon running, a private one "
                f"will be started")
    except Exception as e:  # noqa: BLE001 - a status line must never take the engine down
        return f"MPS status unknown: {type(e).__name__}: {e}"
