"""tools/bench_engine.py: the decode section's k-step timing on CPU (the plumbing, not the
figures)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_engine as be  # noqa: E402


@pytest.mark.parametrize("steps", [1, 4])
def test_decode_section_times_k_step_dispatches_and_frees_pages(tiny_llama_dir, steps):
    from duetjax import Engine

    engine = Engine(str(tiny_llama_dir), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                    max_model_len=64, decode_steps=steps, compile_on_start=False,
                    show_progress=False)
    free = engine.stats().num_free_pages
    rows = be.decode_section(engine, {"copy_tb_s": 1.0}, [2], context=20, steps=steps)
    assert engine.stats().num_free_pages == free
    assert rows[0]["steps_per_dispatch"] == steps and rows[0]["step_ms"] > 0
    # The k-step bucket ran (compiled on first use), not k single steps.
    assert any(b.multi_step == (steps > 1) and b.steps == steps for b in engine.compiled_buckets())


def test_host_section_reports_the_median_run_and_its_parts(tiny_llama_dir):
    from duetjax import Engine

    engine = Engine(str(tiny_llama_dir), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                    max_model_len=64, compile_on_start=False, show_progress=False)
    row = be.host_section(engine, batch=4, prompt_len=8, output_len=6, repeats=3, freeze=False)
    runs = row["host_ms_per_step_runs"]
    assert len(runs) == 3 and row["host_ms_per_step"] == sorted(runs)[1]
    parts = row["host_ms_per_step_by_part"]
    assert set(parts) == {"schedule", "prepare", "launch_bookkeeping", "apply"}
    # The parts are a subset of the host work; when the loop's own time rounds to nothing the
    # sums differ only in the last bit.
    assert all(ms >= 0 for ms in parts.values())
    assert sum(parts.values()) <= row["host_ms_per_step"] * (1 + 1e-9)
    assert row["steps"] >= 6 and row["gc_full_collections"] >= 0
