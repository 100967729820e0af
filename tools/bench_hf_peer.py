"""Peer figures: Hugging Face transformers on PyTorch, same GPU and model shape as duetjax's
engine benchmark (random bf16 weights of a shipped config; `generate`, greedy).

    python tools/bench_hf_peer.py --model models/configs/llama-3-8b --out hf.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="models/configs/llama-3-8b")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", default="2048")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    config = AutoConfig.from_pretrained(args.model)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    vocab = config.vocab_size
    rows = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "decode": [],
            "prefill": []}
    with torch.inference_mode():
        for b in (int(x) for x in args.batches.split(",")):
            ids = torch.randint(0, vocab, (b, args.prompt_len), device="cuda")
            gen = dict(do_sample=False, min_new_tokens=args.new_tokens, pad_token_id=0)
            model.generate(ids, max_new_tokens=4, **gen)  # warm-up
            t_prefill = timed(lambda: model.generate(ids, max_new_tokens=1, **gen))
            t_total = timed(lambda: model.generate(ids, max_new_tokens=args.new_tokens, **gen))
            step = (t_total - t_prefill) / (args.new_tokens - 1)
            rows["decode"].append({"batch": b, "step_ms": 1e3 * step, "tokens_per_s": b / step})
            print(f"HF decode B={b}: {1e3 * step:.2f} ms/step, {b / step:.0f} tok/s", flush=True)
        for n in (int(x) for x in args.prefill.split(",")):
            ids = torch.randint(0, vocab, (1, n), device="cuda")
            model(ids)
            t = min(timed(lambda: model(ids)) for _ in range(3))
            rows["prefill"].append({"tokens": n, "seconds": t})
            print(f"HF prefill {n} tokens: {1e3 * t:.1f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
