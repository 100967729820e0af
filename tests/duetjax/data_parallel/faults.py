"""Faults a replica process installs on its own Engine (``DataParallelEngine(replica_init=...)``
runs ``install`` there): a test cannot monkeypatch an engine in another process."""
from __future__ import annotations

import time

from tests.duetjax.test_engine import RaisingDetokenizer

FAILS_ALONE = "boom"
"""Requests whose prompt text holds this fail alone (their detokenizer raises)."""
BREAKS_THE_DEVICE = "device failure"
"""A step with a request whose prompt text holds this raises, as a lost device would."""
HANGS = "hang forever"
"""A step with a request whose prompt text holds this never returns, as a hung device's."""
SLOW = "take your time"
"""Steps with a request whose prompt text holds this take 20 ms longer."""


def install(engine) -> None:
    add_request, step = engine.add_request, engine.step

    def add_and_break(prompt, params=None, request_id=None):
        request_id = add_request(prompt, params, request_id)
        if FAILS_ALONE in (prompt.get("prompt") or ""):
            engine.output_processor.requests[request_id].detokenizer = RaisingDetokenizer()
        return request_id

    def step_or_fail():
        prompts = [r.prompt or "" for r in engine.output_processor.requests.values()]
        if any(BREAKS_THE_DEVICE in p for p in prompts):
            raise RuntimeError("the device fell off the bus")
        if any(HANGS in p for p in prompts):
            time.sleep(3600)
        if any(SLOW in p for p in prompts):
            time.sleep(0.02)
        return step()

    engine.add_request, engine.step = add_and_break, step_or_fail
