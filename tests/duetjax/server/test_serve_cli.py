"""Command-line options of ``python -m duetjax.serve`` map onto EngineConfig fields; what the
engine cannot start with is one line that names the flag."""
import pytest

from duetjax.config import EngineConfig
from duetjax.serve import engine_options, main, parse_args


def test_duet_flags_become_engine_config():
    options = engine_options(parse_args(["--mode", "duet", "--tbt-slo-ms", "25",
                                         "--duet-pairs", "70:30,50:50", "--max-num-seqs", "8",
                                         "--duet-policy", "static", "--device-profile", "p.json"]))
    assert options == {"mode": "duet", "tbt_slo_ms": 25.0, "duet_pairs": ((70, 30), (50, 50)),
                       "max_num_seqs": 8, "duet_policy": "static", "device_profile": "p.json",
                       "generation_config": "auto"}
    config = EngineConfig(**{k: v for k, v in options.items()})
    assert config.duet_pairs == ((70, 30), (50, 50))


def test_slo_budget_flags_become_engine_config():
    options = engine_options(parse_args(["--tbt-slo-ms", "25", "--slo-ttft-ms", "2000",
                                         "--slo-min-prefill-tokens", "128"]))
    assert {k: options[k] for k in ("tbt_slo_ms", "slo_ttft_ms", "slo_min_prefill_tokens")} == {
        "tbt_slo_ms": 25.0, "slo_ttft_ms": 2000.0, "slo_min_prefill_tokens": 128}
    config = EngineConfig(**options)
    assert (config.slo_ttft_ms, config.slo_min_prefill_tokens) == (2000.0, 128)


@pytest.mark.parametrize("pairs", ["70-30", "70:x", "70:30:1"])
def test_bad_duet_pairs_say_what_to_write(pairs, capsys):
    if pairs == "70:30:1":  # parses, but EngineConfig rejects the shape
        options = engine_options(parse_args(["--duet-pairs", pairs]))
        with pytest.raises(ValueError, match=r"\(prefill %, decode %\) pairs"):
            EngineConfig(**options)
        return
    with pytest.raises(SystemExit, match="PREFILL:DECODE"):
        engine_options(parse_args(["--duet-pairs", pairs]))


@pytest.mark.parametrize("argv, message", [
    ([], "error: --device-profile is needed for duet mode on CPU"),
    (["--device-profile", "/nonexistent.json"],
     "error: --device-profile '/nonexistent.json' cannot be read as a roofline profile"),
])
def test_duet_mode_without_a_profile_fails_before_loading_anything(tiny_llama_dir, monkeypatch,
                                                                     capsys, argv, message):
    monkeypatch.setattr("duetjax.duet.assembly.load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the mode was checked"))
    assert main(["--model", str(tiny_llama_dir), "--mode", "duet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_bad_engine_option_names_its_flag(tiny_llama_dir, capsys):
    assert main(["--model", str(tiny_llama_dir), "--max-num-seqs", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-num-seqs must be >= 1, got 0\n"
