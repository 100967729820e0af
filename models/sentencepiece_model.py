"""SentencePiece's ``tokenizer.model`` (the tokenizer of Gemma's Flax releases) as a Tokenizer.

The file is a ``ModelProto`` protocol buffer (sentencepiece_model.proto). The few fields a BPE
vocabulary needs are read here straight from the wire format, so neither the sentencepiece
package nor protobuf-generated code is needed at run time; the vocabulary then goes through
the SentencePiece BPE builder the GGUF loader uses (``gguf_loader.sentencepiece_bpe``).
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import gguf

from .errors import CheckpointError
from .gguf_loader import bos_eos_post_processor, add_vocabulary_tokens, sentencepiece_bpe
from .tokenizer import Tokenizer

_SPACE = "\u2581"
_BPE = 2
"""TrainerSpec.model_type of a BPE model (1 is unigram)."""


@dataclasses.dataclass(frozen=True)
class SentencePieceModel:
    """What duetjax reads from a ``ModelProto``."""

    pieces: list[str]
    """Piece text per id."""
    scores: list[float]
    """Piece score per id (ranks BPE merges)."""
    types: list[int]
    """Piece kind per id (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6)."""
    model_type: int = 1
    """TrainerSpec.model_type: 1 unigram, 2 BPE."""
    special_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    """'unk', 'bos', 'eos', 'pad' -> id (absent or -1: none)."""
    add_dummy_prefix: bool = True
    """NormalizerSpec.add_dummy_prefix: a space is put before the text."""


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values are
    bytes, varints ints, fixed32 the 4 raw bytes."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 2:
            size = varint()
            yield number, wire, data[pos:pos + size]
            pos += size
        elif wire == 5:
            yield number, wire, data[pos:pos + 4]
            pos += 4
        elif wire == 1:
            yield number, wire, data[pos:pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _signed(value: int) -> int:
    """An int32 field read as a varint (negative ids are 10-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Parses ``tokenizer.model``; CheckpointError when it is not a SentencePiece model."""
    pieces, scores, types = [], [], []
    special = {"unk": 0, "bos": 1, "eos": 2, "pad": -1}  # SentencePiece's defaults
    model_type, add_dummy_prefix = 1, True
    try:
        for number, _, value in _fields(Path(path).read_bytes()):
            if number == 1:  # pieces
                piece, score, kind = "", 0.0, 1
                for field, _, inner in _fields(value):
                    if field == 1:
                        piece = inner.decode("utf-8")
                    elif field == 2:
                        score = struct.unpack("<f", inner)[0]
                    elif field == 3:
                        kind = inner
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 2:  # trainer_spec
                ids = {40: "unk", 41: "bos", 42: "eos", 43: "pad"}
                for field, wire, inner in _fields(value):
                    if field == 3:
                        model_type = inner
                    elif field in ids and wire == 0:
                        special[ids[field]] = _signed(inner)
            elif number == 3:  # normalizer_spec
                for field, _, inner in _fields(value):
                    if field == 3:
                        add_dummy_prefix = bool(inner)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as err:
        raise CheckpointError(f"{path} is not a SentencePiece model file ({err})") from None
    if not pieces:
        raise CheckpointError(f"{path} holds no SentencePiece pieces; is it a tokenizer.model?")
    return SentencePieceModel(pieces, scores, types, model_type, special, add_dummy_prefix)


def sentencepiece_tokenizer(path: Path) -> Tokenizer:
    """The Tokenizer of a SentencePiece BPE ``tokenizer.model`` (Gemma's, Llama 2's): bos added
    to every prompt, as both do; no chat template (the file has none)."""
    model = read_sentencepiece_model(path)
    if model.model_type != _BPE:
        raise CheckpointError(f"{path} is a SentencePiece model of type {model.model_type}; "
                              "duetjax reads BPE ones (type 2), such as Gemma's and Llama 2's")
    # User-defined pieces are matched in the raw text, where Gemma's whitespace runs are spaces.
    tokens = [p.replace(_SPACE, " ") if t == gguf.TokenType.USER_DEFINED else p
              for p, t in zip(model.pieces, model.types)]

    def token(key: str) -> str | None:
        token_id = model.special_ids.get(key, -1)
        return tokens[token_id] if 0 <= token_id < len(tokens) else None

    backend = sentencepiece_bpe(tokens, model.scores, model.types, token("unk"), model.add_dummy_prefix)
    add_vocabulary_tokens(backend, tokens, model.types,
                          {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN})
    backend.post_processor = bos_eos_post_processor(True, False, token("bos"), None,
                                                     backend.token_to_id)
    special = {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unk"),
               "pad_token": token("pad")}
    return Tokenizer(backend, special_tokens=special, name_or_path=str(path))
