"""FP8 accuracy: each FP8 variant of a model against the same model unquantized.

Variants (``--variants``, default all):
- ``fp8-w8a8``: FP8 weights, activations quantized per token (``quantization="fp8"``);
- ``fp8-weight-only``: FP8 weights, activations kept (``fp8_activation="none"``);
- ``fp8-kv``: an e4m3 KV cache (``kv_cache_dtype="fp8"``, scales from the checkpoint or 1.0);
- ``fp8-w8a8+fp8-kv``: W8A8 weights and the e4m3 KV cache.

The baseline is the model in ``--dtype`` (default bfloat16 on a GPU, float32 on a CPU).
Teacher-forced over a fixed English text (``fp8_accuracy_text.txt``: encyclopedic paragraphs
and a short Python program; ``--text`` for another): one forward per chunk of the model's
context length, and at every position that predicts a next token, whether the variant's top-1
token is the baseline's, KL(baseline || variant) over the full vocabulary, and each one's
perplexity of the text. A model without a tokenizer reads the text as UTF-8 bytes.

Then each variant answers "What is the capital of France?" through the model's chat template,
greedy, through ``Engine.chat``; skipped for random weights and models without a chat template.

Models (``--model``, a comma list): ``smollm2`` (the embedded SmolLM2-135M-Instruct, default),
a Hugging Face directory, a GGUF file, or a shipped config such as ``tiny-llama`` (random
weights, written as a checkpoint so that every variant quantizes the same weights; their
logits are near uniform, so the KL is tiny and top-1 flips on small differences).

    python tools/fp8_accuracy.py --model smollm2,tiny-llama --out fp8-accuracy.json \\
        --table fp8-accuracy.md          # float32 baseline on a CPU, bfloat16 on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from duetjax import Engine, SamplingParams  # noqa: E402
from models import compute_logits, default_model_dir, load_model  # noqa: E402
from models.hf_writer import save_hf_safetensors  # noqa: E402
from models.loader import shipped_configs  # noqa: E402

TEXT = Path(__file__).resolve().with_name("fp8_accuracy_text.txt")
EMBEDDED = "smollm2"
VARIANTS = {
    "fp8-w8a8": {"quantization": "fp8", "fp8_activation": "dynamic"},
    "fp8-weight-only": {"quantization": "fp8", "fp8_activation": "none"},
    "fp8-kv": {"kv_cache_dtype": "fp8"},
    "fp8-w8a8+fp8-kv": {"quantization": "fp8", "fp8_activation": "dynamic", "kv_cache_dtype": "fp8"},
}
"""Each variant's Engine options; the baseline has none (``quantization=None``,
``kv_cache_dtype="auto"``)."""
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ENGINE_OPTIONS = dict(max_num_seqs=1, max_model_len=512, kv_cache_tokens=1024,
                      compile_on_start=False, show_progress=False)
"""Enough engine for the one short chat question (the teacher-forced pass builds its own pool)."""


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def device_name() -> str:
    """The accelerator's name, or on a CPU the processor's model name."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU ({line.split(':', 1)[1].strip()})"
    return "CPU"


# ---- teacher-forced comparison ----------------------------------------------------------------

def text_tokens(engine: Engine, text: str) -> list[int]:
    """The text as the model reads it: its tokenizer's ids, else UTF-8 bytes (mod vocabulary)."""
    if engine.tokenizer is not None:
        return engine.tokenizer.encode(text)
    return [byte % engine.vocab_size for byte in text.encode()]


def chunked(tokens: list[int], length: int) -> list[list[int]]:
    """``tokens`` in consecutive pieces of at most ``length`` (each one forward from position 0);
    a last piece of one token predicts nothing and is dropped."""
    chunks = [tokens[i:i + length] for i in range(0, len(tokens), length)]
    return [chunk for chunk in chunks if len(chunk) > 1]


def log_probs(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(logits: list[np.ndarray], chunks: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of every chunk's next tokens."""
    nll = [-log_probs(rows[:-1])[np.arange(len(chunk) - 1), chunk[1:]]
           for rows, chunk in zip(logits, chunks)]
    return float(np.exp(np.concatenate(nll).mean()))


def compare(baseline: list[np.ndarray], variant: list[np.ndarray]) -> dict:
    """Top-1 agreement and KL(baseline || variant) over every position that predicts a next
    token (each chunk's last row predicts past the text and is left out)."""
    agree, kl = [], []
    for want, got in zip(baseline, variant):
        p, q = log_probs(want[:-1]), log_probs(got[:-1])
        agree.append(p.argmax(-1) == q.argmax(-1))
        kl.append((np.exp(p) * (p - q)).sum(-1))
    agree, kl = np.concatenate(agree), np.concatenate(kl)
    return {"positions": int(agree.size), "top1_agreement": float(agree.mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


# ---- one model ------------------------------------------------------------------------------

def checkpoint_for(model: str, dtype: str, scratch: Path) -> tuple[str, bool]:
    """(what ``Engine`` loads, whether the weights are random) for a ``--model`` entry. A
    shipped config's random weights are written to ``scratch`` as a checkpoint: quantized on
    load, every variant then holds the baseline's weights in FP8 (``load_format="dummy"``
    with FP8 would draw other random weights)."""
    if model == EMBEDDED:
        return str(default_model_dir()), False
    if Path(model).exists() or model not in shipped_configs():
        return model, False
    loaded = load_model(model, dtype=dtype, load_format="dummy")
    path = scratch / f"{model}-random-{dtype}"
    save_hf_safetensors(loaded.params, loaded.config, loaded.hf_config, path, dtype)
    return str(path), True


def ask_paris(engine: Engine) -> dict:
    out = engine.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    text = out[0].outputs[0].text
    return {"answer": text, "has_paris": "Paris" in text}


def run_variant(path: str, dtype: str, options: dict, text: str, with_paris: bool) -> dict:
    """One engine with ``options``: the text's chunks, their logits, and the Paris answer."""
    with Engine(path, dtype=dtype, **options, **ENGINE_OPTIONS) as engine:
        chunks = chunked(text_tokens(engine, text), engine.model_config.max_position_embeddings)
        logits = compute_logits(engine.model, chunks, kv_cache_dtype=engine.config.kv_cache_dtype)
        has_chat = engine.tokenizer is not None and engine.tokenizer.chat_template is not None
        paris = ask_paris(engine) if with_paris and has_chat else None
        name = engine.model_path.name
    del engine
    gc.collect()  # the engine's weights and pool, before the next variant's
    return {"model_name": name, "chunks": chunks, "logits": logits, "paris": paris}


def evaluate_model(model: str, dtype: str, text: str, variants: dict[str, dict],
                   scratch: Path) -> dict:
    """The baseline and every variant of ``model``, compared over ``text``."""
    path, random_weights = checkpoint_for(model, dtype, scratch)
    base = run_variant(path, dtype, {}, text, with_paris=not random_weights)
    chunks = base["chunks"]
    row = {"model": model, "checkpoint": base["model_name"],
           "random_weights": random_weights, "tokens": sum(map(len, chunks)), "chunks": len(chunks),
           "baseline": {"perplexity": perplexity(base["logits"], chunks), "paris": base["paris"]},
           "variants": []}
    log(f"{model}: {row['tokens']} tokens in {len(chunks)} chunks, baseline perplexity "
        f"{row['baseline']['perplexity']:.3f}" + _paris_note(base["paris"]))
    for name, options in variants.items():
        result = run_variant(path, dtype, options, text, with_paris=not random_weights)
        assert result["chunks"] == chunks, "every variant reads the same tokens"
        scores = compare(base["logits"], result["logits"])
        row["variants"].append({"variant": name, "options": options, **scores,
                                "perplexity": perplexity(result["logits"], chunks),
                                "paris": result["paris"]})
        log(f"  {name}: top-1 {scores['top1_agreement']:.2%}, mean KL {scores['mean_kl']:.3g}, "
            f"perplexity {row['variants'][-1]['perplexity']:.3f}" + _paris_note(result["paris"]))
    return row


def _paris_note(paris: dict | None) -> str:
    return "" if paris is None else f", Paris: {paris['answer']!r}"


# ---- report ---------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    models = ", ".join(row["model"] for row in report["models"])
    lines = [f"# FP8 accuracy against {report['dtype']}: {models}, {report['device']}, {report['date']}",
             "", f"jax {report['jax']}; command: `{report['command']}`", "",
             f"Text: `{report['text']}` ({report['text_chars']} characters), teacher-forced; "
             "top-1 agreement and KL(baseline || variant) per position predicting a next token.",
             ""]
    for row in report["models"]:
        random_note = ", random weights" if row["random_weights"] else ""
        lines += [f"## {row['model']} ({row['checkpoint']}{random_note})", "",
                  f"{row['tokens']} tokens in {row['chunks']} chunk(s); baseline perplexity "
                  f"{row['baseline']['perplexity']:.3f}"
                  + ("" if row["baseline"]["paris"] is None
                     else f"; baseline Paris answer: {row['baseline']['paris']['answer']!r}") + ".",
                  "", "| variant | top-1 agreement | mean KL (nats) | max KL | perplexity | Paris |",
                  "|---|---|---|---|---|---|"]
        for v in row["variants"]:
            paris = "skipped" if v["paris"] is None else (
                ("yes: " if v["paris"]["has_paris"] else "NO: ") + repr(v["paris"]["answer"]))
            lines.append(f"| {v['variant']} | {v['top1_agreement']:.2%} | {v['mean_kl']:.3g} | "
                         f"{v['max_kl']:.3g} | {v['perplexity']:.3f} | {paris} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED,
                   help=f"comma list: {EMBEDDED} (embedded SmolLM2, default), a checkpoint path, "
                        "or a shipped config (random weights), e.g. smollm2,tiny-llama")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="the baseline's dtype (default bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)} (default all)")
    p.add_argument("--text", type=Path, default=TEXT, help="the teacher-forced text")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--table", type=Path, default=None, help="markdown table")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {', '.join(sorted(unknown))}")
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    text = args.text.read_text()
    command = ["python", "tools/fp8_accuracy.py", *(sys.argv[1:] if argv is None else argv)]
    report = {"device": device_name(), "backend": jax.default_backend(), "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(command),
              "dtype": dtype, "text": _shown_path(args.text), "text_chars": len(text)}
    with tempfile.TemporaryDirectory(prefix="fp8-accuracy-") as scratch:
        report["models"] = [evaluate_model(model, dtype, text, variants, Path(scratch))
                            for model in args.model.split(",")]
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    if args.table:
        args.table.write_text(table)
    log(table)
    return 0


def _shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
