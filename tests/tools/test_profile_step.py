"""tools/profile_step.py: the trace summary's per-step accounting."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import profile_step as ps  # noqa: E402


def test_kernel_summary_per_step_busy_idle_and_classes():
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
    kernels = []
    for step in range(2):  # each step: gemm 0-40, overlapping fusion 30-50, gap, attention 60-80
        t0 = 100.0 * step
        kernels += [{"ph": "X", "pid": 1, "ts": t0, "dur": 40.0, "name": "nvjet_tst_128x64"},
                    {"ph": "X", "pid": 1, "ts": t0 + 30, "dur": 20.0, "name": "loop_add_fusion"},
                    {"ph": "X", "pid": 1, "ts": t0 + 60, "dur": 20.0, "name": "paged_decode_attention"}]
    host = [{"ph": "X", "pid": 2, "ts": 0.0, "dur": 500.0, "name": "PjitFunction"}]
    out = ps.kernel_summary(meta + kernels + host, steps=2)
    assert out["kernels_per_step"] == 3
    assert out["span_ms"] == pytest.approx(180e-3 / 2)  # 0 .. 180 us over 2 steps
    assert out["busy_ms"] == pytest.approx(70e-3)  # 50 + 20 us per step
    assert out["idle"] == pytest.approx(1 - 140 / 180)
    assert out["by_class_ms"] == pytest.approx({"gemm": 40e-3, "elementwise/other fusion": 20e-3,
                                                "attention": 20e-3})
    assert out["top_kernels"][0] == {"name": "nvjet_tst_128x64", "class": "gemm", "ms": 40e-3,
                                     "calls": 1.0}


def test_kernel_summary_without_gpu_events():
    assert ps.kernel_summary([{"ph": "X", "pid": 2, "ts": 0, "dur": 5, "name": "x"}], 1) == {"kernels": 0}


def test_kernel_summary_idle_gaps():
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    kernels = [{"ph": "X", "pid": 1, "ts": t, "dur": 10.0, "name": f"k{i}"}
               for i, t in enumerate((0.0, 13.0, 23.0, 433.0))]  # gaps of 3, 0 and 400 us
    out = ps.kernel_summary(meta + kernels, steps=1)
    assert out["idle_gaps"]["2-5 us"] == {"count_per_step": 1, "ms_per_step": pytest.approx(3e-3)}
    assert out["idle_gaps"]["200-1000 us"]["ms_per_step"] == pytest.approx(0.4)
    assert out["largest_gaps"][0] == {"us": 400.0, "after": "k2", "before": "k3"}


def test_trace_prefill_runs_and_frees_its_pages(tiny_llama_dir):
    """The plumbing on CPU (no GPU kernels in the trace): the synthetic prefill dispatches, the
    trace is read back, and every page goes back to the pool."""
    from duetjax import Engine

    engine = Engine(str(tiny_llama_dir), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                    max_model_len=64, compile_on_start=False, show_progress=False)
    free = engine.stats().num_free_pages
    assert ps.trace_prefill(engine, 24, steps=2) == {"kernels": 0}
    assert engine.stats().num_free_pages == free
