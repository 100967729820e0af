"""Flax decoder models (Llama, Mistral, Qwen2/3, Gemma 1/2/3) and checkpoint loading."""
from .config import ARCHITECTURES, ModelConfig, RopeConfig
from .default_model import default_model_dir
from .errors import CheckpointError
from .gguf_loader import GGUFSource, convert_gguf_to_hf
from .loader import LoadedModel, load_model
from .logits import compute_logits
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["ARCHITECTURES", "CheckpointError", "GGUFSource", "IncrementalDetokenizer",
           "LoadedModel", "ModelConfig", "RopeConfig", "Tokenizer", "compute_logits",
           "convert_gguf_to_hf", "default_model_dir", "load_model"]
