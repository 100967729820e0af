"""The paged KV pool: one buffer for every layer, K and V side by side.

Layout: ``[num_layers, num_pages, num_kv_heads, 2, page_size, head_dim]``.

Why this order:
- One buffer for all layers and both K and V, so the engine donates one array per step and
  shares one CUDA IPC handle with every worker process.
- ``num_layers`` first: a kernel receives the whole pool plus a (traced) layer index, so the
  layer loop (``lax.scan``) never slices the pool (a slice of a carried buffer is a copy).
- Within a page, one KV head's K tile and V tile are adjacent: ``[2, page_size, head_dim]``
  is one contiguous run of ``2 * page_size * head_dim`` elements (8 KiB for page 16, d 128,
  bf16), so a decode program streams K and V of its head with long contiguous reads.
- A slot is ``page * page_size + offset``; slot ``-1`` marks a padding token (never written).
"""
from __future__ import annotations

LAYER_AXIS, PAGE_AXIS, HEAD_AXIS, KV_AXIS, TOKEN_AXIS, DIM_AXIS = range(6)


def kv_pool_shape(num_layers: int, num_pages: int, num_kv_heads: int, page_size: int,
                  head_dim: int) -> tuple[int, int, int, int, int, int]:
    """Shape of the pool for the given model geometry and page count."""
    for name, value in (("num_layers", num_layers), ("num_pages", num_pages),
                        ("num_kv_heads", num_kv_heads), ("page_size", page_size),
                        ("head_dim", head_dim)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return (num_layers, num_pages, num_kv_heads, 2, page_size, head_dim)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of KV one token occupies across all layers (K and V)."""
    return num_layers * num_kv_heads * 2 * head_dim * itemsize
