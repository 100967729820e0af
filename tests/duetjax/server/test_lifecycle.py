"""SIGTERM drains: no new requests, in-flight ones (queued ones included) finish, exit 0; a
second Ctrl-C cuts the drain short, quietly."""
from __future__ import annotations

import json
import signal
import threading

import httpx

from .conftest import TINY_SERVER_ARGS
from .helpers import ServerProcess


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_chat_dir):
    # The shared server's flags, so its compiled executables come from the compilation cache.
    server = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS)
    body = {"prompt": "drain", "max_tokens": 200, "ignore_eos": True, "stream": True}
    results: list[tuple[int, str | None, str]] = []

    def stream() -> None:
        finish, text = None, ""
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    choice = json.loads(line[5:])["choices"][0]
                    finish, text = choice["finish_reason"] or finish, text + choice["text"]
        results.append((r.status_code, finish, text))

    threads = [threading.Thread(target=stream) for _ in range(12)]  # 8 run, 4 wait
    for t in threads:
        t.start()
    # All 12 admitted (8 run, the rest queue) before SIGTERM. Counted as in flight plus
    # finished: the tiny model can finish a request before the last ones connect.
    assert server.wait_until(lambda: _admitted(server) == 12)
    server.process.terminate()  # SIGTERM with requests running (and, mostly, queued)
    assert server.wait_until(lambda: _refused(server.url), timeout=10), "still accepting requests"
    for t in threads:
        t.join(120)
    assert server.process.wait(60) == 0, server.output[-3000:]
    assert [(status, finish) for status, finish, _ in results] == [(200, "length")] * 12
    assert "Shutting down" in server.output


def test_a_second_ctrl_c_aborts_the_drain_and_exits_without_a_traceback(tiny_chat_dir):
    server = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS, "--drain-timeout", "120")
    body = {"prompt": "drain", "max_tokens": 240, "ignore_eos": True, "stream": True}
    finishes: list[str | None] = []
    streaming = threading.Event()

    def stream() -> None:
        finish = None
        try:
            with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    streaming.set()
                    if line.startswith("data:") and line != "data: [DONE]":
                        chunk = json.loads(line[5:])  # an aborted request ends with an error
                        finish = "error" if "error" in chunk else (
                            chunk["choices"][0]["finish_reason"] or finish)
        except httpx.HTTPError:
            pass  # the connection may close mid-stream
        finishes.append(finish)

    threads = [threading.Thread(target=stream) for _ in range(12)]
    for t in threads:
        t.start()
    assert streaming.wait(60)
    server.process.send_signal(signal.SIGINT)
    assert server.wait_until(lambda: _refused(server.url), timeout=10), "still accepting requests"
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(60) == 130
    for t in threads:
        t.join(60)
    assert len(finishes) == 12 and finishes.count("length") < 12, finishes  # some were cut short
    output = server.output_to_the_end()
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-3000:]


def _admitted(server: ServerProcess) -> float:
    """Requests in flight (running or queued) plus those finished, from one /metrics read."""
    admitted = 0.0
    for key, value in server.metrics().items():
        name = key.partition("{")[0]
        if name in ("duetjax_num_requests_in_flight", "duetjax_request_success_total"):
            admitted += value
    return admitted


def _refused(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 503
    except httpx.TransportError:
        return True
