"""CPU tests of duetjax.duet.mps against a fake ``nvidia-cuda-mps-control``.

The fake behaves like the real binary where the module depends on it: ``-d`` returns at once
and leaves a background server that creates ``$CUDA_MPS_PIPE_DIRECTORY/control`` and a pid file
and logs to ``$CUDA_MPS_LOG_DIRECTORY/control.log``; without arguments it reads one command
from stdin (``get_server_list`` exits 0 while the server runs, 1 otherwise; ``quit`` makes the
server remove its files and exit). Every server appends its pid to a record file, so the tests
can check that a process is really gone even after its directories were removed.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duetjax.duet import mps
from duetjax.duet.mps import MPSConfig, MPSError

REPO = Path(__file__).resolve().parents[3]

FAKE = r'''#!{python}
import os, subprocess, sys, time
MODE = {mode!r}
RECORD = {record!r}
PIPE = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
LOGD = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
CONTROL = os.path.join(PIPE, "control")
PIDF = os.path.join(PIPE, "nvidia-cuda-mps-control.pid")
QUIT = os.path.join(PIPE, "fake-quit-request")

def log(msg):
    with open(os.path.join(LOGD, "control.log"), "a") as f:
        f.write("[fake %d] %s\n" % (os.getpid(), msg))

def alive(pid):
    try:
        os.kill(pid, 0)
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False

def running():
    try:
        pid = int(open(PIDF).read())
    except (OSError, ValueError):
        return False
    return os.path.exists(CONTROL) and alive(pid)

def serve():
    with open(RECORD, "a") as f:
        f.write("%d\n" % os.getpid())
    with open(PIDF, "w") as f:
        f.write(str(os.getpid()))
    if MODE == "never_ready":
        log("ERROR: cannot start MPS: no CUDA-capable device is detected")
    else:
        open(CONTROL, "w").close()
        log("Starting control daemon")
    start = time.monotonic()
    while time.monotonic() - start < 60 and os.path.isdir(PIPE):
        if os.path.exists(QUIT) and MODE != "ignore_quit":
            log("quit received, exiting")
            for p in (CONTROL, PIDF, QUIT):
                try:
                    os.remove(p)
                except OSError:
                    pass
            return
        time.sleep(0.01)

if sys.argv[1:] == ["-d"]:
    if running():
        print("An instance of this daemon is already running")
        sys.exit(1)
    subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    sys.exit(0)
if sys.argv[1:] == ["--serve"]:
    serve()
    sys.exit(0)
cmd = sys.stdin.read().strip()
if not running():
    sys.stderr.write("Cannot find MPS control daemon process\n")
    sys.exit(1)
if cmd == "get_server_list":
    sys.exit(0)
if cmd == "quit":
    open(QUIT, "w").close()
    sys.exit(0)
sys.stderr.write("Unrecognized command %r\n" % cmd)
sys.exit(1)
'''


class Fake:
    """A fake control binary in tmp_path plus the record of server pids it started."""

    def __init__(self, tmp_path: Path, mode: str = "normal") -> None:
        self.record = tmp_path / f"pids-{mode}.txt"
        self.record.write_text("")
        self.binary = tmp_path / f"fake-mps-control-{mode}"
        self.binary.write_text(FAKE.format(python=sys.executable, mode=mode,
                                           record=str(self.record)))
        self.binary.chmod(0o755)

    def config(self, **kw: object) -> MPSConfig:
        kw.setdefault("start_timeout_s", 5.0)
        kw.setdefault("stop_timeout_s", 3.0)
        return MPSConfig(control_binary=str(self.binary), **kw)  # type: ignore[arg-type]

    def pids(self) -> list[int]:
        return [int(x) for x in self.record.read_text().split()]


def alive(pid: int) -> bool:
    return mps._pid_alive(pid)


def wait_dead(pid: int, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fake(tmp_path: Path):
    f = Fake(tmp_path)
    yield f
    for pid in f.pids():  # never leak a fake server, whatever the test did
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_start_stop_lifecycle(fake: Fake) -> None:
    d = mps.start_private_daemon(fake.config())
    assert d.owned and not d.stopped
    for path in (d.pipe_dir, d.log_dir):
        assert os.path.isdir(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert os.path.exists(os.path.join(d.pipe_dir, "control"))
    assert "Starting control daemon" in Path(d.log_dir, "control.log").read_text()
    [pid] = fake.pids()
    assert d.pid == pid and alive(pid)
    assert d in mps._live

    d.stop()
    assert d.stopped
    assert not alive(pid)
    assert not os.path.exists(d.pipe_dir) and not os.path.exists(d.log_dir)
    assert d not in mps._live
    d.stop()  # idempotent: no error, nothing started again
    assert fake.pids() == [pid]


def test_client_env(fake: Fake) -> None:
    with mps.start_private_daemon(fake.config()) as d:
        env = d.client_env(30)
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": d.pipe_dir,
                       "CUDA_MPS_LOG_DIRECTORY": d.log_dir,
                       "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
        assert d.client_env(1)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1"
        assert d.client_env(100)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
        for bad in (0, 101, -5):
            with pytest.raises(ValueError, match="1..100"):
                d.client_env(bad)
        for bad_type in (50.0, "50", True):
            with pytest.raises(TypeError):
                d.client_env(bad_type)  # type: ignore[arg-type]
    with pytest.raises(MPSError, match="stopped"):
        d.client_env(50)


def test_find_running_daemon(fake: Fake, tmp_path: Path) -> None:
    cfg = fake.config()
    empty = tmp_path / "empty-pipe"
    empty.mkdir()
    assert mps.find_running_daemon({"CUDA_MPS_PIPE_DIRECTORY": str(empty)}, cfg) is None
    # A stale control file without a live server does not count either.
    (empty / "control").write_text("")
    assert mps.find_running_daemon({"CUDA_MPS_PIPE_DIRECTORY": str(empty)}, cfg) is None

    with mps.start_private_daemon(cfg) as d:
        found = mps.find_running_daemon(
            {"CUDA_MPS_PIPE_DIRECTORY": d.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": d.log_dir}, cfg)
        assert found is not None
        assert (found.pipe_dir, found.log_dir, found.owned) == (d.pipe_dir, d.log_dir, False)
        assert found.pid == d.pid
        assert found not in mps._live

        found.stop()  # not ours: must not touch the daemon
        assert alive(d.pid)  # type: ignore[arg-type]
        assert os.path.isdir(d.pipe_dir)
        assert mps.find_running_daemon({"CUDA_MPS_PIPE_DIRECTORY": d.pipe_dir}, cfg) is not None
        assert found.client_env(40)["CUDA_MPS_PIPE_DIRECTORY"] == d.pipe_dir
    assert mps.find_running_daemon({"CUDA_MPS_PIPE_DIRECTORY": d.pipe_dir}, cfg) is None


def test_missing_binary(tmp_path: Path) -> None:
    cfg = MPSConfig(control_binary=str(tmp_path / "nope"))
    with pytest.raises(MPSError, match="not found"):
        mps.start_private_daemon(cfg)
    assert mps.find_running_daemon({}, cfg) is None


def test_start_never_ready_raises_with_log_tail(tmp_path: Path) -> None:
    fake = Fake(tmp_path, mode="never_ready")
    pipe, log = tmp_path / "pipe", tmp_path / "log"
    pipe.mkdir()
    log.mkdir()
    t0 = time.monotonic()
    with pytest.raises(MPSError) as err:
        mps.start_private_daemon(fake.config(start_timeout_s=0.6, pipe_dir=str(pipe),
                                             log_dir=str(log)))
    elapsed = time.monotonic() - t0
    assert 0.6 <= elapsed < 4.0
    msg = str(err.value)
    assert "did not answer" in msg
    assert "no CUDA-capable device is detected" in msg  # the log tail
    [pid] = fake.pids()
    assert wait_dead(pid, 0.5)  # the half-started server was not leaked
    assert pipe.is_dir() and log.is_dir()  # caller's directories are not removed


def test_start_refused_by_binary(fake: Fake) -> None:
    with mps.start_private_daemon(fake.config()) as d:
        # A second daemon on the same pipe dir is refused by the binary (like the real one).
        with pytest.raises(MPSError, match="already running"):
            mps.start_private_daemon(fake.config(pipe_dir=d.pipe_dir, log_dir=d.log_dir))
        assert alive(d.pid)  # type: ignore[arg-type]
        # ... and the failed attempt must not have quit the daemon that was already there
        # (it does read the existing pid file; killing it would be wrong).
    assert not alive(d.pid)  # type: ignore[arg-type]


def test_context_manager_stops_on_exception(fake: Fake) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with mps.start_private_daemon(fake.config()) as d:
            pid = d.pid
            assert pid is not None and alive(pid)
            raise RuntimeError("boom")
    assert d.stopped
    assert not alive(pid)
    assert not os.path.exists(d.pipe_dir)


def test_stop_kills_daemon_that_ignores_quit(tmp_path: Path) -> None:
    fake = Fake(tmp_path, mode="ignore_quit")
    d = mps.start_private_daemon(fake.config(stop_timeout_s=0.3))
    pid = d.pid
    assert pid is not None and alive(pid)
    d.stop()
    assert not alive(pid)
    assert not os.path.exists(d.pipe_dir)


CHILD = textwrap.dedent('''
    import signal, sys, time
    from duetjax.duet import mps
    if sys.argv[2] == "handler":
        def previous(signum, frame):
            print("previous handler ran", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, previous)
    d = mps.start_private_daemon(mps.MPSConfig(control_binary=sys.argv[1], start_timeout_s=5))
    print(d.pid, d.pipe_dir, flush=True)
    time.sleep(30)
''')


@pytest.mark.parametrize("previous", ["default", "handler"])
def test_sigterm_stops_daemon(fake: Fake, previous: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(fake.binary), previous],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line, child.stderr.read() if child.stderr else ""
        pid, pipe_dir = int(line[0]), line[1]
        assert fake.pids() == [pid]
        assert alive(pid) and os.path.isdir(pipe_dir)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
    if previous == "default":
        assert child.returncode == -signal.SIGTERM  # still dies by the signal, as before
    else:
        assert child.returncode == 7 and "previous handler ran" in out
    assert not alive(pid)
    assert not os.path.exists(pipe_dir)


def test_atexit_stops_daemon(fake: Fake) -> None:
    code = ("import sys; from duetjax.duet import mps; "
            "d = mps.start_private_daemon(mps.MPSConfig(control_binary=sys.argv[1])); "
            "print(d.pid, d.pipe_dir, flush=True)")
    r = subprocess.run([sys.executable, "-c", code, str(fake.binary)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=10, check=True)
    pid_s, pipe_dir = r.stdout.split()
    assert fake.pids() == [int(pid_s)]
    assert wait_dead(int(pid_s), 1.0)
    assert not os.path.exists(pipe_dir)


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_mps_status(fake: Fake, tmp_path: Path) -> None:
    no_gpu = _script(tmp_path / "smi-none", 'echo "No devices were found" >&2; exit 6\n')
    gpu = _script(tmp_path / "smi-gpu", 'echo "GPU 0: NVIDIA H200 (UUID: GPU-x)"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(empty)}

    s = mps.mps_status(MPSConfig(control_binary=str(tmp_path / "nope")), env)
    assert s.startswith("MPS unavailable") and "not found" in s
    s = mps.mps_status(fake.config(nvidia_smi=no_gpu), env)
    assert s.startswith("MPS unavailable") and "no GPU visible" in s
    s = mps.mps_status(fake.config(nvidia_smi=gpu), env)
    assert s.startswith("MPS available") and "1 GPU" in s and "no daemon running" in s
    s = mps.mps_status(fake.config(nvidia_smi=gpu), env, try_start=True)
    assert s.startswith("MPS available") and "answered" in s
    assert all(not alive(p) for p in fake.pids()) and len(fake.pids()) == 1

    refusing = Fake(tmp_path, mode="never_ready")
    s = mps.mps_status(refusing.config(nvidia_smi=gpu, start_timeout_s=0.3), env,
                       try_start=True)
    assert s.startswith("MPS unavailable: daemon refused"), s

    with mps.start_private_daemon(fake.config()) as d:
        s = mps.mps_status(fake.config(nvidia_smi=gpu), {"CUDA_MPS_PIPE_DIRECTORY": d.pipe_dir})
        assert "daemon running at " + d.pipe_dir in s

    # Never raises, even on nonsense input.
    s = mps.mps_status(fake.config(nvidia_smi=gpu), env=42)  # type: ignore[arg-type]
    assert s.startswith("MPS status unknown")


def test_caller_dirs_kept_and_quit_is_used(fake: Fake, tmp_path: Path) -> None:
    pipe, log = tmp_path / "my-pipe", tmp_path / "my-log"
    pipe.mkdir()
    log.mkdir()
    d = mps.start_private_daemon(fake.config(pipe_dir=str(pipe), log_dir=str(log),
                                             stop_timeout_s=3.0))
    assert (d.pipe_dir, d.log_dir) == (str(pipe), str(log))
    pid = d.pid
    assert pid is not None and alive(pid)
    t0 = time.monotonic()
    d.stop()
    assert time.monotonic() - t0 < 1.5  # exited on ``quit``, not killed after the timeout
    assert not alive(pid)
    assert "quit received" in (log / "control.log").read_text()
    assert pipe.is_dir() and log.is_dir()  # not ours to remove
    assert not (pipe / "control").exists()


def test_stop_after_exit_waits_for_the_client_process(fake: Fake) -> None:
    """The duet engine is an MPS client itself: its daemon goes only after it exits."""
    d = mps.start_private_daemon(fake.config())
    [pid] = fake.pids()
    client = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)
    d.stop_after_exit(client.pid)
    assert not d.owned and d not in mps._live
    assert d.client_env(30)["CUDA_MPS_PIPE_DIRECTORY"] == d.pipe_dir  # still usable
    d.stop()  # no longer ours to stop: a no-op
    time.sleep(0.5)
    assert alive(pid) and os.path.exists(d.pipe_dir)  # the client still runs
    client.communicate(b"")
    assert wait_dead(pid, 5.0)
    end = time.monotonic() + 5.0
    while os.path.exists(d.pipe_dir) and time.monotonic() < end:
        time.sleep(0.05)
    assert not os.path.exists(d.pipe_dir) and not os.path.exists(d.log_dir)
