"""Runs the Hugging Face reference oracle (tools/hf_oracle.py) from the test suite.

torch cannot live in duetjax's Python 3.12 environment (its 3.12 wheel is the multi-GB CUDA
build), so the oracle runs in its own Python 3.11 venv through a subprocess, once per test
session, and hands back directories of tiny saved models plus their expected outputs.

The case list is read from tools/hf_oracle.py itself (it imports torch lazily), so tests can
be parametrized at collection time without starting the oracle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ORACLE_SCRIPT = REPO / "tools" / "hf_oracle.py"
DEFAULT_ORACLE_PYTHON = REPO / ".venv-oracle" / "bin" / "python"
SETUP_HINT = ("python3.11 -m venv .venv-oracle && .venv-oracle/bin/pip install torch==2.13.0 "
              "transformers==5.17.0 safetensors numpy   (or: make .venv-oracle/.installed)")


class OracleUnavailable(RuntimeError):
    """The oracle interpreter is missing or the oracle run failed."""


@lru_cache(maxsize=1)
def oracle_module() -> ModuleType:
    """tools/hf_oracle.py imported without torch (for CASES, PROMPT_LENGTHS, NEW_TOKENS)."""
    spec = importlib.util.spec_from_file_location("hf_oracle", ORACLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hf_oracle", module)  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def case_names() -> list[str]:
    """Every oracle case, in the oracle's order (the parity tests' ids)."""
    return [case.name for case in oracle_module().CASES]


def oracle_python() -> Path:
    """``$DUETJAX_ORACLE_PYTHON``, else ``<repo>/.venv-oracle/bin/python``."""
    return Path(os.environ.get("DUETJAX_ORACLE_PYTHON", DEFAULT_ORACLE_PYTHON))


def _run_oracle_script(arguments: list[str], timeout: float) -> None:
    """Runs tools/hf_oracle.py with the oracle interpreter; OracleUnavailable (with the setup
    command) when the interpreter is missing, and with the oracle's stderr when it fails."""
    python = oracle_python()
    if not python.exists():
        raise OracleUnavailable(
            f"the reference oracle interpreter {python} does not exist; create it from the repo "
            f"root with:\n  {SETUP_HINT}\nor point DUETJAX_ORACLE_PYTHON at a Python 3.11 with "
            "torch (CPU) and transformers 5.x")
    command = [str(python), str(ORACLE_SCRIPT), *arguments]
    # The oracle imports neither duetjax nor jax; keep JAX/XLA flags from leaking into torch.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise OracleUnavailable(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                                f"{result.stderr[-4000:]}")


def run_oracle(out_dir: Path, families: str = "", timeout: float = 600) -> dict[str, Path]:
    """Runs the oracle into ``out_dir``; returns {case name: case directory}.

    Raises OracleUnavailable (with the setup command) when the interpreter is missing, and
    with the oracle's stderr when it fails.
    """
    _run_oracle_script(["--out", str(out_dir)] + (["--families", families] if families else []),
                       timeout)
    return _read_cases(out_dir)


def run_generate(model_dir: Path, requests: list[tuple[list[int], dict]], out_dir: Path,
                 timeout: float = 300) -> list[dict]:
    """transformers' greedy ``generate`` of each (prompt, generate() kwargs) on a saved model
    (``hf_oracle.py --generate``): one {"tokens", "min_gap"} per request. Raises
    OracleUnavailable as ``run_oracle`` does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "spec.json"
    spec.write_text(json.dumps({"model": str(model_dir), "requests": [
        {"prompt": list(prompt), "kwargs": kwargs} for prompt, kwargs in requests]}))
    _run_oracle_script(["--generate", str(spec), "--out", str(out_dir)], timeout)
    return json.loads((out_dir / "generated.json").read_text())


def run_prompt_logprobs(model_dir: Path, prompts: list[list[int]], out_dir: Path,
                        timeout: float = 300) -> list[np.ndarray]:
    """transformers' log-softmax at every position of each prompt on a saved model
    (``hf_oracle.py --logprobs``): float32 ``[len(prompt), vocab]`` per prompt. Raises
    OracleUnavailable as ``run_oracle`` does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "spec.json"
    spec.write_text(json.dumps({"model": str(model_dir), "prompts": [list(p) for p in prompts]}))
    _run_oracle_script(["--logprobs", str(spec), "--out", str(out_dir)], timeout)
    with np.load(out_dir / "logprobs.npz") as data:
        return [data[f"logprobs_{i}"] for i in range(len(prompts))]


def _read_cases(out_dir: Path) -> dict[str, Path]:
    names = json.loads((out_dir / "cases.json").read_text())
    return {name: out_dir / name for name in names}


def cached_oracle(session_tmp: Path) -> dict[str, Path]:
    """The oracle's output for this session.

    ``DUETJAX_ORACLE_DIR=DIR``: use a finished oracle run as it is (``hf_oracle.py --out DIR``
    made elsewhere), for machines without the oracle venv, such as a GPU machine.
    ``DUETJAX_ORACLE_CACHE=DIR``: keep the output under DIR, keyed by a hash of the oracle
    script and interpreter, and reuse it in later sessions (fast edit-test loops).
    Otherwise the oracle runs into ``session_tmp`` and its output lasts one session.
    """
    given = os.environ.get("DUETJAX_ORACLE_DIR")
    if given:
        if not (Path(given) / "cases.json").is_file():
            raise OracleUnavailable(f"DUETJAX_ORACLE_DIR={given} holds no cases.json: run "
                                    f"tools/hf_oracle.py --out {given} first")
        return _read_cases(Path(given))
    cache_root = os.environ.get("DUETJAX_ORACLE_CACHE")
    if not cache_root:
        return run_oracle(session_tmp)
    key = hashlib.sha256(ORACLE_SCRIPT.read_bytes() + str(oracle_python()).encode()).hexdigest()[:16]
    out_dir = Path(cache_root) / key
    if (out_dir / "cases.json").is_file():
        return _read_cases(out_dir)
    partial = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    cases = run_oracle(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)  # publish only complete runs
    return {name: out_dir / path.name for name, path in cases.items()}


@dataclasses.dataclass(frozen=True)
class Expected:
    """The reference outputs of one case (see tools/hf_oracle.py for the file layout)."""

    name: str
    path: Path
    meta: dict
    prompts: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[list[int]]
    gaps: list[np.ndarray]

    @classmethod
    def load(cls, case_dir: Path) -> "Expected":
        meta = json.loads((case_dir / "case.json").read_text())
        with np.load(case_dir / "expected.npz") as data:
            n = meta["num_prompts"]
            return cls(
                name=meta["name"], path=case_dir, meta=meta,
                prompts=[data[f"prompt_{i}"].tolist() for i in range(n)],
                logits=[data[f"logits_{i}"] for i in range(n)],
                greedy=[data[f"greedy_{i}"].tolist() for i in range(n)],
                gaps=[data[f"gap_{i}"] for i in range(n)])
