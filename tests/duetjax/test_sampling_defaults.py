"""Requests without SamplingParams sample as the model's generation config says (vLLM's
``generation_config``: 'auto', 'vllm' or a directory)."""
import dataclasses
import json

import pytest

from duetjax import Engine, SamplingParams
from duetjax.config import ConfigError

from .server.helpers import write_tiny_model_with_sampling_defaults

OPTIONS = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, compile_on_start=False,
               show_progress=False)
PROMPT = {"prompt_token_ids": [5, 6, 7, 8]}
CHAT = [{"role": "user", "content": "hi"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_with_sampling_defaults(tmp_path_factory.mktemp("sampling-defaults"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(model_dir, **OPTIONS)


def test_default_sampling_params_are_the_generation_configs(engine):
    params = engine.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.max_tokens) == (0.7, 1, 5)
    assert (params.top_p, params.min_p, params.repetition_penalty) == (1.0, 0.0, 1.0)  # not set
    assert engine.get_default_sampling_params(max_tokens=9, top_k=0) == dataclasses.replace(
        params, max_tokens=9, top_k=0)


def test_generate_and_chat_without_sampling_params_take_them(engine):
    greedy = engine.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    sampled = engine.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=16, seed=0,
                                                     ignore_eos=True), use_tqdm=False)
    assert sampled[0].outputs[0].token_ids[:5] != greedy[:5]  # so top_k 1 is what shows below
    [default] = engine.generate(PROMPT, use_tqdm=False)
    assert default.outputs[0].token_ids == greedy[:5]  # top_k 1, max_new_tokens 5
    [chat] = engine.chat(CHAT, use_tqdm=False)
    [chat_greedy] = engine.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert chat.outputs[0].token_ids == chat_greedy.outputs[0].token_ids


def test_generation_config_vllm_leaves_the_models_settings_out(model_dir):
    engine = Engine(model_dir, generation_config="vllm", **OPTIONS)
    assert engine.get_default_sampling_params() == SamplingParams()


def test_generation_config_from_another_directory(model_dir, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "min_p": 0.1}))
    engine = Engine(model_dir, generation_config=str(tmp_path), **OPTIONS)
    assert engine.get_default_sampling_params() == SamplingParams(temperature=0.3, min_p=0.1)


@pytest.mark.parametrize("content, message", [
    (None, "neither 'auto', 'vllm' nor a directory holding generation_config.json"),
    ({"top_p": 0}, r"sampling value out of range \(top_p must be in \(0, 1\], got 0\)"),
    ({"temperature": "hot"}, "sampling value out of range"),
])
def test_a_bad_generation_config_names_the_option(model_dir, tmp_path, content, message):
    if content is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message) as error:
        Engine(model_dir, generation_config=str(tmp_path), **OPTIONS)
    assert error.value.option == "generation_config"


def test_the_models_defaults_compile_nothing_while_serving(model_dir, tmp_path):
    """Defaults like the embedded SmolLM2's (top_p, repetition_penalty: the full sampler)."""
    import jax

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}))
    engine = Engine(model_dir, generation_config=str(tmp_path),
                    **{**OPTIONS, "compile_on_start": True})
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outputs = engine.generate([PROMPT, {"prompt_token_ids": list(range(3, 40))}], use_tqdm=False)
        engine.chat(CHAT, use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(o.outputs[0].token_ids for o in outputs)
    assert compiles == []
