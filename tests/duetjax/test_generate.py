"""``python -m duetjax.generate``: sampling flags over the model's defaults, one-line errors."""
import pytest

from duetjax import Engine, SamplingParams
from duetjax.generate import DEFAULT_MAX_TOKENS, main, parse_args, sampling_params

from .server.helpers import write_tiny_model_with_sampling_defaults

OPTIONS = dict(dtype="float32", max_num_seqs=1, compile_on_start=False, show_progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_with_sampling_defaults(tmp_path_factory.mktemp("generate-cli"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(model_dir, **OPTIONS)


def test_flags_left_out_take_the_models_defaults(engine):
    params = sampling_params(engine, parse_args(["hi"]))
    assert (params.temperature, params.top_k, params.max_tokens) == (0.7, 1, 5)
    params = sampling_params(engine, parse_args(["--temperature", "0", "--max-tokens", "9",
                                                 "--repetition-penalty", "1.2", "hi"]))
    assert (params.temperature, params.top_k, params.max_tokens, params.repetition_penalty) == (
        0.0, 1, 9, 1.2)


def test_without_the_models_settings_max_tokens_is_the_clis_own(model_dir):
    engine = Engine(model_dir, generation_config="vllm", **OPTIONS)
    params = sampling_params(engine, parse_args(["hi"]))
    assert params == SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)


def test_prints_what_the_models_defaults_generate(model_dir, engine, capsys):
    [expected] = engine.chat([{"role": "user", "content": "hi"}],
                             SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert main(["--model", str(model_dir), "--dtype", "float32", "hi"]) == 0
    assert capsys.readouterr().out == expected.outputs[0].text + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent"], "error: cannot start the engine: model path /nonexistent does not exist"),
    (["--generation-config", "/nonexistent"], "error: --generation-config '/nonexistent' is neither"),
    (["--temperature", "-1"], "error: temperature must be in [0"),
])
def test_errors_are_one_line_and_exit_2(model_dir, argv, message, capsys):
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    assert main([*argv, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
