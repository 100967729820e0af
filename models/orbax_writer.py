"""Writes duetjax's own Orbax checkpoint: the parameter tree as the model holds it, with the
Hugging Face config.json and the tokenizer files beside it (see ``orbax_loader``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax

from .errors import CheckpointError
from .hf_loader import GENERATION_CONFIG_FILE
from .loader import LoadedModel, load_model
from .orbax_loader import KV_SCALES_FILE, PARAMS_DIR
from .orbax_tree import save_tree

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model")
"""Files of a Hugging Face directory that the tokenizer is read from, copied as they are."""
TOKENIZER_DIRS = ("additional_chat_templates",)


def write_orbax(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Writes ``loaded`` (from any source) as duetjax's own Orbax checkpoint in ``out_dir``
    (absent or empty), in the dtype it was loaded in."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} already exists and is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stacked layer weights one chunk per layer: a tensor-parallel load reads a layer at a time
    stacked = {key: jax.tree_util.tree_map(lambda _, k=key: k == "layers", value)
               for key, value in loaded.params.items()}
    save_tree(out_dir / PARAMS_DIR, loaded.params, stacked)
    (out_dir / "config.json").write_text(json.dumps(loaded.hf_config, indent=2) + "\n")
    if loaded.kv_scales is not None:
        k, v = zip(*loaded.kv_scales)
        (out_dir / KV_SCALES_FILE).write_text(json.dumps({"k_scale": k, "v_scale": v}) + "\n")
    if loaded.path.is_file():  # a GGUF: its tokenizer is rebuilt from the metadata
        from .gguf_loader import GGUFSource

        GGUFSource(loaded.path).save_tokenizer(out_dir)
    else:
        for name in TOKENIZER_FILES:
            if (loaded.path / name).is_file():
                shutil.copy2(loaded.path / name, out_dir / name)
        for name in TOKENIZER_DIRS:
            if (loaded.path / name).is_dir():
                shutil.copytree(loaded.path / name, out_dir / name)
    if loaded.generation_config:
        (out_dir / GENERATION_CONFIG_FILE).write_text(
            json.dumps(loaded.generation_config, indent=2) + "\n")
    return out_dir


def convert_to_orbax(model: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                     load_format: str = "auto") -> Path:
    """Loads ``model`` (anything ``load_model`` reads) and writes it to ``out_dir`` as duetjax's
    own Orbax checkpoint, its weights stored as ``dtype``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):  # fail before the load
        raise CheckpointError(f"{out_dir} already exists and is not empty; choose a new directory")
    return write_orbax(load_model(model, dtype=dtype, load_format=load_format), out_dir)
