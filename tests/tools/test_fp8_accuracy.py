"""tools/fp8_accuracy.py: the teacher-forced measures, and the tool end to end on the tiny random
Llama on CPU (the plumbing, not the figures)."""
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import fp8_accuracy  # noqa: E402

TEXT = "Lighthouses guide ships at night. " * 16
"""544 bytes: the tiny Llama (no tokenizer, 256 positions) reads it as three chunks of bytes."""


def test_identical_logits_agree_everywhere_with_zero_kl():
    rows = [np.random.default_rng(0).normal(size=(9, 50)).astype(np.float32)]
    same = fp8_accuracy.compare(rows, [rows[0].copy()])
    assert same == {"positions": 8, "top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0}


def test_kl_and_agreement_match_a_hand_computed_case():
    """Two positions predict a next token (the third row predicts past the text): the first
    keeps its top-1 with a changed distribution, the second's top-1 moves."""
    baseline = [np.log(np.array([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1], [1, 1, 1]]))]
    variant = [np.log(np.array([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [9, 1, 1]]))]
    kl = [0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.25 / 0.2),
          0.7 * math.log(0.7 / 0.1) + 0.2 * math.log(0.2 / 0.8)]
    got = fp8_accuracy.compare(baseline, variant)
    assert got["positions"] == 2 and got["top1_agreement"] == 0.5
    assert math.isclose(got["mean_kl"], sum(kl) / 2, rel_tol=1e-9)
    assert math.isclose(got["max_kl"], kl[1], rel_tol=1e-9)


def test_perplexity_of_the_next_tokens():
    uniform = [np.zeros((4, 7), np.float32), np.zeros((2, 7), np.float32)]
    assert math.isclose(fp8_accuracy.perplexity(uniform, [[1, 2, 3, 4], [5, 6]]), 7, rel_tol=1e-9)
    sure = np.full((3, 7), -30.0)
    sure[[0, 1], [4, 2]] = 30.0  # certain of the next tokens 4 and 2
    assert math.isclose(fp8_accuracy.perplexity([sure], [[0, 4, 2]]), 1, rel_tol=1e-9)


def test_text_is_split_into_chunks_that_each_predict():
    assert fp8_accuracy.chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert fp8_accuracy.chunked(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_an_unchanged_variant_agrees_and_fp8_weights_move_the_distribution(tmp_path):
    """The baseline's own settings as a variant reproduce it exactly; FP8 weights give a
    positive KL on the same random weights (written once, quantized on load)."""
    variants = {"unchanged": {}, "fp8-w8a8": fp8_accuracy.VARIANTS["fp8-w8a8"]}
    row = fp8_accuracy.evaluate_model("tiny-llama", "float32", TEXT, variants, tmp_path)
    assert row["random_weights"] and row["tokens"] == len(TEXT.encode()) and row["chunks"] == 3
    assert row["baseline"]["paris"] is None
    unchanged, fp8 = row["variants"]
    assert unchanged["positions"] == len(TEXT.encode()) - 3
    assert unchanged["top1_agreement"] == 1.0 and unchanged["mean_kl"] == 0.0
    assert unchanged["perplexity"] == row["baseline"]["perplexity"]
    assert fp8["mean_kl"] > 0 and fp8["options"] == {"quantization": "fp8", "fp8_activation": "dynamic"}
    assert 0 < fp8["top1_agreement"] <= 1 and fp8["perplexity"] != row["baseline"]["perplexity"]


def test_the_tool_writes_its_report_and_table(tmp_path):
    text, out, table = tmp_path / "text.txt", tmp_path / "acc.json", tmp_path / "acc.md"
    text.write_text(TEXT)
    assert fp8_accuracy.main(["--model", "tiny-llama", "--dtype", "float32", "--variants", "fp8-kv",
                              "--text", str(text), "--out", str(out), "--table", str(table)]) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["backend"] == "cpu"
    assert report["date"] and report["jax"] and report["dtype"] == "float32"
    assert report["command"].startswith("python tools/fp8_accuracy.py --model tiny-llama")
    [model] = report["models"]
    assert model["model"] == "tiny-llama" and [v["variant"] for v in model["variants"]] == ["fp8-kv"]
    assert model["variants"][0]["mean_kl"] > 0 and model["variants"][0]["paris"] is None
    assert "| fp8-kv |" in table.read_text() and "## tiny-llama" in table.read_text()
