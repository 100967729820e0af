"""Flax decoder models (Llama, Mistral, Qwen2/3, Gemma 1/2/3) and checkpoint loading."""
from .config import ARCHITECTURES, ModelConfig, RopeConfig
from .errors import CheckpointError
from .loader import LoadedModel, load_model
from .logits import compute_logits

__all__ = ["ARCHITECTURES", "CheckpointError", "LoadedModel", "ModelConfig", "RopeConfig",
           "compute_logits", "load_model"]
