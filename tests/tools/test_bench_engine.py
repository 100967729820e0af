"""tools/bench_engine.py: the decode section's k-step timing and the FP8 variants on CPU (the
plumbing, not the figures)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_engine as be  # noqa: E402
from fp8_gemm_check import decode_census  # noqa: E402


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


def test_fp8_variants_time_decode_and_prefill_and_census_the_hlo(tiny_llama_dir, tmp_path):
    """--quantization none,fp8: each variant's steps against its own weight bytes, the
    comparison table, and the decode HLO census (on a CPU, XLA upcasts the FP8 weights)."""
    from duetjax import Engine

    assert be.weight_variants("none,fp8", "dynamic,none") == [
        ("bf16", None, "dynamic"), ("fp8-dynamic", "fp8", "dynamic"), ("fp8-none", "fp8", "none")]
    report = {"model": "tiny", "device": "cpu", "jax": "x", "date": "today", "command": "c",
              "ceilings": {"copy_tb_s": 1.0, "matmul_tflop_s": 1.0}, "decode": [], "prefill": []}
    bytes_of = {}
    for label, quantization in (("bf16", None), ("fp8-dynamic", "fp8")):
        engine = Engine(str(tiny_llama_dir), dtype="float32", max_num_seqs=2,
                        max_num_batched_tokens=32, max_model_len=64, quantization=quantization,
                        compile_on_start=False, show_progress=False)
        bytes_of[label] = be.weight_bytes(engine)
        report["decode"] += be.decode_section(engine, report["ceilings"], [1, 2], context=20,
                                              weights=label)
        report["prefill"] += be.prefill_section(engine, report["ceilings"], [32], weights=label)
        census = decode_census(engine, 1, str(tmp_path), label)
        assert census["cublaslt_f8_calls"] == 0 and census["f8_dots"] == 0
        assert (census["weight_upcasts"] > 0) == (quantization == "fp8")
        assert not census["fp8_gemm"]
        be.release(engine)
    assert bytes_of["fp8-dynamic"] < 0.6 * bytes_of["bf16"]
    roofline = {r["weights"]: r["roofline_ms"] for r in report["decode"] if r["batch"] == 1}
    assert roofline["fp8-dynamic"] < roofline["bf16"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode_b1_bf16.hlo", "decode_b1_fp8-dynamic.hlo"]
    table = be.markdown(report)
    assert "| fp8-dynamic | 2 | 20 |" in table
    assert "fp8-dynamic against bf16: decode batch 1: " in table and "prefill tokens 32: " in table


def test_fp8_gemm_census_reads_gpu_hlo():
    """What XLA:GPU's optimized HLO looks like with and without the FP8 GEMM rewrite."""
    from fp8_gemm_check import fp8_gemm_census

    rewritten = """
  %p0 = f8e4m3fn[64,4096]{1,0} parameter(0)
  %p1 = f8e4m3fn[6144,4096]{1,0} parameter(1)
  %cublas-lt-matmul.1 = (bf16[64,6144]{1,0}, s8[33554432]{0}) custom-call(%p0, %p1, %c1, %c1), custom_call_target="__cublas$lt$matmul$f8"
"""
    upcast = """
  %p1 = f8e4m3fn[6144,4096]{1,0} parameter(1)
  %convert.7 = bf16[6144,4096]{1,0} convert(%p1), metadata={op_name="x"}
  %x = bf16[64,4096]{1,0} parameter(0)
  %dot.2 = bf16[64,6144]{1,0} dot(%x, %convert.7), lhs_contracting_dims={1}, rhs_contracting_dims={1}
"""
    shapes = [(6144, 4096), (32, 6144, 4096)]
    assert fp8_gemm_census(rewritten, shapes) == {"cublaslt_f8_calls": 1, "f8_dots": 0,
                                                  "mixed_f8_dots": 0, "weight_upcasts": 0,
                                                  "weight_copies": 0, "fp8_gemm": True}
    sliced = """
%fused_slice (param_0: f8e4m3fn[32,6144,4096], param_1: s32[]) -> f8e4m3fn[6144,4096] {
  %param_0 = f8e4m3fn[32,6144,4096]{2,1,0} parameter(0)
  %ds.1 = f8e4m3fn[1,6144,4096]{2,1,0} dynamic-slice(%param_0, %param_1), dynamic_slice_sizes={1,6144,4096}
  ROOT %bitcast.1 = f8e4m3fn[6144,4096]{1,0} bitcast(%ds.1)
}

ENTRY %main (p0: f8e4m3fn[64,4096], p1: f8e4m3fn[32,6144,4096], i: s32[]) -> bf16[64,6144] {
  %p0 = f8e4m3fn[64,4096]{1,0} parameter(0)
  %p1 = f8e4m3fn[32,6144,4096]{2,1,0} parameter(1)
  %copy_fusion = f8e4m3fn[6144,4096]{1,0} fusion(%p1, %i), kind=kLoop, calls=%fused_slice
  %cublas-lt-matmul.1 = (bf16[64,6144]{1,0}, s8[33554432]{0}) custom-call(%p0, %copy_fusion), custom_call_target="__cublas$lt$matmul$f8"
}
"""
    assert fp8_gemm_census(sliced, shapes)["weight_copies"] == 1  # the fusion, not its body
    assert fp8_gemm_census(upcast, shapes)["weight_upcasts"] == 1
    assert not fp8_gemm_census(upcast, shapes)["fp8_gemm"]


def test_fp8_kv_cache_variants_read_half_the_kv(tiny_llama_dir):
    """--kv-cache-dtype auto,fp8: every weights variant with both caches, and an FP8 cache's
    decode roofline counts a byte per cached element."""
    from duetjax import Engine

    weights = be.weight_variants("none,fp8", "dynamic")
    assert be.engine_variants(weights, "auto,fp8") == [
        ("bf16", None, "dynamic", "auto"), ("bf16+fp8kv", None, "dynamic", "fp8"),
        ("fp8-dynamic", "fp8", "dynamic", "auto"), ("fp8-dynamic+fp8kv", "fp8", "dynamic", "fp8")]
    with pytest.raises(SystemExit, match="--kv-cache-dtype"):
        be.engine_variants(weights, "int8")
    report = {"model": "tiny", "device": "cpu", "jax": "x", "date": "today", "command": "c",
              "ceilings": {"copy_tb_s": 1.0, "matmul_tflop_s": 1.0}, "decode": []}
    for label, quantization, activation, kv_cache_dtype in be.engine_variants(
            weights[:1], "auto,fp8"):
        engine = Engine(str(tiny_llama_dir), dtype="float32", max_num_seqs=2,
                        max_num_batched_tokens=32, max_model_len=64, quantization=quantization,
                        kv_cache_dtype=kv_cache_dtype, compile_on_start=False,
                        show_progress=False)
        report["decode"] += be.decode_section(engine, report["ceilings"], [2], context=20,
                                              weights=label)
        be.release(engine)
    base, fp8 = (r["roofline_ms"] for r in report["decode"])
    assert fp8 < base
    assert "bf16+fp8kv against bf16: decode batch 2: " in be.markdown(report)


def test_kernel_bench_decode_fp8_runs_in_interpret_mode():
    """tools/kernel_bench.py's decode-fp8 section on a CPU (interpret mode, tiny shapes): both
    pools timed, the e4m3 one counted at a byte per element, also with a longer key block and
    with bfloat16 dot operands."""
    import kernel_bench as kb

    rows = kb.decode_fp8({"copy_tb_s": 1.0}, shapes=[(2, 48)], hq=4, hkv=2, d=32, page=16,
                         interpret=True, num_layers=2, fp8_tiles=((32, 2),))
    by_dtype = {r["kv_dtype"]: r for r in rows if r["table_choice"]}
    assert set(by_dtype) == {"bfloat16", "float8_e4m3fn"}
    raced = [r for r in rows if not r["table_choice"]]  # a longer key block; bf16 operands
    assert sorted((r["config"]["block_k"], r["fp8_operands"]) for r in raced) == [
        (32, "float16"), (64, "bfloat16")]
    assert {r["kv_dtype"] for r in raced} == {"float8_e4m3fn"}
    bf16, fp8 = by_dtype["bfloat16"], by_dtype["float8_e4m3fn"]
    assert (bf16["fp8_operands"], fp8["fp8_operands"]) == (None, "float16")
    assert bf16["speedup"] == 1.0 and fp8["speedup"] > 0
    assert fp8["kv_tb_s"] * fp8["us"] == pytest.approx(bf16["kv_tb_s"] * bf16["us"] / 2)
    table = kb.markdown({"env": {"gpu": "cpu", "jax": "x", "date": "d", "command": "c"},
                         "ceilings": {"copy_tb_s": 1.0, "matmul_tflop_s": 1.0},
                         "decode_fp8": rows})
    assert "| 2 | 48 | float8_e4m3fn | float16 | 64 / 3 (table) |" in table
    assert "| 2 | 48 | float8_e4m3fn | float16 | 32 / 2 |" in table
    assert "| 2 | 48 | float8_e4m3fn | bfloat16 | 64 / 3 |" in table


def test_tensor_parallel_sizes_run_on_two_host_devices(tiny_llama_dir, tmp_path):
    """--tensor-parallel-size 1,2 on a CPU with 2 host devices (its own process: JAX reads the
    device count once): both group sizes time decode and prefill, each against one device's
    share of the bytes."""
    import json
    import os
    import subprocess

    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    out, table = tmp_path / "tp.json", tmp_path / "tp.md"
    subprocess.run([sys.executable, str(Path(be.__file__)), "--model", str(tiny_llama_dir),
                    "--load-format", "auto", "--sections", "decode,prefill", "--batches", "1,2",
                    "--context", "20", "--prefill", "32", "--ceiling-gib", "0.01",
                    "--tensor-parallel-size", "1,2", "--out", str(out), "--table", str(table)],
                   env={**os.environ, "XLA_FLAGS": flags}, check=True, capture_output=True,
                   timeout=600)
    report = json.loads(out.read_text())
    assert {r["weights"] for r in report["decode"]} == {"bf16", "bf16-tp2"}
    assert {r["weights"] for r in report["prefill"]} == {"bf16", "bf16-tp2"}
    roofline = {r["weights"]: r["roofline_ms"] for r in report["decode"] if r["batch"] == 1}
    assert roofline["bf16-tp2"] < roofline["bf16"]  # each device reads half the weights and KV
    assert "bf16-tp2 against bf16: decode batch 1: " in table.read_text()


def test_a_variant_that_fails_is_reported_and_the_others_run(tiny_llama_dir, tmp_path, monkeypatch):
    """One variant's engine failing (out of memory, a kernel that does not compile) leaves its
    error in the report, and the variants after it still run."""
    engine_class = be.Engine

    def engine(*args, **kwargs):
        if kwargs.get("kv_cache_dtype") == "fp8":
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating the pool")
        return engine_class(*args, **kwargs)

    monkeypatch.setattr(be, "Engine", engine)
    monkeypatch.setattr(be, "ceilings", lambda gib: {"copy_tb_s": 1.0, "matmul_tflop_s": 1.0})
    out, table = tmp_path / "r.json", tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", [
        "bench_engine.py", "--model", str(tiny_llama_dir), "--load-format", "auto",
        "--sections", "decode", "--batches", "1", "--context", "16", "--prefill", "32",
        "--quantization", "none,fp8", "--kv-cache-dtype", "fp8,auto", "--kv-cache-tokens", "8192",
        "--out", str(out), "--table", str(table)])
    be.main()
    import json
    report = json.loads(out.read_text())
    assert set(report["failed"]) == {"bf16+fp8kv", "fp8-dynamic+fp8kv"}
    assert "out of memory" in report["failed"]["bf16+fp8kv"]
    assert {r["weights"] for r in report["decode"]} == {"bf16", "fp8-dynamic"}
    assert "**bf16+fp8kv failed:** RuntimeError" in table.read_text()


def test_startup_section_times_cold_starts_per_compile_threads(tiny_llama_dir):
    row = be.startup_section(str(tiny_llama_dir), "auto", 2, 16, compile_threads=(1, 2))
    assert row["cold"]["compile_threads"] == row["warm"]["compile_threads"] == 1
    assert set(row["cold_by_threads"]) == {1, 2}
    assert {r["buckets"] for r in row["cold_by_threads"].values()} == {row["cold"]["buckets"]}
    assert all(r["compile_s"] > 0 for r in row["cold_by_threads"].values())
    report = {"model": "tiny", "device": "cpu", "date": "today", "jax": "x", "command": "c",
              "ceilings": {"copy_tb_s": 1.0, "matmul_tflop_s": 1.0}, "startup": row}
    assert "Cold start by compile threads: 1: " in be.markdown(report)
