"""One-shot generation from the command line, streaming tokens to the terminal.

    python -m duetjax.generate "What is the capital of France?"
    python -m duetjax.generate --model ./Llama-3.2-1B-Instruct --no-chat "Once upon a time"
    python -m duetjax.generate --temperature 0 "What is the capital of France?"   # greedy

Sampling flags left out take the model's defaults (its generation_config.json: see
--generation-config), as vLLM does; --max-tokens, where the model sets none, is 256.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from .cli import (LOAD_FORMAT_HELP, add_generation_config_flag, add_quantization_flags,
                  add_tensor_parallel_flag, quantization_options, start_error,
                  tensor_parallel_options)
from .engine import Engine
from .sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 256
"""--max-tokens where neither the flag nor the model's generation config says."""
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "seed")
"""Flags that are SamplingParams fields; those left out (None) take the model's defaults."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duetjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the prompt (a user message in chat mode)")
    p.add_argument("--model", default=None,
                   help="Hugging Face directory, .gguf file or Orbax checkpoint directory "
                        "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: when it has one)")
    p.add_argument("--system", default=None, help="system message in chat mode")
    model_default = "(default: the model's, see --generation-config)"
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens to generate (default: the model's max_new_tokens, else "
                        f"{DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=None, help=f"0 is greedy {model_default}")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling {model_default}")
    p.add_argument("--top-k", type=int, default=None, help=f"0 disables {model_default}")
    p.add_argument("--min-p", type=float, default=None, help=f"0 disables {model_default}")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"1 disables {model_default}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_generation_config_flag(p)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16")
    p.add_argument("--load-format", default="auto", help=LOAD_FORMAT_HELP)
    add_quantization_flags(p)
    add_tensor_parallel_flag(p)
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine start-up")
    return p.parse_args(argv)


def sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields the command line sets."""
    flags = {"stop": args.stop}
    for name in SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    return flags


def sampling_params(engine: Engine, args: argparse.Namespace) -> SamplingParams:
    """The flags given, over the model's defaults (at most DEFAULT_MAX_TOKENS tokens where
    neither says how many)."""
    flags = sampling_flags(args)
    flags.setdefault("max_tokens", engine.sampling_defaults.max_tokens or DEFAULT_MAX_TOKENS)
    return engine.get_default_sampling_params(**flags)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        SamplingParams(**sampling_flags(args))  # a bad flag fails before the model loads
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        # One request: one sequence, and only the step shapes this prompt needs get compiled.
        engine = Engine(args.model, dtype=args.dtype, load_format=args.load_format,
                        max_num_seqs=1, compile_on_start=False,
                        generation_config=args.generation_config,
                        **quantization_options(args), **tensor_parallel_options(args))
        params = sampling_params(engine, args)
    except (ValueError, TypeError, OSError) as error:
        print(start_error(error), file=sys.stderr)
        return 2
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
