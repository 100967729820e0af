"""Does a compiled step multiply FP8 weights in FP8? A census of its optimized HLO.

With FP8 weights the decode step should call cuBLASLt's FP8 GEMM (a custom call to
``__cublas$lt$matmul$f8``, what XLA:GPU's GemmRewriter makes of a ``dot`` on float8 operands)
or, before that rewrite or on other backends, a ``dot`` on float8 operands, rather than
converting each weight to bf16 first (which reads it once and writes it twice as large before
the GEMM reads it again). On a CPU, XLA upcasts every float8 operand: the census then shows
weight conversions, as it should.

    python tools/fp8_gemm_check.py --model llama-3-8b --load-format dummy --batch 1 --out-dir hlo/
    python tools/fp8_gemm_check.py --model tiny-llama --load-format dummy --dtype float32   # CPU

``bench_engine.py --dump-hlo DIR`` runs the same census on each variant it times.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Iterable

CUBLASLT_F8 = "__cublas$lt$matmul$f8"
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")
"""``%name = dtype[dims]{layout} opcode(operands...``: one HLO instruction."""
OPERAND = re.compile(r"%([\w.\-]+)")
FLOAT8 = ("f8e4m3fn", "f8e5m2")
WIDE = ("bf16", "f16", "f32")


COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
"""The first line of a computation: ``%fused_computation.3 (param_0: ...) -> ... {``."""
MATERIALIZING = ("copy", "transpose", "fusion", "dynamic-slice", "slice")
"""Opcodes that, outside a fusion, write a new array."""


def _instructions(hlo: str) -> dict[str, tuple[str, tuple[int, ...], str, list[str], bool]]:
    """name -> (dtype, dims, opcode, operand names, inside a fused computation) of every array
    instruction."""
    found, fused = {}, False
    for line in hlo.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            name, dtype, dims, opcode, rest = m.groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            found[name] = (dtype, shape, opcode, OPERAND.findall(rest.split("),")[0]), fused)
        elif c := COMPUTATION.match(line):
            fused = "fused" in c.group(1) or "fusion" in c.group(1)
    return found


def fp8_gemm_census(hlo: str, weight_shapes: Iterable[tuple[int, ...]]) -> dict[str, Any]:
    """Counts in one executable's optimized HLO text: cuBLASLt FP8 GEMM calls, ``dot``s whose
    operands are both float8, ``dot``s mixing float8 with a wider type, and conversions of a
    float8 array shaped like a weight (``weight_shapes``: per layer, stacked or not) to a wider
    type. ``fp8_gemm``: the step multiplies FP8 weights in FP8 (calls or f8 dots, and no weight
    conversion). ``weight_copies``: float8 weight-shaped arrays the step writes outside any
    fusion's body (a layer's slice of a stacked weight copied out for the GEMM: every weight
    byte read and written once more a step)."""
    shapes = {tuple(s) for s in weight_shapes}
    table = _instructions(hlo)
    dtype_of = {name: entry[0] for name, entry in table.items()}
    f8_dots = mixed_dots = upcasts = copies = 0
    for dtype, shape, opcode, operands, fused in table.values():
        kinds = [dtype_of.get(o, "") for o in operands[:2]]
        if opcode == "dot":
            f8 = [k in FLOAT8 for k in kinds]
            f8_dots += all(f8)
            mixed_dots += any(f8) and not all(f8)
        elif opcode == "convert" and dtype in WIDE and kinds and kinds[0] in FLOAT8:
            upcasts += shape in shapes
        elif opcode in MATERIALIZING and dtype in FLOAT8 and not fused:
            copies += shape in shapes
    calls = hlo.count(CUBLASLT_F8)
    return {"cublaslt_f8_calls": calls, "f8_dots": f8_dots, "mixed_f8_dots": mixed_dots,
            "weight_upcasts": upcasts, "weight_copies": copies,
            "fp8_gemm": (calls + f8_dots) > 0 and upcasts == 0}


def fp8_weight_shapes(params: Any) -> set[tuple[int, ...]]:
    """Shapes of the float8 weights of a parameter tree, stacked and per layer."""
    import jax

    shapes = set()
    for leaf in jax.tree_util.tree_leaves(params):
        if str(leaf.dtype) in ("float8_e4m3fn", "float8_e5m2", "uint8"):
            shapes |= {tuple(leaf.shape), tuple(leaf.shape[1:])}
    return shapes


def decode_census(engine: Any, batch: int, out_dir: str | None = None,
                  label: str = "") -> dict[str, Any]:
    """The census of ``engine``'s decode step at ``batch`` sequences (compiled here if it is
    not yet), written to ``out_dir`` with its HLO when given."""
    from duetjax.core.step_inputs import Bucket

    runner = engine.runner
    bucket = Bucket(True, batch, batch)
    executable = runner._executables.get(bucket) or runner._compile(bucket)
    hlo = executable.as_text()
    census = {"batch": batch, **fp8_gemm_census(hlo, fp8_weight_shapes(runner.params))}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"decode_b{batch}{'_' + label if label else ''}.hlo"), "w") as f:
            f.write(hlo)
    return census


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--fp8-activation", default="dynamic", choices=("dynamic", "none"))
    p.add_argument("--gemm-backend", default="cublas")
    p.add_argument("--layer-weights", default="auto", choices=("auto", "stacked", "per-layer"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out-dir", default=None, help="also write the step's HLO here")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from duetjax import Engine

    engine = Engine(args.model, dtype=args.dtype, load_format=args.load_format,
                    quantization="fp8", fp8_activation=args.fp8_activation,
                    max_num_seqs=max(args.batch, 1), max_num_batched_tokens=max(args.batch, 16),
                    max_model_len=2048, gemm_backend=args.gemm_backend,
                    layer_weights=args.layer_weights, compile_on_start=False, show_progress=False)
    census = decode_census(engine, args.batch, args.out_dir, f"fp8-{args.fp8_activation}")
    print(json.dumps(census))


if __name__ == "__main__":
    main()
