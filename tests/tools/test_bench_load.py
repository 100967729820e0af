"""tools/bench_load.py end to end on CPU with the tiny Llama (the plumbing, not the figures)."""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_load  # noqa: E402


def test_writes_both_checkpoints_and_reports_each_load(tmp_path):
    out, table = tmp_path / "load.json", tmp_path / "load.md"
    assert bench_load.main(["--model", "tiny-llama", "--dtype", "float32", "--repeats", "1",
                            "--scratch", str(tmp_path / "scratch"), "--out", str(out),
                            "--table", str(table)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] and report["date"] and report["model"] == "tiny-llama"
    assert [row["format"] for row in report["results"]] == ["safetensors", "orbax"]
    for row in report["results"]:
        assert len(row["seconds"]) == 1 and row["median_s"] > 0
        assert row["peak_rss_bytes"] > 0 and row["checkpoint_bytes"] > 0
    assert report["orbax_speedup"] > 0
    assert "| safetensors |" in table.read_text() and "| orbax |" in table.read_text()


def test_both_checkpoints_hold_the_same_weights(tmp_path):
    """The safetensors copy is a Hugging Face checkpoint (HF names, split q/k/v and gate/up,
    sharded with an index) of the very weights the Orbax copy holds."""
    from models import compute_logits, load_model

    paths = bench_load.write_checkpoints("tiny-llama", "float32", tmp_path)
    names = json.loads((paths["safetensors"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.k_proj.weight" in names and "model.norm.weight" in names
    hf = load_model(paths["safetensors"], dtype="float32", load_format="safetensors")
    orbax = load_model(paths["orbax"], dtype="float32", load_format="orbax")
    prompts = [[3, 4, 5, 6]]
    np.testing.assert_array_equal(np.asarray(compute_logits(hf, prompts)[0]),
                                  np.asarray(compute_logits(orbax, prompts)[0]))


def test_safetensors_shards_stay_under_the_limit(tiny_llama_dir, tmp_path):
    from models import compute_logits, load_model
    from models.hf_writer import save_hf_safetensors

    original = load_model(tiny_llama_dir, dtype="float32")
    save_hf_safetensors(original.params, original.config, original.hf_config, tmp_path, "float32",
                        max_shard_bytes=100_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[-1].name.endswith(f"-of-{len(shards):05d}.safetensors")
    assert all(s.stat().st_size < 100_000 + 65_536 for s in shards)  # the 64 KiB embedding: alone
    reloaded = load_model(tmp_path, dtype="float32")
    np.testing.assert_array_equal(np.asarray(compute_logits(original, [[7, 8]])[0]),
                                  np.asarray(compute_logits(reloaded, [[7, 8]])[0]))
