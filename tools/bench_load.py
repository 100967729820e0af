"""Checkpoint load time: Hugging Face safetensors against duetjax's own Orbax checkpoint.

One model with random weights (a shipped config, ``load_format="dummy"``) is written once into
``--scratch`` as both: safetensors with HF names, sharded as HF releases are
(``model-0000i-of-0000n.safetensors`` + index), and through ``duetjax.convert`` as Orbax. Each
load then runs ``--repeats`` times, each in a fresh Python process: ``load_model`` from its
call until the parameters are on the device (``block_until_ready``), and the process's peak
host memory (``VmHWM``). The page cache holds the files (both were just written)
unless ``--drop-caches`` empties it before every load (needs root).

    python tools/bench_load.py --model llama-3-8b --scratch /tmp/bench-load \\
        --out load.json --table load.md
    python tools/bench_load.py --model tiny-llama --dtype float32 --repeats 1   # CPU check
    python tools/bench_load.py --model default --dtype float32 --repeats 7      # warm start
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORMATS = ("safetensors", "orbax")
DEFAULT = "default"
"""``--model default``: the embedded SmolLM2's converted cache (real weights) against the same
weights written as Orbax: what a warm start of the default model would gain from Orbax."""


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def write_checkpoints(model: str, dtype: str, scratch: Path) -> dict[str, Path]:
    """Both checkpoints of ``model``'s random weights (reused when already complete)."""
    from models.hf_writer import save_hf_safetensors
    from models.loader import load_model
    from models.orbax_writer import write_orbax

    paths = {fmt: scratch / f"{model}-{dtype}-{fmt}" for fmt in FORMATS}
    if model == DEFAULT:  # its safetensors are the converted cache a start-up reads
        from models import default_model_dir
        paths["safetensors"] = default_model_dir()
    done = {fmt: (path / ".complete").is_file() or (model == DEFAULT and fmt == "safetensors")
            for fmt, path in paths.items()}
    if all(done.values()):
        return paths
    loaded = load_model(str(paths["safetensors"]) if model == DEFAULT else model, dtype=dtype,
                        load_format="safetensors" if model == DEFAULT else "dummy")
    if not done["safetensors"]:
        start = time.perf_counter()
        save_hf_safetensors(loaded.params, loaded.config, loaded.hf_config, paths["safetensors"], dtype)
        (paths["safetensors"] / ".complete").touch()
        log(f"wrote {paths['safetensors']} in {time.perf_counter() - start:.1f}s")
    if not done["orbax"]:
        start = time.perf_counter()
        write_orbax(loaded, paths["orbax"])
        (paths["orbax"] / ".complete").touch()
        log(f"wrote {paths['orbax']} in {time.perf_counter() - start:.1f}s")
    return paths


def child(fmt: str, path: str, dtype: str) -> None:
    """One timed load in this (fresh) process; prints its JSON on stdout."""
    import jax

    from models.loader import load_model

    jax.devices()  # backend start-up is not part of the load
    start = time.perf_counter()
    loaded = load_model(path, dtype=dtype, load_format=fmt)
    seconds = time.perf_counter() - start  # load_model blocks until the params are on device
    peak = peak_rss_bytes()
    print(json.dumps({"format": fmt, "seconds": seconds, "peak_rss_bytes": peak,
                      "device": jax.devices()[0].device_kind, "param_bytes": sum(
                          x.nbytes for x in jax.tree_util.tree_leaves(loaded.params))}))


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM``, which starts afresh at exec. (getrusage's
    maxrss keeps the forking parent's peak across exec, and the parent holds the written
    model.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_load(fmt: str, path: Path, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", fmt, str(path), "--dtype", dtype]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(model: str, dtype: str, scratch: Path, repeats: int, drop_caches: bool) -> dict:
    paths = write_checkpoints(model, dtype, scratch)
    runs: dict[str, list[dict]] = {fmt: [] for fmt in FORMATS}
    for _ in range(repeats):
        for fmt in FORMATS:  # alternating, so drift hits both alike
            if drop_caches:
                drop_page_cache()
            runs[fmt].append(timed_load(fmt, paths[fmt], dtype))
            log(f"{fmt:12s} {runs[fmt][-1]['seconds']:.2f}s  peak RSS "
                f"{runs[fmt][-1]['peak_rss_bytes'] / 2**30:.2f} GiB")
    first = runs[FORMATS[0]][0]
    rows = [{"format": fmt, "seconds": [r["seconds"] for r in rs],
             "median_s": statistics.median(r["seconds"] for r in rs),
             "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
             "checkpoint_bytes": sum(f.stat().st_size for f in paths[fmt].rglob("*") if f.is_file())}
            for fmt, rs in runs.items()]
    by_format = {row["format"]: row for row in rows}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": first["device"], "model": model, "dtype": dtype, "repeats": repeats,
        "param_bytes": first["param_bytes"],
        "page_cache": "dropped before each load" if drop_caches else "warm (files just written)",
        "results": rows,
        "orbax_speedup": by_format["safetensors"]["median_s"] / by_format["orbax"]["median_s"],
    }


def table(report: dict) -> str:
    gib = 2**30
    lines = [f"Load to device: {report['model']} ({report['dtype']}, "
             f"{report['param_bytes'] / gib:.2f} GiB of parameters) on {report['device']}, "
             f"{report['date']}; page cache {report['page_cache']}; median of {report['repeats']}.",
             "", "| format | load s (median) | runs s | peak host RSS GiB | on disk GiB |",
             "|---|---|---|---|---|"]
    for row in report["results"]:
        runs = ", ".join(f"{s:.2f}" for s in row["seconds"])
        lines.append(f"| {row['format']} | {row['median_s']:.2f} | {runs} | "
                     f"{row['peak_rss_bytes'] / gib:.2f} | {row['checkpoint_bytes'] / gib:.2f} |")
    lines += ["", f"Orbax is {report['orbax_speedup']:.2f}x as fast as safetensors."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b",
                   help="a shipped config (random weights; default llama-3-8b), or 'default': "
                        "the embedded model's converted cache")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--scratch", type=Path, default=None,
                   help="where both checkpoints are written (default: a new temporary directory)")
    p.add_argument("--repeats", type=int, default=3, help="loads per format")
    p.add_argument("--drop-caches", action="store_true", help="empty the page cache before each load (root)")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--table", type=Path, default=None, help="markdown table")
    p.add_argument("--child", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child, args.dtype)
        return 0
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-load-"))
    scratch.mkdir(parents=True, exist_ok=True)
    report = run(args.model, args.dtype, scratch, args.repeats, args.drop_caches)
    text = table(report)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.table:
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
