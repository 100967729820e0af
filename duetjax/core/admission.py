"""Admitting a request: its prompt checked and tokenized, its sampling settings checked against
the model, and the ``Request`` built with what the host loop reads (stop ids, detokenizer,
grammar matcher, seed). Bad input raises a ValueError or TypeError that says what to fix."""
from __future__ import annotations

import itertools
import numbers
from pathlib import Path
from typing import Container, Sequence, Union

import numpy as np

from models import Tokenizer

from ..sampling_params import SamplingParams
from ..structured_outputs import GrammarCompiler
from .request import Request

Prompt = Union[str, dict]


class Admission:
    """Builds the requests of one model. ``in_use``: the ids of the requests being served."""

    def __init__(self, tokenizer: Tokenizer | None, model_path: str | Path, vocab_size: int,
                 max_model_len: int, eos_token_ids: frozenset[int], seed: int | None,
                 in_use: Container[str]):
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.in_use = in_use
        self._grammars = (GrammarCompiler(tokenizer.backend.to_str(), vocab_size, eos_token_ids)
                          if tokenizer else None)
        """Structured outputs' grammar compiler (None: no tokenizer)."""
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)

    def grammar_compiler(self) -> GrammarCompiler:
        """The model's ``GrammarCompiler``; ValueError where structured outputs cannot run."""
        if self._grammars is None:
            raise ValueError(f"structured outputs need a tokenizer; {self.model_path} ships none")
        return self._grammars

    def request(self, prompt: Prompt, params: SamplingParams, request_id: str | None) -> Request:
        """The ``Request`` of one prompt (``request_id`` None: the next free one)."""
        text, ids = self.prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        for field, field_ids in (("prompt", ids), ("logit_bias", params.logit_bias or ()),
                                 ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in field_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"{field} token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        matcher = None
        if params.structured_outputs is not None:
            matcher = self.grammar_compiler().matcher(params.structured_outputs)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.in_use:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**32))
        request = Request(request_id, ids, params, seed, prompt=text)
        request.stop_ids = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else self.eos_token_ids)
        if self.tokenizer is not None:
            request.detokenizer = self.tokenizer.incremental_detokenizer(
                ids, skip_special_tokens=params.skip_special_tokens)
        request.plain = request.detokenizer is None and params.logprobs is None
        request.matcher = matcher
        return request

    def chat_prompt(self, conversation: Sequence[dict], add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> dict:
        """The prompt of one chat conversation, rendered with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} ships no tokenizer, so it has no chat template")
        text = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}))
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(the prompt's text if it has one, its token ids)."""
        return prompt_ids(prompt, self.tokenizer, self.model_path)


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer | None,
               model_path: str | Path) -> tuple[str | None, list[int]]:
    """(the prompt's text if it has one, its token ids): a string is encoded with
    ``tokenizer``; a dict brings ``prompt_token_ids`` (checked to be integers) or ``prompt``.
    ``model_path`` names the model in the error when it ships no tokenizer."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if isinstance(ids, (str, bytes)) or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                raise TypeError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), [int(t) for t in ids]
        if "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
    if tokenizer is None:
        raise ValueError(f"{model_path} ships no tokenizer; pass {{'prompt_token_ids': [...]}}")
    return prompt, tokenizer.encode(prompt)
