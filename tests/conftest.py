import pytest

from tests.helpers import TINY_LLAMA, write_random_checkpoint


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
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("tensor-parallel") / "results.json"
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    result = subprocess.run([sys.executable, "-m", "tests.duetjax.tensor_parallel_run", str(out)],
                            cwd=Path(__file__).parents[1], env={**os.environ, "XLA_FLAGS": flags},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())
