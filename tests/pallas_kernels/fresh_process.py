"""Mosaic GPU interpret-mode tests, each in a fresh Python process.

Interpret mode runs each warpgroup of a kernel as a host thread that blocks on simulated
barriers. In a process that has run other kernels before, or on a loaded machine with few
cores, it has been seen to stall; a case alone in a fresh process takes seconds. So each such
test runs in its own process, and one that gives no result within ``STALL_SECONDS`` is tried
once more. A wrong result fails at once: only a stall is retried.
"""
from __future__ import annotations

import functools
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

STALL_SECONDS = 150
ROOT = Path(__file__).resolve().parents[2]


def in_fresh_process(test: Callable[..., None]) -> Callable[..., None]:
    """The test, run by a child Python process with its (JSON-able) parameters."""

    # (by its path: pytest may have imported the file under a shorter name)
    module = ".".join(Path(inspect.getfile(test)).resolve().relative_to(ROOT).with_suffix("").parts)

    @functools.wraps(test)
    def run(**params) -> None:
        code = (f"import json, sys; from {module} import {test.__name__} as test; "
                f"test.__wrapped__(**json.loads(sys.argv[1]))")
        for _ in range(2):
            try:
                done = subprocess.run([sys.executable, "-c", code, json.dumps(params)], cwd=ROOT,
                                      capture_output=True, text=True, timeout=STALL_SECONDS)
            except subprocess.TimeoutExpired:
                continue
            assert done.returncode == 0, (done.stdout[-4000:] + done.stderr[-4000:])
            return
        pytest.fail(f"interpret mode stalled twice ({STALL_SECONDS} s each)")

    return run
