"""SentencePiece ``tokenizer.model`` files (Gemma's Flax releases ship one) against sentencepiece.

The models are the tiny BPE models of test_gguf_tokenizer (Gemma's and Llama 2's settings),
serialized as a tokenizer.model file and read back without the sentencepiece package.
"""
from __future__ import annotations

import pytest

from models.errors import CheckpointError
from models.sentencepiece_model import read_sentencepiece_model, sentencepiece_tokenizer
from tests.models.test_gguf_tokenizer import GEMMA, LLAMA2, TEXTS, _train


@pytest.fixture(scope="module", params=[GEMMA, LLAMA2], ids=lambda s: s.name)
def trained(request, tmp_path_factory):
    sp = _train(request.param)
    path = tmp_path_factory.mktemp(request.param.name) / "tokenizer.model"
    path.write_bytes(sp.serialized_model_proto())
    return request.param, sp, path


def test_model_file_fields(trained):
    style, sp, path = trained
    model = read_sentencepiece_model(path)
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert model.scores == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert model.special_ids == style.ids
    assert model.add_dummy_prefix is style.add_dummy_prefix
    assert model.model_type == 2


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_encode_matches_sentencepiece(trained, text):
    style, sp, path = trained
    tokenizer = sentencepiece_tokenizer(path)
    assert tokenizer.encode(text) == [style.ids["bos"]] + sp.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == sp.decode(sp.encode(text))


def test_special_tokens(trained):
    style, sp, path = trained
    tokenizer = sentencepiece_tokenizer(path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (style.ids["bos"], style.ids["eos"])
    turn = sp.piece_to_id(style.control[0])
    assert tokenizer.encode(style.control[0], add_special_tokens=False) == [turn]


def test_not_a_sentencepiece_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(CheckpointError, match="is not a SentencePiece model file"):
        read_sentencepiece_model(path)
