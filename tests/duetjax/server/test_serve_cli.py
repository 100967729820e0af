"""Command-line options of ``python -m duetjax.serve`` map onto EngineConfig fields."""
import pytest

from duetjax.config import EngineConfig
from duetjax.serve import engine_options, parse_args


def test_duet_flags_become_engine_config():
    options = engine_options(parse_args(["--mode", "duet", "--tbt-slo-ms", "25",
                                         "--duet-pairs", "70:30,50:50", "--max-num-seqs", "8",
                                         "--duet-policy", "static", "--device-profile", "p.json"]))
    assert options == {"mode": "duet", "tbt_slo_ms": 25.0, "duet_pairs": ((70, 30), (50, 50)),
                       "max_num_seqs": 8, "duet_policy": "static", "device_profile": "p.json",
                       "generation_config": "auto"}
    config = EngineConfig(**{k: v for k, v in options.items()})
    assert config.duet_pairs == ((70, 30), (50, 50))


@pytest.mark.parametrize("pairs", ["70-30", "70:x", "70:30:1"])
def test_bad_duet_pairs_say_what_to_write(pairs, capsys):
    if pairs == "70:30:1":  # parses, but EngineConfig rejects the shape
        options = engine_options(parse_args(["--duet-pairs", pairs]))
        with pytest.raises(ValueError, match=r"\(prefill %, decode %\) pairs"):
            EngineConfig(**options)
        return
    with pytest.raises(SystemExit, match="PREFILL:DECODE"):
        engine_options(parse_args(["--duet-pairs", pairs]))
