"""The embedded SmolLM2: its GGUF file and the converted safetensors directory are the same
model, and it answers a simple question correctly."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from duetjax import Engine, SamplingParams
from models import compute_logits, load_model
from models.default_model import default_gguf_path
from models.tokenizer import Tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_engine(smollm2_dir):
    return Engine(default_gguf_path(), dtype="float32", max_num_seqs=2, compile_on_start=False,
                  show_progress=False)


def test_gguf_and_converted_safetensors_give_identical_logits(gguf_engine, smollm2_dir):
    converted = load_model(smollm2_dir, dtype="float32")
    tokenizer = gguf_engine.tokenizer
    prompts = [tokenizer.encode(text) for text in ("The capital of France is",
                                                   "def fibonacci(n):\n    return")]
    assert tokenizer.encode("The capital of France is") == converted.tokenizer.encode(
        "The capital of France is")
    from_gguf = compute_logits(gguf_engine.model, prompts)
    from_safetensors = compute_logits(converted, prompts)
    for a, b in zip(from_gguf, from_safetensors):
        np.testing.assert_array_equal(a, b)


def test_gguf_chat_answers_the_capital_of_france(gguf_engine):
    out = gguf_engine.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    answer = out[0].outputs[0]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"  # ended on <|im_end|>, not on the length limit


def test_stop_strings_end_the_text_before_them(gguf_engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"])
    answer = gguf_engine.chat(QUESTION, params, use_tqdm=False)[0].outputs[0]
    assert "Paris" not in answer.text and answer.text.startswith("The capital of France is")
    assert answer.finish_reason == "stop" and answer.stop_reason == "Paris"


def test_the_readmes_token_id_prompt_is_the_text_it_names(smollm2_dir):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    ids, text = re.search(r'\{"prompt_token_ids": (\[[\d, ]+\])\}\],\s+# "([^"]+)"', readme).groups()
    assert Tokenizer.from_dir(smollm2_dir).encode(text) == json.loads(ids)
