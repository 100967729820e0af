"""tools/kernel_profile.py: the case runs, and only its launches fall inside the profiler range."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import kernel_profile  # noqa: E402


@pytest.mark.parametrize("kv_dtype", kernel_profile.KV_DTYPES)
def test_the_case_runs_inside_one_profiler_range(kv_dtype, capsys):
    calls = []
    args = kernel_profile.parse_args(["--kv-dtype", kv_dtype, "--batch", "2", "--ctx", "64",
                                      "--launches", "2"])
    kernel_profile.run_case(args, profiler=calls.append, interpret=True)
    assert calls == [True, False]
    assert f"profiled 2 launch(es): triton {kv_dtype} B=2 ctx=64" in capsys.readouterr().out


def test_the_mosaic_gpu_kernel_takes_bf16_pools_only():
    args = kernel_profile.parse_args(["--kernel", "mgpu", "--kv-dtype", "float8_e4m3fn",
                                      "--batch", "2", "--ctx", "64"])
    with pytest.raises(SystemExit, match="bf16"):
        kernel_profile.run_case(args, profiler=lambda start: None, interpret=True)
