"""One-shot generation from the command line, streaming tokens to the terminal.

    python -m duetjax.generate "What is the capital of France?"
    python -m duetjax.generate --model ./Llama-3.2-1B-Instruct --no-chat "Once upon a time"
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .engine import Engine
from .sampling_params import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duetjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt (a user message in chat mode)")
    p.add_argument("--model", default=None,
                   help="Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: when it has one)")
    p.add_argument("--system", default=None, help="system message in chat mode")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16")
    p.add_argument("--load-format", default="auto", help="auto, safetensors, gguf, dummy")
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine start-up")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    # One request: one sequence, and only the step shapes this prompt needs get compiled.
    engine = Engine(args.model, dtype=args.dtype, load_format=args.load_format, max_num_seqs=1,
                    compile_on_start=False)
    loaded = time.perf_counter()
    tokenizer = engine.tokenizer
    chat = args.chat if args.chat is not None else bool(tokenizer and tokenizer.chat_template)
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    else:
        prompt = args.prompt
    request_id = engine.add_request(prompt, params)
    printed, first_token = 0, None
    output = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id != request_id:
                continue
            first_token = first_token or time.perf_counter()
            text = output.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    end = time.perf_counter()
    if args.stats and output is not None:
        n = len(output.outputs[0].token_ids)
        decode_rate = (n - 1) / (end - first_token) if n > 1 else float("nan")
        print(f"[load {loaded - start:.2f}s, first token {first_token - loaded:.2f}s, "
              f"{n} tokens, {decode_rate:.1f} tok/s after the first, "
              f"finish: {output.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
