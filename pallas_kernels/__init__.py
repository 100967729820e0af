"""Pallas kernels for paged attention; imports nothing of duetjax's."""
from .kv_layout import kv_bytes_per_token, kv_pool_shape
from .ops import paged_attention, write_kv

__all__ = ["kv_pool_shape", "kv_bytes_per_token", "paged_attention", "write_kv"]
