"""Two serving processes on loopback as hosts 0 and 1 of a cluster, one replica each: one
engine's outputs from both, a wrong cluster key refused by name, a lost host failing only its
requests, and host 0's SIGTERM stopping everything."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from duetjax import SamplingParams
from duetjax.serve import main

from .conftest import TINY_SERVER_ARGS
from .helpers import REPO_ROOT, ServerProcess

KEY = {"DUETJAX_CLUSTER_KEY": "test-cluster-secret"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_args(port: int, rank: int) -> list[str]:
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-hosts", "2",
            "--host-rank", str(rank)]


class Host:
    """``python -m duetjax.serve`` as host R > 0: no HTTP, its output collected."""

    def __init__(self, model_dir, port: int, rank: int, env: dict[str, str]):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "duetjax.serve", "--model", str(model_dir),
             *TINY_SERVER_ARGS, *cluster_args(port, rank)], cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env})
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout),
                                        daemon=True)
        self._reader.start()

    def output(self) -> str:
        self._reader.join(30)
        return "".join(self.lines)


def replica_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"replica \d ready \(pid (\d+)", output)]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_hosts_serve_one_engines_outputs_and_survive_the_loss_of_host_1(tiny_chat_dir,
                                                                            tiny_chat_engine):
    port = free_port()
    host1 = Host(tiny_chat_dir, port, 1, KEY)
    server = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS,
                           *cluster_args(port, 0), env=KEY)
    try:
        assert "host 1 connected" in server.output
        assert server.metric("duetjax_replica_up") == 2
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        prompts = [f"Tell me about the number {i}." for i in range(6)]
        expected = tiny_chat_engine.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
            use_tqdm=False)

        def complete(prompt: str, max_tokens: int = 8) -> str:
            return client.completions.create(model="tiny-chat", prompt=prompt,
                                             max_tokens=max_tokens, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(complete, prompts)) == [o.outputs[0].text for o in expected]

        # Host 1's replica is paused, so its request is surely in flight when host 1 dies.
        [paused] = replica_pids("".join(host1.lines))
        os.kill(paused, signal.SIGSTOP)
        with ThreadPoolExecutor(2) as pool:
            long = [pool.submit(complete, f"Story {i}:", 200) for i in range(2)]
            # The router balances the two: one waits on the paused replica (the other may
            # already be done on host 0 when the machine is slow to send the second).
            assert server.wait_until(lambda: server.metric(
                "duetjax_replica_num_requests_in_flight", replica="1") == 1)
            host1.process.kill()
            os.kill(paused, signal.SIGCONT)  # (it then sees host 1's end of its socket close)
            errors = [f.exception(timeout=120) for f in long]
        assert [e is None for e in errors].count(True) == 1, errors  # host 0's finished
        lost = next(e for e in errors if e is not None)
        assert isinstance(lost, openai.APIStatusError) and lost.status_code >= 500
        assert "lost with host 1" in server.output
        assert complete("Still there?") == complete("Still there?")  # host 0 serves on
        assert server.metric("duetjax_replica_up") == 1
    finally:
        host1.process.kill()
        pids = replica_pids(server.output) + replica_pids(host1.output())
        assert server.terminate() == 0, server.output[-3000:]
    assert len(pids) == 2
    deadline = time.monotonic() + 10  # (host 1's orphaned replica sees its socket close)
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in pids)


def test_a_hung_replica_of_host_1_is_killed_by_its_host(tiny_chat_dir):
    port = free_port()
    host1 = Host(tiny_chat_dir, port, 1, KEY)
    server = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS,
                           *cluster_args(port, 0), "--replica-timeout-s", "2", env=KEY)
    try:
        assert "host 1 connected" in server.output
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        [hung] = replica_pids("".join(host1.lines))
        os.kill(hung, signal.SIGSTOP)  # (as a step that never returns)

        def complete(prompt: str) -> str:
            return client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=8,
                                             temperature=0).choices[0].text
        with ThreadPoolExecutor(2) as pool:  # (the router balances two at once)
            errors = [f.exception(timeout=120) for f in
                      [pool.submit(complete, f"Story {i}:") for i in range(2)]]
        assert [e is None for e in errors].count(True) == 1, errors  # host 0's finished
        lost = next(e for e in errors if e is not None)
        assert isinstance(lost, openai.APIStatusError) and lost.status_code >= 500
        assert "(hung): killed" in server.output
        deadline = time.monotonic() + 30  # (host 1 killed it, then had nothing left to relay)
        while not (gone(hung) and host1.process.poll() is not None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(hung) and host1.process.returncode == 0, host1.output()[-3000:]
        assert server.metric("duetjax_replica_up") == 1
        assert complete("Still there?") == complete("Still there?")  # host 0 serves on
    finally:
        host1.process.kill()
        assert server.terminate() == 0, server.output[-3000:]


def test_sigterm_on_host_0_stops_every_host_and_a_wrong_key_is_refused(tiny_chat_dir):
    port = free_port()
    host1 = Host(tiny_chat_dir, port, 1, KEY)
    server = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS,
                           *cluster_args(port, 0), env=KEY)
    assert server.terminate() == 0, server.output[-3000:]
    assert host1.process.wait(60) == 0, host1.output()[-3000:]
    pids = replica_pids(server.output) + replica_pids(host1.output())
    assert len(pids) == 2 and all(gone(pid) for pid in pids)

    port = free_port()
    impostor = Host(tiny_chat_dir, port, 1, {"DUETJAX_CLUSTER_KEY": "another-secret"})
    front = subprocess.Popen(
        [sys.executable, "-m", "duetjax.serve", "--model", str(tiny_chat_dir), "--port", "0",
         *TINY_SERVER_ARGS, *cluster_args(port, 0)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, **KEY})
    try:
        assert impostor.process.wait(120) == 2
        assert "refused this host: its DUETJAX_CLUSTER_KEY differs" in impostor.output()
    finally:
        front.kill()
        front.communicate()


@pytest.mark.parametrize("flags, env, message", [
    (["--num-hosts", "2", "--coordinator-address", "127.0.0.1:1"], {},
     "environment variable DUETJAX_CLUSTER_KEY"),
    (["--num-hosts", "2", "--host-rank", "2", "--coordinator-address", "127.0.0.1:1"], KEY,
     "--host-rank must be in [0, 2)"),
    (["--num-hosts", "2"], KEY, "--num-hosts 2 needs --coordinator-address"),
    (["--coordinator-address", "127.0.0.1:1"], KEY, "--coordinator-address needs --num-hosts"),
    (["--num-hosts", "0"], KEY, "--num-hosts must be >= 1"),
])
def test_bad_cluster_flags_are_named(flags, env, message, monkeypatch, capsys, tiny_llama_dir):
    monkeypatch.delenv("DUETJAX_CLUSTER_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--model", str(tiny_llama_dir), *flags]) == 2
    assert message in capsys.readouterr().err

