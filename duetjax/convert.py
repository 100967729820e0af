"""Converts a checkpoint into duetjax's own Orbax checkpoint, which restores straight onto the
device (``--load-format orbax``; ``auto`` recognises it).

    python -m duetjax.convert ./Llama-3.2-1B-Instruct ./llama-3.2-1b-orbax
    python -m duetjax.convert ./model.Q8_0.gguf ./model-orbax --dtype float32
    python -m duetjax.convert llama-3-8b ./llama-3-8b-random --load-format dummy

DST gets ``params/`` (the parameter tree, stacked and fused as the model holds it),
``config.json`` and the tokenizer files (and ``generation_config.json``) of SRC.
"""
from __future__ import annotations

import argparse
import sys
import time

from .cli import LOAD_FORMAT_HELP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duetjax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="what duetjax loads: a Hugging Face directory, a .gguf file, an "
                               "Orbax checkpoint, or a shipped config name with --load-format dummy")
    p.add_argument("dst", help="new directory for the Orbax checkpoint (absent or empty)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="stored weight dtype (default bfloat16)")
    p.add_argument("--load-format", default="auto", help=LOAD_FORMAT_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.orbax_writer import convert_to_orbax

    start = time.perf_counter()
    try:
        out = convert_to_orbax(args.src, args.dst, dtype=args.dtype, load_format=args.load_format)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
