"""GGUF SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``) against sentencepiece.

Each test model is a tiny SentencePiece BPE model trained here with byte fallback (as Llama 2's
and Gemma's are), written into a GGUF the way llama.cpp's ``convert_hf_to_gguf.py`` writes
one (``_create_vocab_sentencepiece``), and loaded back through ``GGUFSource``.
"""
from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from models.errors import CheckpointError
from models.gguf_loader import GGUFSource
from models.tokenizer import Tokenizer
from tests.models.test_gguf import _layer, write_gguf

_WORDS = ("the quick brown fox jumps over a lazy dog while engines serve tokens and models "
          "answer questions about numbers like 12345 or 3.14, it's what we'll do; don't stop! "
          "Hello World Привет мир как дела 日本語のテキスト café naïve Straße "
          "(x) [y] {z} a-b").split()
# Not in the corpus, so they need byte fallback: emoji, Greek, a few symbols.
TEXTS = [
    "Hello world", "the quick brown fox", " leading space", "trailing spaces  ",
    "multiple   spaces  between words", "   ", " ", "line\nbreak\n\nand\ttab\r\n",
    "12345 digits 3.14159 and 1,000,000", "punctuation!?,.;:'\"()[]{}<>@#$%^&*_+=~`|\\/",
    "Привет мир, как дела?", "日本語のテキスト", "café naïve Straße", "emoji 😀🎉 need bytes",
    "ελληνικά κείμενο", "mixed 日本 and Привет 42 😀!", "x", "",
]
_FUZZ_CHARS = list("abcdefghijklmnopqrstuvwxyzHW0123456789 \n\t.,!?'\"-"
                   "日本語Приветéß😀λ€")


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(2000)]


@dataclass
class Style:
    """One family's SentencePiece settings and what its GGUF conversion stores."""

    name: str
    add_dummy_prefix: bool
    ids: dict[str, int]  # SentencePiece trainer ids: unk, bos, eos, pad (-1: none)
    control: tuple[str, ...]
    user_defined: tuple[str, ...]
    write_space_prefix: bool | None  # tokenizer.ggml.add_space_prefix (None: not written)


LLAMA2 = Style("llama2", True, {"unk": 0, "bos": 1, "eos": 2, "pad": -1},
               control=("<|im_start|>", "<|im_end|>"), user_defined=("<sep>",),
               write_space_prefix=None)  # llama.cpp's default (true) applies
GEMMA = Style("gemma", False, {"pad": 0, "eos": 1, "bos": 2, "unk": 3},
              control=("<start_of_turn>", "<end_of_turn>"),
              user_defined=("<sep>", "\u2581\u2581", "\u2581\u2581\u2581"),  # Gemma's whitespace runs
              write_space_prefix=False)


def _train(style: Style):
    try:
        import sentencepiece as spm
    except ImportError:
        pytest.fail("sentencepiece is missing: pip install -e '.[test]'", pytrace=False)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=500,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        add_dummy_prefix=style.add_dummy_prefix, unk_id=style.ids["unk"], bos_id=style.ids["bos"],
        eos_id=style.ids["eos"], pad_id=style.ids["pad"], control_symbols=list(style.control),
        user_defined_symbols=list(style.user_defined), minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _write_spm_gguf(path: Path, sp, style: Style, *, padding: int = 3, special_ids: bool = True,
                    add_bos: bool | None = True, add_eos: bool | None = False,
                    scores: bool = True, model: str = "llama") -> Path:
    """What llama.cpp's converter writes for a SentencePiece tokenizer.model: one entry per
    piece, typed by IsUnknown/IsControl/IsUnused/IsByte (else NORMAL); the user-defined
    symbols (listed as non-special added tokens in tokenizer_config.json) become USER_DEFINED
    with '▁' written as ' '; the vocabulary is padded to the embedding size with UNUSED
    [PAD{i}] tokens; special ids and add_* flags come from the HF configs."""
    tokens, token_scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece, kind, score = sp.id_to_piece(i), gguf.TokenType.NORMAL, sp.get_score(i)
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif piece in style.user_defined:
            kind, piece, score = gguf.TokenType.USER_DEFINED, piece.replace("\u2581", " "), -1000.0
        tokens.append(piece)
        token_scores.append(score)
        types.append(kind)
    for i in range(1, padding + 1):
        tokens.append(f"[PAD{i}]")
        token_scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_context_length(64)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    if scores:
        writer.add_token_scores(token_scores)
    writer.add_token_types(types)
    if special_ids:
        writer.add_bos_token_id(style.ids["bos"])
        writer.add_eos_token_id(style.ids["eos"])
        writer.add_unk_token_id(style.ids["unk"])
        if style.ids["pad"] >= 0:
            writer.add_pad_token_id(style.ids["pad"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    if style.write_space_prefix is not None:
        writer.add_add_space_prefix(style.write_space_prefix)
    tensors = _layer(np.random.default_rng(0))
    tensors["token_embd.weight"] = np.zeros((len(tokens), 8), np.float32)
    return write_gguf(writer, tensors, path)


@pytest.fixture(scope="module", params=[LLAMA2, GEMMA], ids=lambda s: s.name)
def case(request, tmp_path_factory):
    style = request.param
    sp = _train(style)
    path = _write_spm_gguf(tmp_path_factory.mktemp(style.name) / "m.gguf", sp, style)
    source = GGUFSource(path)
    return style, sp, source, source.tokenizer()


def _llama_cpp_reference(sp, style: Style, text: str) -> list[int]:
    """llama.cpp's rule for text holding special or user-defined tokens: those are cut out
    first (longest first), each piece of text between them is encoded on its own (so with the
    space prefix, a '▁' starts each piece), the tokens' own ids go in between."""
    specials = {t: sp.piece_to_id(t) for t in style.control}
    specials.update({t.replace("\u2581", " "): sp.piece_to_id(t) for t in style.user_defined})
    pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
    ids: list[int] = []
    for part in re.split(f"({pattern})", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


def test_training_gave_what_the_tests_need(case):
    """The tiny models have merges, byte pieces, and leave emoji and Greek to byte fallback."""
    style, sp, _, _ = case
    assert sp.piece_to_id("<0x0A>") != sp.unk_id() and sp.get_piece_size() == 500
    pieces = [sp.id_to_piece(i) for i in sp.encode("the quick brown fox answer")]
    assert any(len(p.strip("\u2581")) > 2 for p in pieces)  # merged pieces
    assert [sp.id_to_piece(i) for i in sp.encode("😀")][-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece(case, text):
    style, sp, _, tok = case
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text), [tok.backend.id_to_token(i) for i in ids]
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text  # bos added, then skipped


def test_random_text_matches_sentencepiece(case):
    style, sp, _, tok = case
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice(_FUZZ_CHARS) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == text, repr(text)


def test_special_and_user_defined_tokens_in_text(case):
    style, sp, _, tok = case
    start, end = style.control
    texts = [f"{start}user\nHi there{end}", f"{start} leading{end}\n{start}x", "a<sep>b",
             "two <sep> seps<sep>", f"{end}{end}", f"x{start}😀 42{end}y",
             "spaces:  two   three     five", "<sep> <sep>"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.backend.id_to_token(i) for i in ids]
        assert ids == _llama_cpp_reference(sp, style, text), (text, pieces)
    assert tok.encode(f"x{end}", add_special_tokens=False)[-1] == sp.piece_to_id(end)
    # Control tokens are special (dropped when decoding), user-defined ones are text.
    expected = "a<sep> b" if style.add_dummy_prefix else "a<sep>b"  # llama.cpp's '▁' after <sep>
    assert tok.decode(tok.encode(f"{start}a<sep>b{end}")) == expected
    if not style.add_dummy_prefix:
        # Without the space prefix llama.cpp's rule is sentencepiece's own (it matches
        # user-defined symbols itself), and decoding gives the text back.
        for text in texts:
            if start not in text and end not in text:
                assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids, skip_special_tokens=False) == text


def test_bos_eos_and_special_token_config(case):
    style, sp, source, tok = case
    bos, eos, unk = (sp.id_to_piece(style.ids[k]) for k in ("bos", "eos", "unk"))
    assert tok.encode("Hello world") == [style.ids["bos"]] + sp.encode("Hello world")
    assert tok.encode("") == [style.ids["bos"]]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        style.ids["bos"], style.ids["eos"], style.ids["unk"])
    config = source.tokenizer_config()
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (bos, eos, unk)
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (source.hf_config["bos_token_id"], source.hf_config["eos_token_id"]) == (
        style.ids["bos"], style.ids["eos"])
    if style.ids["pad"] >= 0:
        assert config["pad_token"] == "<pad>" and tok.pad_token_id == style.ids["pad"]
    # The file names no end-of-turn id: llama.cpp's rule finds it by its text, and a chat
    # turn stops there as well as at EOS (Gemma's <end_of_turn>, ChatML's <|im_end|>).
    end_of_turn = sp.piece_to_id(style.control[1])
    assert tok.eos_token_ids == (style.ids["eos"], end_of_turn)
    assert source.generation_config()["eos_token_id"] == [style.ids["eos"], end_of_turn]
    assert tok.vocab_size == sp.get_piece_size() + 3  # the [PAD{i}] entries


def test_add_bos_and_add_eos_flags(tmp_path):
    sp = _train(LLAMA2)
    plain = GGUFSource(_write_spm_gguf(tmp_path / "plain.gguf", sp, LLAMA2, add_bos=False)).tokenizer()
    assert plain.encode("Hello") == sp.encode("Hello")
    both = GGUFSource(_write_spm_gguf(tmp_path / "both.gguf", sp, LLAMA2, add_bos=True, add_eos=True))
    assert both.tokenizer().encode("Hello") == [1] + sp.encode("Hello") + [2]
    assert both.tokenizer_config()["add_eos_token"] is True


def test_llama_cpp_defaults_when_metadata_is_missing(tmp_path):
    """No special ids, no add_bos_token, no add_space_prefix: llama.cpp's 'llama' defaults
    (bos 1, eos 2, unk 0, bos added, space prefix)."""
    sp = _train(LLAMA2)
    source = GGUFSource(_write_spm_gguf(tmp_path / "m.gguf", sp, LLAMA2, special_ids=False,
                                        add_bos=None, add_eos=None))
    assert source.tokenizer().encode("Hello world") == [1] + sp.encode("Hello world")
    config = source.tokenizer_config()
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert (source.hf_config["bos_token_id"], source.hf_config["eos_token_id"]) == (1, 2)
    assert source.generation_config()["eos_token_id"] == [2, sp.piece_to_id("<|im_end|>")]


def test_saved_tokenizer_files_round_trip(case, tmp_path):
    style, sp, source, tok = case
    source.save_tokenizer(tmp_path)
    from_disk = Tokenizer.from_dir(tmp_path)
    for text in TEXTS + [f"{style.control[0]}hi<sep> there{style.control[1]}"]:
        assert from_disk.encode(text) == tok.encode(text), text
        assert from_disk.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_streaming_detokenization(case):
    """Byte-fallback pieces of one character arrive one by one; the deltas add up to the text."""
    style, sp, _, tok = case
    text = "emoji 😀 and ελλη  spaces\nnew line 42"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.incremental_detokenizer()
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", "gpt3"])
def test_unsupported_tokenizer_models_name_the_supported_ones(tmp_path, model):
    source = GGUFSource(_write_spm_gguf(tmp_path / "m.gguf", _train(GEMMA), GEMMA, model=model))
    with pytest.raises(CheckpointError, match=rf"'{model}' is not supported.*'gpt2'.*'llama'"):
        source.tokenizer()


def test_missing_scores_is_a_clear_error(tmp_path):
    source = GGUFSource(_write_spm_gguf(tmp_path / "m.gguf", _train(GEMMA), GEMMA, scores=False))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.scores"):
        source.tokenizer()
