"""Paged KV allocation: which pool pages each request owns (plain Python)."""
from __future__ import annotations

from collections import deque

from .request import Request


class BlockManager:
    """Hands out pages of ``page_size`` tokens from a pool of ``num_pages``."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        """Whether ``request`` can grow to ``num_tokens`` tokens of KV."""
        return self.pages_needed(num_tokens) - len(request.block_table) <= len(self._free)

    def grow(self, request: Request, num_tokens: int) -> None:
        """Gives ``request`` enough pages for ``num_tokens`` tokens (call can_hold first)."""
        missing = self.pages_needed(num_tokens) - len(request.block_table)
        if missing > len(self._free):
            raise RuntimeError(f"{request} needs {missing} pages, {len(self._free)} are free")
        for _ in range(missing):
            request.block_table.append(self._free.popleft())

    def free(self, request: Request) -> None:
        """Returns all of ``request``'s pages."""
        self._free.extend(request.block_table)
        request.block_table = []
