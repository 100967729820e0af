"""Structured outputs: decoding constrained to a JSON schema, a regex, a list of choices or a
grammar (vLLM's ``StructuredOutputsParams``), with llguidance computing each step's allowed
tokens on the host.

A constrained request keeps an ``llguidance.LLMatcher`` (its grammar's state after the tokens
generated so far). Before a step samples its next token the host writes the matcher's allowed
tokens into a bitmask row (``fill_token_mask``), and the sampler sets every other token's logit
to -inf on the device. The mask needs the previous token, so while a step in flight samples a
constrained token the engine reads that step's tokens before scheduling the next one: the
pipeline loses its overlap (the device idles for the host's work between steps, a fraction of
a large model's step), and constrained requests decode one token per step. The scheduler also
never schedules a constrained request whose last token is still on the device. In duet mode
iterations run aggregated while a constrained request waits or runs (the workers take no masks).
"""
from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Sequence

import numpy as np

STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match: exactly one field set (vLLM's names)."""

    json: str | dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    """A JSON schema (a dict or its JSON text): the output is one JSON value it accepts."""
    json_object: bool = False
    """The output is one JSON object, of any shape (OpenAI's ``response_format: json_object``)."""
    regex: str | None = None
    """The output matches this regular expression (Rust ``regex`` syntax), as a whole."""
    choice: Sequence[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect, ``start`` is the start rule); GBNF is also read."""

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured outputs: choice must be a list of strings")
            if not self.choice:
                raise ValueError("structured outputs: choice needs at least one string")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured outputs: json is not a valid JSON schema ({e})") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured outputs: json must be a JSON schema (an object)")
        given = [kind for kind in STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs need exactly one of json, json_object, regex, "
                             f"choice or grammar; got {', '.join(given) or 'none'}")

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (ValueError where it cannot be one)."""
        import llguidance

        matcher = llguidance.LLMatcher
        try:
            if self.json is not None:
                return matcher.grammar_from_json_schema(json.dumps(self.json))
            if self.json_object:
                return matcher.grammar_from_json_schema(json.dumps({"type": "object"}))
            if self.regex is not None:
                return matcher.grammar_from_regex(self.regex)
            if self.choice is not None:  # (JSON string literals are Lark string literals)
                return matcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(c) for c in self.choice))
            return matcher.grammar_from_lark(self.grammar)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"structured outputs: {e}") from None


class GrammarCompiler:
    """Turns ``StructuredOutputsParams`` into matchers for one model's tokenizer. Building
    llguidance's view of the vocabulary takes 0.3-1 s, so it starts at once in a background
    thread (the first constrained request does not stall the engine loop for it).
    ``stop_token_ids``: the tokens a finished grammar allows (the model's end-of-sequence ids)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_token_ids: Sequence[int]):
        self._lltokenizer = None
        self._error: Exception | None = None
        self._build = threading.Thread(
            target=self._build_lltokenizer, args=(tokenizer_json, vocab_size, sorted(stop_token_ids)),
            name="llguidance-tokenizer", daemon=True)
        self._build.start()

    def _build_lltokenizer(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int]) -> None:
        try:
            import llguidance

            self._lltokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                       eos_token=stop_ids)
        except Exception as e:  # (raised to whoever asks for a matcher)
            self._error = e

    @property
    def lltokenizer(self):
        self._build.join()
        if self._error is not None:
            raise ValueError(f"structured outputs: llguidance cannot read this model's tokenizer "
                             f"({self._error})") from self._error
        return self._lltokenizer

    def matcher(self, params: StructuredOutputsParams):
        """A fresh ``llguidance.LLMatcher`` for ``params``; ValueError (naming the problem)
        for a grammar, schema or regex that does not compile."""
        import llguidance

        grammar = params.grammar_text()
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs: {matcher.get_error()}")
        return matcher


def token_mask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit i of word w: token 32 w + i)."""
    return -(-vocab_size // 32)


def all_tokens_mask(num_rows: int, vocab_size: int) -> np.ndarray:
    """int32[num_rows, width] with every token allowed (unconstrained and padding rows)."""
    return np.full((num_rows, token_mask_width(vocab_size)), -1, np.int32)


def fill_token_mask(matcher, mask: np.ndarray, row: int) -> None:
    """Writes the tokens ``matcher`` allows next into ``mask[row]``."""
    import llguidance.numpy

    llguidance.numpy.fill_next_token_bitmask(matcher, mask, row)
