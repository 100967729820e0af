"""The tiny chat model (a byte-level tokenizer and a chat template), shared by the server and
data-parallel tests."""
import pytest

from duetjax import Engine

from .server.helpers import write_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_chat_engine(tiny_chat_dir):
    """An in-process Engine with the test server's limits (so the compiled executables come
    from the compilation cache)."""
    return Engine(tiny_chat_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                  kv_cache_tokens=4096, show_progress=False)
