"""Hugging Face model directories: config.json plus single or sharded safetensors.

Only safetensors are read (never pickle-based ``.bin`` files); tensors are memory-mapped and
read one at a time.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
ML_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
"""safetensors dtypes that its numpy reader cannot return (numpy has no float8): read through
the file's header instead."""


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict, with a clear error when it is missing or malformed."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}: a Hugging Face model directory "
                              "needs config.json next to its *.safetensors files")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when the directory has none): the model's
    end-of-sequence ids and the sampling settings its authors recommend."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds {type(config).__name__}, not a JSON object")
    return config


class SafetensorsSource:
    """A ``TensorSource`` over model.safetensors or the shards named by the index file."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            for name, file in weight_map.items():
                self._file_of[name] = self.model_dir / file
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                extra = ""
                if any(self.model_dir.glob("*.bin")) or any(self.model_dir.glob("*.pt")):
                    extra = (" (pickle-based .bin/.pt checkpoints are refused for safety; convert "
                             "them to safetensors)")
                raise CheckpointError(f"no *.safetensors weights in {self.model_dir}{extra}")
            for file in files:
                for name in self._open(file).keys():
                    self._file_of[name] = file
        for file in set(self._file_of.values()):
            if not file.is_file():
                raise CheckpointError(f"{file.name} is named in {INDEX_FILE} but missing from "
                                      f"{self.model_dir}")
            self._open(file)

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file} is truncated or not a safetensors file ({err}); "
                                      "re-download or re-save it") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        file = self._file_of[name]
        try:
            if self._open(file).get_slice(name).get_dtype() in ML_DTYPES:
                return self._read_raw(file, name)
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {file} ({err}); the file "
                                  "looks truncated: re-download or re-save it") from None

    @staticmethod
    def _read_raw(file: Path, name: str) -> np.ndarray:
        """One tensor of an ``ML_DTYPES`` dtype, read by the file's header (an 8-byte length,
        that many bytes of JSON, then the data at each tensor's offsets)."""
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(length))[name]
            start, end = entry["data_offsets"]
            f.seek(8 + length + start)
            data = f.read(end - start)
        dtype = np.dtype(ML_DTYPES[entry["dtype"]])
        return np.frombuffer(data, dtype).reshape(entry["shape"]).copy()
