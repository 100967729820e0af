import pytest

from tests.helpers import TINY_LLAMA, run_on_host_devices, write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama checkpoint (no tokenizer): feed it token ids."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-llama"), TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_hf_dir(tmp_path_factory):
    """The same tiny Llama with q/k/v and gate/up in HF's own tensors, which transformers
    loads (the reference oracle runs on it)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-llama-hf"), TINY_LLAMA, fused=False)


@pytest.fixture(scope="session")
def tensor_parallel_results(tmp_path_factory):
    """What ``tests/duetjax/tensor_parallel_run.py`` reports, run once per session in a process
    with 8 host devices (this one keeps its single device)."""
    out = tmp_path_factory.mktemp("tensor-parallel") / "results.json"
    return run_on_host_devices("tests.duetjax.tensor_parallel_run", out)
