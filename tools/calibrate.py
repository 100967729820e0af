"""Measure a device profile (``duetjax/perf/profiles/<gpu>.json``) for the GPU this runs on.

The roofline model (``duetjax/perf/roofline.py``) predicts iteration times from rates *measured* per
SM share, because under MPS they are not proportional to the share (a copy saturates HBM at
about half the SMs, a matmul scales linearly) and co-running clients slow each other down. This
tool measures those numbers and writes them as a ``DeviceProfile``:

    python tools/calibrate.py                                   # default levels and pairs
    python tools/calibrate.py --model-config models/configs/llama-3-8b   # + efficiency.gemm
    python tools/calibrate.py --levels 20,50,100 --pairs 70/30 --out /tmp/profiles
    python tools/calibrate.py --fake --out /tmp/p               # CPU: simulated GPU and MPS

Steps, and why each exists. Every measurement runs in a fresh child process
(``python tools/calibrate.py --child ...``, one JSON line on stdout), because
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` is read once per process, at CUDA initialisation.

1. MPS. The SM partition that split mode relies on is an MPS client setting, so the levels must
   be measured as MPS clients. A running daemon is used as is; otherwise a private one is
   started through ``duetjax.duet.mps`` and always stopped at the end (on errors and SIGINT/SIGTERM
   too). Without MPS only the 100 % level can be measured (no partition exists); the profile's
   notes and stderr say so.
2. SM levels (``--levels``, default 10..80 and 100 %). One child per share measures the bf16
   matmul rate (``--matmul-n``³ through cuBLAS, best of ``--reps`` after warm-up) and the HBM
   bandwidth of an elementwise ``a + 1`` over ``--copy-gib`` GiB of uint32 (bytes read +
   written): Π(S) and BW(S). On GPUs with FP8 tensor cores (compute capability 8.9 and up) it
   times the same matmul in e4m3 too (bf16 out, cuBLASLt's FP8 GEMM); the profile's
   ``fp8_flops_ratio`` is the median over the levels of FP8 over bf16.
3. Interference pairs (``--pairs``, default the optimizer's 80/20, 70/30, 60/40, 50/50). A
   matmul child at s_p and a copy child at s_d set up, report ready, and start their timed
   windows (``--window-s``) at the same moment on a byte from the parent; each reports the
   median rate over its window. Factor = rate together / rate alone at that share (the level's
   rate from step 2, interpolated like the roofline does where the share was not measured).
4. Efficiency (``--model-config``, optional). The model's projection GEMMs (q, k, v, o, gate,
   up, down of ``--gemm-layers`` layers with distinct weights, so nothing stays in L2) are timed
   through XLA at ``--gemm-tokens`` token counts; ``efficiency.gemm`` is the geometric mean of
   roofline-predicted / measured time (a least-squares fit in log time), capped at 1.
   Attention and elementwise stay at 1.0: engine-level calibration (predicted against measured
   iteration times) refines them. ``overhead_s`` is the median dispatch-to-completion time of a
   tiny jitted call, measured in the top level's child.
5. Write the profile (``source``: tool, date, GPU, jax version, command line; ``notes``: how
   every number was derived, raw pair rates) and print a markdown table.

Time: the default run with ``--model-config llama-3-8b`` took 102 s on an H200 (17 level and
pair children of 3-16 s each, mostly CUDA start-up and cuBLAS autotuning, which is slower at
some shares; 11 s for the GEMM child). Progress goes to stderr, the table to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Protocol, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from duetjax.duet import mps  # noqa: E402
from duetjax.perf.roofline import (PROFILES_DIR, DeviceProfile, Efficiency,  # noqa: E402
                              InterferencePoint, ModelShape, Roofline, SMLevel,
                              normalize_gpu_name)

SCRIPT = Path(__file__).resolve()
_T0 = time.monotonic()
DEFAULT_LEVELS = (10, 20, 30, 40, 50, 60, 70, 80, 100)
DEFAULT_PAIRS = ((80, 20), (70, 30), (60, 40), (50, 50))
"""(s_p, s_d) in percent: the worker pairs ``OptimizerConfig`` considers by default."""
DEFAULT_GEMM_TOKENS = (16, 256, 2048, 8192)
"""Decode-batch-like (weight-bandwidth-bound) to prefill-chunk-like (compute-bound) rows."""
READY = {"ready": True}
"""The line a pair child prints when set up; it then waits for one line on stdin."""
PCT_VAR = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
LEVEL_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"
"""For the level and pair children: the 8192³ matmul goes to cuBLAS. On the H200, XLA's Triton
GEMM autotuning took up to 35 s per process at some SM shares (40 %: 35 s, 50 %: 0.5 s) and ended
at the same rate as cuBLAS (359 vs 358 TFLOP/s at 40 %). The GEMM child keeps XLA's defaults,
as the engine runs them."""

# The simulated GPU of --fake (CPU tests of the orchestration; no jax is imported).
FAKE_GPU = "Fake GPU"
FAKE_PEAK_FLOPS = 800e12
FAKE_PEAK_BANDWIDTH = 4e12
FAKE_OVERHEAD_S = 80e-6
FAKE_GEMM_EFFICIENCY = 0.8
FAKE_PREFILL_SLOWDOWN = 0.25
"""Fake matmul client keeps 1 - 0.25·s_partner of its rate next to a copy client."""
FAKE_FP8_RATIO = 1.8
"""Fake FP8 matmul rate over the bf16 one."""
FAKE_DECODE_SLOWDOWN = 0.4
"""Fake copy client keeps 1 - 0.4·s_partner of its bandwidth next to a matmul client."""


class CalibrationError(RuntimeError):
    """A measurement child failed or returned something unusable."""


def log(message: str) -> None:
    """Progress and warnings go to stderr; stdout is the table (or a child's JSON)."""
    print(message, file=sys.stderr, flush=True)


# ============================================================== settings and parsing

@dataclasses.dataclass(frozen=True)
class Measure:
    """How each child measures (passed to every child on its command line)."""

    matmul_n: int = 8192
    """Matmul size: n×n by n×n in bf16 (2n³ FLOPs)."""
    copy_gib: float = 2.0
    """Size of the copied array, GiB; read + write are counted (2× this per call)."""
    reps: int = 10
    """Timed repetitions of a level measurement; the best counts."""
    warmup_s: float = 0.3
    """Warm-up before timing (clocks ramp up from idle)."""
    window_s: float = 3.0
    """Length of a pair's concurrent timed window."""
    gemm_layers: int = 8
    """Layers with distinct weights in the GEMM timing (more than L2 holds)."""
    level_xla_flags: str = LEVEL_XLA_FLAGS
    """XLA_FLAGS prepended for the level and pair children (not the GEMM child)."""
    fake: bool = False
    """Simulate the GPU (no jax): for tests of the orchestration."""

    def child_args(self) -> list[str]:
        args = ["--matmul-n", str(self.matmul_n), "--copy-gib", repr(self.copy_gib),
                "--reps", str(self.reps), "--warmup-s", repr(self.warmup_s),
                "--window-s", repr(self.window_s), "--gemm-layers", str(self.gemm_layers)]
        return args + (["--fake"] if self.fake else [])


def parse_levels(text: str) -> tuple[int, ...]:
    """'10,20,100' -> (10, 20, 100): distinct percentages in 1..100, sorted."""
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be integers, got {text!r}") from None
    if not levels or any(not 1 <= x <= 100 for x in levels):
        raise argparse.ArgumentTypeError(f"levels must be percentages in 1..100, got {text!r}")
    return tuple(levels)


def parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """'80/20,50/50' -> ((80, 20), (50, 50)): (s_p, s_d) percentages; '' or 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    pairs = []
    for item in text.split(","):
        try:
            s_p, s_d = (int(x) for x in item.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"pairs look like 80/20,50/50, got {item!r}") from None
        if not (1 <= s_p <= 100 and 1 <= s_d <= 100):
            raise argparse.ArgumentTypeError(f"pair shares must be in 1..100, got {item!r}")
        pairs.append((s_p, s_d))
    return tuple(dict.fromkeys(pairs))


def parse_tokens(text: str) -> tuple[int, ...]:
    """'16,256' -> (16, 256): positive token counts."""
    try:
        tokens = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"token counts must be integers, got {text!r}") from None
    if not tokens or min(tokens) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return tokens


def _model_config_class() -> Any:
    """``models.config.ModelConfig``; only config.py is loaded if the package's other modules
    cannot be imported (a GPU machine without e.g. ``gguf``, which models/__init__ pulls in)."""
    try:
        from models.config import ModelConfig
    except ImportError:
        if "models.config" not in sys.modules:
            package = types.ModuleType("models")
            package.__path__ = [str(REPO / "models")]
            sys.modules["models"] = package
        from models.config import ModelConfig
    return ModelConfig


def load_model_shape(where: str) -> tuple[ModelShape, str]:
    """(shape, name) from a Hugging Face config directory, its config.json, or the name of a
    shipped config (``models/configs/NAME``)."""
    path = Path(where)
    if not path.exists() and (REPO / "models" / "configs" / where).is_dir():
        path = REPO / "models" / "configs" / where
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {where!r}")
    config = _model_config_class().from_hf(json.loads(config_file.read_text()))
    return ModelShape.from_config(config), config_file.parent.name


# ============================================================== measurements (child side)

def _share_from_env(env: Mapping[str, str] = os.environ) -> int:
    """The percentage this process runs at (100 when not an MPS-limited client)."""
    return int(env.get(PCT_VAR, "100"))


def _timed(fn: Callable[..., Any], args: Sequence[Any], warmup_s: float, target_s: float = 0.02
           ) -> Callable[[], float]:
    """Compiles and warms up ``fn``; returns a function that times one repetition (seconds per
    call). A repetition dispatches enough calls back to back to last ``target_s``, so the host's
    dispatch latency is hidden behind queued work."""
    import jax

    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        jax.block_until_ready(fn(*args))
    inner = max(1, math.ceil(target_s / max(first, 1e-6)))

    def rep() -> float:
        begin = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - begin) / inner
    return rep


def _matmul_case(n: int) -> tuple[Callable[..., Any], tuple[Any, ...], float]:
    """(jitted bf16 n×n matmul, its random inputs, FLOPs per call)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    return jax.jit(lambda x, y: x @ y), (a, b), 2.0 * n ** 3


def _fp8_matmul_case(n: int) -> tuple[Callable[..., Any], tuple[Any, ...], float] | None:
    """(jitted e4m3 n×n matmul with bf16 out, its random inputs, FLOPs per call), or None on a
    device without FP8 tensor cores. The second operand is contracted on its last axis: the
    layout cuBLASLt's FP8 GEMM takes without a transpose, as the models' weights are used."""
    import jax
    import jax.numpy as jnp

    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not capability or tuple(map(int, capability.split("."))) < (8, 9):
        return None
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
    fn = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.bfloat16))
    return fn, (a, b), 2.0 * n ** 3


def _copy_case(gib: float) -> tuple[Callable[..., Any], tuple[Any, ...], float]:
    """(jitted elementwise ``a + 1`` over a ``gib`` GiB uint32 array, its input, bytes per call).

    An SM kernel, not a copy-engine transfer, so MPS's SM limit governs it. 32-bit elements:
    on the H200 XLA's bf16 elementwise kernels moved 20-35 % less (1.22 / 2.59 / 3.26 TB/s at
    20 / 50 / 100 % against 1.95 / 3.74 / 4.12 for uint32), which would understate what a
    memory-bound kernel gets at a share."""
    import jax
    import jax.numpy as jnp

    cols = 1 << 20
    rows = max(1, int(gib * (1 << 30)) // 4 // cols)
    x = jnp.zeros((rows, cols), jnp.uint32)
    return jax.jit(lambda a: a + 1), (x,), 2.0 * x.nbytes


def _dispatch_overhead_s(calls: int = 200) -> float:
    """Median dispatch-to-completion time of a tiny jitted call."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: a + 1)
    x = jnp.zeros((8,), jnp.float32)
    for _ in range(20):
        jax.block_until_ready(f(x))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _device_info() -> dict[str, Any]:
    import jax

    return {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "backend": jax.default_backend(), "init_s": round(time.monotonic() - _T0, 2)}


def _fake_info() -> dict[str, Any]:
    return {"device_kind": FAKE_GPU, "jax_version": "none (--fake)", "backend": "fake"}


def fake_flops(share: float) -> float:
    """The fake GPU's matmul rate: linear in the SMs."""
    return FAKE_PEAK_FLOPS * share


def fake_bandwidth(share: float) -> float:
    """The fake GPU's copy bandwidth: saturates at half the SMs."""
    return FAKE_PEAK_BANDWIDTH * min(1.0, 2.0 * share)


def fake_profile(share: float) -> DeviceProfile:
    """A one-level profile of the fake GPU at ``share`` (for the fake GEMM timings)."""
    return DeviceProfile(FAKE_GPU, (SMLevel(share, fake_flops(share), fake_bandwidth(share)),))


def measure_level(m: Measure, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Child: matmul rate and copy bandwidth alone at this process's SM share."""
    pct = _share_from_env(env)
    if m.fake:
        share = pct / 100
        return {**_fake_info(), "pct": pct, "flops": fake_flops(share),
                "fp8_flops": FAKE_FP8_RATIO * fake_flops(share),
                "bandwidth": fake_bandwidth(share), "overhead_s": FAKE_OVERHEAD_S}
    info = _device_info()
    fn, args, flops = _matmul_case(m.matmul_n)
    rep = _timed(fn, args, m.warmup_s)
    matmul_s = min(rep() for _ in range(m.reps))
    del fn, args
    fp8_flops = None
    case = _fp8_matmul_case(m.matmul_n)
    if case is not None:
        fn, args, work = case
        rep = _timed(fn, args, m.warmup_s)
        fp8_flops = work / min(rep() for _ in range(m.reps))
        del fn, args, case
    fn, args, nbytes = _copy_case(m.copy_gib)
    rep = _timed(fn, args, m.warmup_s)
    copy_s = min(rep() for _ in range(m.reps))
    del fn, args
    return {**info, "pct": pct, "flops": flops / matmul_s, "fp8_flops": fp8_flops,
            "bandwidth": nbytes / copy_s,
            "matmul_s": matmul_s, "copy_s": copy_s, "overhead_s": _dispatch_overhead_s()}


def _wait_for_go(stdin: IO[str]) -> None:
    """Tell the parent we are set up, then block until it says go (EOF: it went away)."""
    print(json.dumps(READY), flush=True)
    if not stdin.readline():
        raise SystemExit("calibrate child: parent closed stdin before the start signal")


def measure_pair_client(m: Measure, role: str, partner_pct: int, stdin: IO[str] = sys.stdin,
                        env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Child: one client of an interference pair. Sets up, waits for the parent's start byte,
    then runs matmuls (role 'prefill') or copies (role 'decode') for ``window_s``; reports the
    median rate over the window and the window's wall-clock bounds."""
    pct = _share_from_env(env)
    key = "flops" if role == "prefill" else "bandwidth"
    if m.fake:
        _wait_for_go(stdin)
        start = time.time()
        time.sleep(m.window_s)
        share, partner = pct / 100, partner_pct / 100
        rate = (fake_flops(share) * (1 - FAKE_PREFILL_SLOWDOWN * partner) if role == "prefill"
                else fake_bandwidth(share) * (1 - FAKE_DECODE_SLOWDOWN * partner))
        return {**_fake_info(), "pct": pct, "role": role, key: rate, "reps": 1,
                "window_start": start, "window_end": time.time()}
    info = _device_info()
    fn, args, work = _matmul_case(m.matmul_n) if role == "prefill" else _copy_case(m.copy_gib)
    rep = _timed(fn, args, m.warmup_s)
    ready_s = round(time.monotonic() - _T0, 2)
    _wait_for_go(stdin)
    start = time.time()
    times = []
    while time.time() - start < m.window_s or not times:
        times.append(rep())
    return {**info, "pct": pct, "role": role, key: work / statistics.median(times),
            "reps": len(times), "window_start": start, "window_end": time.time(),
            "ready_s": ready_s}


def projections(shape: ModelShape) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of one layer's token-level GEMMs, as the roofline costs them."""
    d, d_q = shape.hidden_size, shape.num_heads * shape.head_dim
    d_kv, inter = shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    return [("qkv_proj", d, d_q + 2 * d_kv), ("o_proj", d_q, d), ("gate_up_proj", d, 2 * inter),
            ("down_proj", inter, d)]


def predicted_gemm_s_per_layer(shape: ModelShape, profile: DeviceProfile, share: float,
                               tokens: int) -> float:
    """The roofline's time of one layer's projection GEMMs at ``tokens`` rows (efficiency 1)."""
    base = dataclasses.replace(profile, efficiency=Efficiency())
    rows = Roofline(shape, base).breakdown([(tokens, 0)], share, num_logits=0).ops
    return sum(op.time_s for op in rows if op.op_class == "gemm") / shape.num_layers


def measure_gemm(m: Measure, shape: ModelShape, tokens: Sequence[int],
                 env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Child: seconds per layer of the model's projection GEMMs at each token count.

    One jitted call computes every projection of ``gemm_layers`` layers, each layer with its
    own weights and inputs (no operand shared across layers, so XLA cannot merge the layers'
    dots and the weights stream from HBM as in the model); calls are queued back to back."""
    pct = _share_from_env(env)
    layers = max(1, min(m.gemm_layers, shape.num_layers))
    if m.fake:
        profile = fake_profile(pct / 100)
        per_layer = [predicted_gemm_s_per_layer(shape, profile, pct / 100, n)
                     / FAKE_GEMM_EFFICIENCY for n in tokens]
        return {**_fake_info(), "pct": pct, "tokens": list(tokens), "layers": layers,
                "seconds_per_layer": per_layer}
    import jax
    import jax.numpy as jnp

    info = _device_info()
    projs = projections(shape)
    widths = sorted({d_in for _, d_in, _ in projs})
    key = jax.random.key(3)
    weights = []
    for _ in range(layers):
        layer = []
        for _, d_in, d_out in projs:
            key, sub = jax.random.split(key)
            layer.append(0.02 * jax.random.normal(sub, (d_out, d_in), jnp.bfloat16))
        weights.append(layer)

    @jax.jit
    def chain(inputs: list[dict[int, Any]], weights: list[list[Any]]) -> list[Any]:
        return [jnp.einsum("ti,oi->to", inputs[i][d_in], w)  # models/layers.py's Linear
                for i in range(layers) for (_, d_in, _), w in zip(projs, weights[i])]

    per_layer = []
    for n in tokens:
        inputs = []
        for _ in range(layers):
            key, *subs = jax.random.split(key, len(widths) + 1)
            inputs.append({w: jax.random.normal(s, (n, w), jnp.bfloat16)
                           for w, s in zip(widths, subs)})
        rep = _timed(chain, (inputs, weights), m.warmup_s)
        per_layer.append(min(rep() for _ in range(max(3, m.reps // 2))) / layers)
        del inputs
    return {**info, "pct": pct, "tokens": list(tokens), "layers": layers,
            "seconds_per_layer": per_layer}


def child_main(args: argparse.Namespace) -> int:
    """Entry point of a measurement child: one JSON line on stdout."""
    m = measure_from_args(args)
    if args.child == "level":
        result = measure_level(m)
    elif args.child == "pair":
        result = measure_pair_client(m, args.role, args.partner_pct)
    else:
        fields = json.loads(args.shape)
        fields["layer_windows"] = tuple(fields.get("layer_windows", ()))
        result = measure_gemm(m, ModelShape(**fields), args.gemm_tokens)
    result["child_s"] = round(time.monotonic() - _T0, 2)  # since import: what the child cost
    print(json.dumps(result), flush=True)
    return 0


# ============================================================== running children (parent side)

class Runner(Protocol):
    """Runs the measurements; ``SubprocessRunner`` in real use, anything alike in tests."""

    def level(self, env: Mapping[str, str]) -> dict[str, Any]: ...

    def pair(self, env_p: Mapping[str, str], env_d: Mapping[str, str], s_p: int, s_d: int
             ) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def gemm(self, env: Mapping[str, str], shape: ModelShape, tokens: Sequence[int]
             ) -> dict[str, Any]: ...


def _json_line(text: str, key: str) -> dict[str, Any]:
    """The last line of a child's stdout that is a JSON object holding ``key``."""
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and key in data:
                return data
    raise CalibrationError(f"child printed no result with {key!r}; stdout tail: {text[-500:]!r}")


def _tail(text: str, chars: int = 2000) -> str:
    return text[-chars:].strip() or "(empty)"


class _LineReader:
    """Reads a child's stdout lines on a thread, so the parent can wait with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed under us: the child was killed
            for line in stream:
                self.lines.put(line)
        self.lines.put(None)

    def json_with(self, key: str, deadline: float) -> dict[str, Any] | None:
        """The next JSON line holding ``key``; None at EOF; CalibrationError at the deadline."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CalibrationError(f"a pair child did not report {key!r} in time") from None
            if line is None:
                return None
            self.seen.append(line)
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and key in data:
                    return data


_children: set[subprocess.Popen[str]] = set()
"""Measurement children alive now (killed first on SIGINT/SIGTERM, see ``children_die_first``)."""


@contextlib.contextmanager
def _child(command: list[str], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """A child process that is killed (and reaped) when the block is left in any way."""
    proc: subprocess.Popen[str] = subprocess.Popen(command, **popen)
    _children.add(proc)
    try:
        yield proc
    finally:
        _children.discard(proc)
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        proc.wait()


def kill_children() -> None:
    """Kill every measurement child still running."""
    for proc in list(_children):
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def children_die_first() -> Iterator[None]:
    """While active, SIGINT/SIGTERM first kill the measurement children and then run the
    handler that was there before (mps.py's, which stops our daemon and re-raises): MPS's
    ``quit`` waits for its clients, so they must be gone first."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: types.FrameType | None) -> None:
        kill_children()
        prev = previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # The chain returned (SIGINT ignored in a background job, say): the children are gone,
        # so the run is over either way.
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


@dataclasses.dataclass
class SubprocessRunner:
    """Runs each measurement as ``sys.executable tools/calibrate.py --child ...``."""

    measure: Measure
    timeout_s: float = 300.0
    """Longest a child may take (CUDA start, compilation, measurement)."""
    script: Path = SCRIPT

    def command(self, child: str, *extra: str) -> list[str]:
        return [sys.executable, str(self.script), "--child", child, *self.measure.child_args(),
                *extra]

    def _run(self, command: list[str], env: Mapping[str, str], key: str) -> dict[str, Any]:
        with _child(command, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True) as proc:
            try:
                out, err = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise CalibrationError(f"child timed out after {self.timeout_s} s: "
                                       f"{shlex.join(command)}") from None
        if proc.returncode != 0:
            raise CalibrationError(f"child exited with {proc.returncode}: {shlex.join(command)}\n"
                                   f"--- its stderr ---\n{_tail(err)}")
        return _json_line(out, key)

    def level(self, env: Mapping[str, str]) -> dict[str, Any]:
        return self._run(self.command("level"), env, "flops")

    def gemm(self, env: Mapping[str, str], shape: ModelShape, tokens: Sequence[int]
             ) -> dict[str, Any]:
        command = self.command("gemm", "--shape", json.dumps(dataclasses.asdict(shape)),
                               "--gemm-tokens", ",".join(map(str, tokens)))
        return self._run(command, env, "seconds_per_layer")

    def pair(self, env_p: Mapping[str, str], env_d: Mapping[str, str], s_p: int, s_d: int
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Starts both clients, waits until both are set up, then releases them together."""
        specs = (("prefill", env_p, s_d, "flops"), ("decode", env_d, s_p, "bandwidth"))
        procs: list[subprocess.Popen[str]] = []
        errs: list[IO[str]] = []
        deadline = time.monotonic() + self.timeout_s
        with contextlib.ExitStack() as stack:
            for role, env, partner, _ in specs:
                err = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
                errs.append(err)
                procs.append(stack.enter_context(_child(
                    self.command("pair", "--role", role, "--partner-pct", str(partner)),
                    env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    text=True, bufsize=1)))
            readers = [_LineReader(p.stdout) for p in procs]  # type: ignore[arg-type]
            for reader, proc, err in zip(readers, procs, errs):
                if reader.json_with("ready", deadline) is None:
                    raise CalibrationError(self._failure(proc, err, "exited before it was ready"))
            for proc, err in zip(procs, errs):  # the barrier: both set up and warm, go together
                try:
                    proc.stdin.write("go\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                except OSError:
                    raise CalibrationError(self._failure(proc, err, "died before go")) from None
            results = []
            for (role, _, _, key), reader, proc, err in zip(specs, readers, procs, errs):
                result = reader.json_with(key, deadline)
                if result is None:
                    raise CalibrationError(self._failure(proc, err, f"({role}) gave no result"))
                results.append(result)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):  # killed on leaving
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            return results[0], results[1]

    @staticmethod
    def _failure(proc: subprocess.Popen[str], err: IO[str], what: str) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        err.seek(0)
        command = shlex.join(proc.args)  # type: ignore[arg-type]
        return (f"pair child {what} (exit {proc.poll()}): {command}\n"
                f"--- its stderr ---\n{_tail(err.read())}")


@dataclasses.dataclass
class InProcessRunner:
    """Calls the child measurement functions in this process (``--fake`` only: a real
    measurement needs a fresh process per SM share). For tests of the orchestration."""

    measure: Measure

    def level(self, env: Mapping[str, str]) -> dict[str, Any]:
        return measure_level(self.measure, env)

    def pair(self, env_p: Mapping[str, str], env_d: Mapping[str, str], s_p: int, s_d: int
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        with contextlib.redirect_stdout(io.StringIO()), ThreadPoolExecutor(2) as pool:
            p = pool.submit(measure_pair_client, self.measure, "prefill", s_d,
                            io.StringIO("go\n"), env_p)
            d = pool.submit(measure_pair_client, self.measure, "decode", s_p,
                            io.StringIO("go\n"), env_d)
            return p.result(), d.result()

    def gemm(self, env: Mapping[str, str], shape: ModelShape, tokens: Sequence[int]
             ) -> dict[str, Any]:
        return measure_gemm(self.measure, shape, tokens, env)


# ============================================================== MPS

class ClientEnvs(Protocol):
    """What calibration needs of an MPS daemon (``duetjax.duet.mps.MPSDaemon`` has it)."""

    def client_env(self, active_thread_percentage: int) -> dict[str, str]: ...


class FakeMPS:
    """--fake: a daemon that only hands out the SM percentage (nothing is started)."""

    pipe_dir = "(none: --fake)"

    def __enter__(self) -> "FakeMPS":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def client_env(self, active_thread_percentage: int) -> dict[str, str]:
        return {PCT_VAR: str(active_thread_percentage)}


@contextlib.contextmanager
def mps_session(enabled: bool = True,
                find: Callable[[], Any] = mps.find_running_daemon,
                start: Callable[[], Any] = mps.start_private_daemon,
                ) -> Iterator[tuple[ClientEnvs | None, str]]:
    """(daemon or None, what happened): a running daemon, else a private one that is stopped
    on leaving (``MPSDaemon`` is a context manager; mps.py also stops it at exit and on
    SIGINT/SIGTERM). None when MPS is off or cannot be had."""
    if not enabled:
        yield None, "MPS not used (--no-mps): only the 100 % level was measured, no pairs"
        return
    daemon = find()
    how = f"the running MPS daemon at {daemon.pipe_dir}" if daemon is not None else ""
    if daemon is None:
        try:
            daemon = start()
        except mps.MPSError as e:
            failure = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            failure = ""
        if failure:
            yield None, (f"MPS unavailable ({failure}): only the 100 % level was measured, no "
                         f"interference pairs")
            return
        how = f"a private MPS daemon started for this run at {daemon.pipe_dir} (stopped after)"
    with daemon:
        yield daemon, f"levels and pairs measured as clients of {how}"


def child_env(daemon: ClientEnvs | None, pct: int, xla_flags: str = "",
              base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment of a measurement child at ``pct`` % of the SMs; ``xla_flags`` go before the
    caller's own XLA_FLAGS (so the caller's win)."""
    env = dict(base)
    flags = f"{xla_flags} {env.get('XLA_FLAGS', '')}".strip()
    if flags:
        env["XLA_FLAGS"] = flags
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # two clients share the GPU's memory
    env.setdefault("PYTHONUNBUFFERED", "1")
    if daemon is None:
        env.pop(PCT_VAR, None)
    else:
        env.update(daemon.client_env(pct))
    return env


# ============================================================== turning results into a profile

@dataclasses.dataclass(frozen=True)
class PairResult:
    """One measured pair: raw rates, factors, and how well the two windows overlapped."""

    s_p: int
    s_d: int
    flops: float
    """Matmul rate of the prefill client while the copy client ran, FLOP/s."""
    bandwidth: float
    """Copy bandwidth of the decode client while the matmul client ran, bytes/s."""
    point: InterferencePoint
    overlap: float
    """Fraction of the shorter window during which both ran."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The profile and the raw numbers behind it (for the table)."""

    profile: DeviceProfile
    raw_levels: dict[int, dict[str, Any]]
    pairs: tuple[PairResult, ...]
    gemm: dict[str, Any] | None
    """Token counts, measured and predicted seconds per layer, per-count efficiency."""
    mps_note: str
    mps_used: bool


def build_levels(results: Mapping[int, Mapping[str, Any]]) -> tuple[tuple[SMLevel, ...],
                                                                     list[str]]:
    """SM levels from the level children, made non-decreasing in the share (the profile
    requires it: more SMs must never predict slower). Raised values are listed in notes."""
    levels, notes = [], []
    best_f = best_b = 0.0
    for pct in sorted(results):
        f, b = float(results[pct]["flops"]), float(results[pct]["bandwidth"])
        if f < best_f:
            notes.append(f"level {pct} %: measured {f / 1e12:.1f} TFLOP/s < a lower share's "
                         f"{best_f / 1e12:.1f}; raised to it (noise or saturation)")
        if b < best_b:
            notes.append(f"level {pct} %: measured {b / 1e12:.3f} TB/s < a lower share's "
                         f"{best_b / 1e12:.3f}; raised to it (noise or saturation)")
        best_f, best_b = max(best_f, f), max(best_b, b)
        levels.append(SMLevel(sm_share=pct / 100, flops=round(best_f, -9),
                              bandwidth=round(best_b, -9)))  # GFLOP/s, GB/s resolution
    return tuple(levels), notes


def fp8_ratio(results: Mapping[int, Mapping[str, Any]]) -> tuple[float | None, str]:
    """(the median over the levels of the FP8 matmul rate over the bf16 one, or None where no
    level measured FP8; a note for the profile)."""
    ratios = {pct: float(r["fp8_flops"]) / float(r["flops"]) for pct, r in sorted(results.items())
              if r.get("fp8_flops")}
    if not ratios:
        return None, ("fp8_flops_ratio = 2.0, the Hopper datasheet's: not measured (no level "
                      "measured an FP8 matmul: the GPU has no FP8 tensor cores)")
    ratio = round(statistics.median(ratios.values()), 3)
    return ratio, (f"fp8_flops_ratio = {ratio:g}: median over the levels of an e4m3 matmul's "
                   "rate (the levels' size, bf16 out) over the bf16 one; per level: "
                   + ", ".join(f"{pct} % {r:.3f}" for pct, r in ratios.items()))


def window_overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Fraction of the shorter timed window during which both clients were measuring."""
    both = min(a["window_end"], b["window_end"]) - max(a["window_start"], b["window_start"])
    shorter = min(a["window_end"] - a["window_start"], b["window_end"] - b["window_start"])
    return max(0.0, min(1.0, both / shorter)) if shorter > 0 else 0.0


def interference_point(alone: DeviceProfile, s_p: int, s_d: int, flops: float,
                       bandwidth: float) -> InterferencePoint:
    """Factors of one pair: together / alone, alone being the profile's rate at that share.
    Each client's unmeasured factor is set to its measured one (profile convention)."""
    rate = round(flops / alone.flops_at(s_p / 100), 4)
    bw = round(bandwidth / alone.bandwidth_at(s_d / 100), 4)
    return InterferencePoint(s_p=s_p / 100, s_d=s_d / 100, prefill_rate=rate,
                             prefill_bandwidth=rate, decode_rate=bw, decode_bandwidth=bw)


def fit_gemm_efficiency(shape: ModelShape, profile: DeviceProfile, share: float,
                        tokens: Sequence[int], measured_s: Sequence[float]
                        ) -> tuple[float, list[float], list[float]]:
    """(efficiency.gemm, predicted seconds per layer, per-count ratio predicted/measured).

    The roofline's time is t_pred / e, so the least-squares fit of log times gives log e =
    mean(log(t_pred / t_meas)); capped at 1 (faster than measured levels: the levels are the
    ceiling the profile states)."""
    predicted = [predicted_gemm_s_per_layer(shape, profile, share, n) for n in tokens]
    ratios = [p / t for p, t in zip(predicted, measured_s)]
    fit = math.exp(statistics.fmean(math.log(r) for r in ratios))
    return min(1.0, round(fit, 4)), predicted, ratios


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure."""

    levels: tuple[int, ...] = DEFAULT_LEVELS
    pairs: tuple[tuple[int, int], ...] = DEFAULT_PAIRS
    shape: ModelShape | None = None
    model_name: str = ""
    gemm_tokens: tuple[int, ...] = DEFAULT_GEMM_TOKENS
    measure: Measure = Measure()


def _one(results: Sequence[Mapping[str, Any]], key: str) -> str:
    values = sorted({str(r[key]) for r in results})
    if len(values) != 1:
        raise CalibrationError(f"children disagree on {key}: {values} (several GPUs visible? "
                               f"set CUDA_VISIBLE_DEVICES)")
    return values[0]


def calibrate(plan: Plan, runner: Runner, daemon: ClientEnvs | None, mps_note: str,
              command_line: str = "", now: datetime.datetime | None = None) -> Calibration:
    """Runs every measurement through ``runner`` and builds the profile."""
    m = plan.measure
    levels = plan.levels if daemon is not None else (100,)
    pairs = plan.pairs if daemon is not None else ()
    if daemon is None:
        log(f"WARNING: {mps_note}")
    raw: dict[int, dict[str, Any]] = {}
    for pct in levels:
        started = time.monotonic()
        raw[pct] = runner.level(child_env(daemon, pct, m.level_xla_flags))
        detail = (f"; jax/CUDA up after {raw[pct]['init_s']:.1f} s" if "init_s" in raw[pct]
                  else "")
        log(f"level {pct:3d} %: {raw[pct]['flops'] / 1e12:7.1f} TFLOP/s  "
            f"{raw[pct]['bandwidth'] / 1e12:5.2f} TB/s  ({time.monotonic() - started:.1f} s"
            f"{detail})")
    gpu = _one(list(raw.values()), "device_kind")
    jax_version = _one(list(raw.values()), "jax_version")
    sm_levels, level_notes = build_levels(raw)
    alone = DeviceProfile(gpu, sm_levels)

    pair_results = []
    for s_p, s_d in pairs:
        started = time.monotonic()
        p, d = runner.pair(child_env(daemon, s_p, m.level_xla_flags),
                           child_env(daemon, s_d, m.level_xla_flags), s_p, s_d)
        point = interference_point(alone, s_p, s_d, p["flops"], d["bandwidth"])
        result = PairResult(s_p, s_d, p["flops"], d["bandwidth"], point, window_overlap(p, d))
        pair_results.append(result)
        log(f"pair {s_p}/{s_d}: {p['flops'] / 1e12:.1f} TFLOP/s (x{point.prefill_rate:.3f}), "
            f"{d['bandwidth'] / 1e12:.2f} TB/s (x{point.decode_bandwidth:.3f}), windows overlap "
            f"{result.overlap:.0%}  ({time.monotonic() - started:.1f} s)")
        if result.overlap < 0.9:
            log(f"WARNING: pair {s_p}/{s_d}: the timed windows overlapped only "
                f"{result.overlap:.0%}")

    top = max(levels)
    efficiency, gemm, eff_notes = Efficiency(), None, []
    if plan.shape is not None:
        started = time.monotonic()
        g = runner.gemm(child_env(daemon, top), plan.shape, plan.gemm_tokens)
        fit, predicted, ratios = fit_gemm_efficiency(plan.shape, alone, top / 100,
                                                     g["tokens"], g["seconds_per_layer"])
        gemm = {"tokens": g["tokens"], "measured_s": g["seconds_per_layer"],
                "predicted_s": predicted, "ratios": ratios, "layers": g["layers"]}
        efficiency = Efficiency(gemm=fit)
        log(f"gemm efficiency of {plan.model_name} at {top} %: {fit:g}  "
            f"({time.monotonic() - started:.1f} s)")
        eff_notes.append(
            f"efficiency.gemm = {fit:g}: geometric mean over token counts of roofline-predicted "
            f"/ measured time of {plan.model_name}'s q/k/v/o/gate/up/down projections "
            f"(XLA einsum, bf16, {g['layers']} layers of distinct weights, at {top} % SMs); "
            "per count: " + ", ".join(f"{n} tokens {r:.3f} ({t * 1e6:.0f} us/layer)" for n, r, t
                                      in zip(g["tokens"], ratios, g["seconds_per_layer"]))
            + ("; capped at 1" if fit >= 1.0 else ""))
    else:
        eff_notes.append("efficiency.gemm = 1: not fitted (no --model-config)")
    eff_notes.append("efficiency.attention and efficiency.elementwise = 1: not measured here; "
                     "engine-level calibration (predicted vs measured iteration times) refines "
                     "them")

    overhead = float(raw[top]["overhead_s"])
    notes = [f"MPS: {mps_note}.",
             f"levels: sm_share = CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100; flops = bf16 "
             f"{m.matmul_n}^3 matmul through jax.jit (XLA_FLAGS {m.level_xla_flags or 'default'}"
             f"), best of {m.reps} after warm-up; bandwidth "
             f"= elementwise a + 1 over a {m.copy_gib:g} GiB uint32 array through jax.jit "
             f"(read + write counted), best of {m.reps}; one fresh process per level.",
             *level_notes]
    if pair_results:
        notes += [
            "interference: prefill_rate = concurrent matmul rate / alone rate at s_p; "
            "decode_bandwidth = concurrent copy bandwidth / alone bandwidth at s_d; alone rates "
            "are the levels above (interpolated where a share was not measured); concurrent "
            f"rates are the median over a {m.window_s:g} s window that both clients start on "
            "one signal.",
            "Only one resource of each client was measured; the other factor of the same client "
            "is set equal to the measured one (assumption: a contended client is slowed in "
            "both).",
            "Raw concurrent measurements (s_p/s_d: matmul TFLOP/s + copy TB/s, window "
            "overlap): " + "; ".join(f"{r.s_p}/{r.s_d}: {r.flops / 1e12:.0f} + "
                                      f"{r.bandwidth / 1e12:.2f} ({r.overlap:.0%})"
                                      for r in pair_results) + "."]
        missing = sorted({s for r in pair_results for s in (r.s_p, r.s_d)} - set(levels))
        if missing:
            notes.append(f"alone rates at {missing} % were interpolated between measured levels")
    notes += eff_notes
    fp8_flops_ratio, fp8_note = fp8_ratio(raw)
    notes.append(fp8_note)
    notes.append(f"overhead_s: median dispatch-to-completion time of a tiny jitted call, "
                 f"{overhead * 1e6:.0f} us at {top} % SMs.")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    source = (f"tools/calibrate.py on {gpu}, {now:%Y-%m-%d %H:%M} UTC, jax {jax_version}"
              + (f": {command_line}" if command_line else ""))
    profile = DeviceProfile(gpu_name=gpu, levels=sm_levels, efficiency=efficiency,
                            overhead_s=round(overhead, 7),
                            interference=tuple(r.point for r in pair_results),
                            fp8_flops_ratio=fp8_flops_ratio or DeviceProfile.fp8_flops_ratio,
                            source=source, notes=tuple(notes))
    return Calibration(profile, raw, tuple(pair_results), gemm, mps_note, daemon is not None)


def markdown(cal: Calibration, written: Path | None) -> str:
    """A short markdown summary of the profile."""
    p = cal.profile
    lines = [f"## {p.gpu_name}: device profile", "", "| SM % | matmul TFLOP/s | copy TB/s |",
             "| ---: | ---: | ---: |"]
    lines += [f"| {lv.sm_share * 100:.0f} | {lv.flops / 1e12:.1f} | {lv.bandwidth / 1e12:.2f} |"
              for lv in p.levels]
    if cal.pairs:
        lines += ["", "| s_p / s_d | matmul TFLOP/s together (× alone) | copy TB/s together "
                      "(× alone) | overlap |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r.s_p} / {r.s_d} | {r.flops / 1e12:.1f} (×{r.point.prefill_rate:.3f}) | "
                  f"{r.bandwidth / 1e12:.2f} (×{r.point.decode_bandwidth:.3f}) | "
                  f"{r.overlap:.0%} |" for r in cal.pairs]
    e = p.efficiency
    lines += ["", f"efficiency: gemm {e.gemm:g}, attention {e.attention:g}, elementwise "
                  f"{e.elementwise:g}; overhead {p.overhead_s * 1e6:.0f} µs"]
    if cal.gemm:
        lines.append("gemm per layer (tokens: measured / predicted µs): " + ", ".join(
            f"{n}: {t * 1e6:.0f} / {q * 1e6:.0f}" for n, t, q in
            zip(cal.gemm["tokens"], cal.gemm["measured_s"], cal.gemm["predicted_s"])))
    if not cal.mps_used:
        lines.append(f"**{cal.mps_note}**")
    if written is not None:
        lines.append(f"written: {written}")
    return "\n".join(lines) + "\n"


def output_path(out: str | None, gpu_name: str) -> Path:
    """``out`` if it names a .json file, else ``out`` (default duetjax/perf/profiles) /
    <gpu>.json."""
    if out is not None and out.endswith(".json"):
        return Path(out)
    return Path(out or PROFILES_DIR) / f"{normalize_gpu_name(gpu_name)}.json"


# ============================================================== command line

def measure_from_args(args: argparse.Namespace) -> Measure:
    return Measure(matmul_n=args.matmul_n, copy_gib=args.copy_gib, reps=args.reps,
                   warmup_s=args.warmup_s, window_s=args.window_s, gemm_layers=args.gemm_layers,
                   level_xla_flags=args.level_xla_flags, fake=args.fake)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=parse_levels, default=DEFAULT_LEVELS,
                   help="SM percentages to measure alone (default %(default)s)")
    p.add_argument("--pairs", type=parse_pairs, default=DEFAULT_PAIRS,
                   help="s_p/s_d pairs to measure together, e.g. 80/20,50/50; 'none' for none")
    p.add_argument("--model-config", help="HF config dir (or shipped name, e.g. llama-3-8b): "
                                          "fit efficiency.gemm on its projection shapes")
    p.add_argument("--gemm-tokens", type=parse_tokens, default=DEFAULT_GEMM_TOKENS,
                   help="token counts of the GEMM timing (default %(default)s)")
    p.add_argument("--gemm-layers", type=int, default=8,
                   help="layers of distinct weights in the GEMM timing (default %(default)s)")
    p.add_argument("--out", help="output directory (file named after the GPU) or .json path; "
                                 "default duetjax/perf/profiles (with --fake: print only)")
    p.add_argument("--no-mps", action="store_true",
                   help="do not use MPS: measure the 100 %% level only")
    p.add_argument("--fake", "--dry-run", action="store_true",
                   help="simulate a GPU and an MPS daemon in the children (CPU tests)")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup-s", type=float, default=0.3)
    p.add_argument("--window-s", type=float, default=3.0,
                   help="length of a pair's concurrent timed window (default %(default)s)")
    p.add_argument("--level-xla-flags", default=LEVEL_XLA_FLAGS,
                   help="XLA_FLAGS for the level and pair children (default %(default)s: "
                        "cuBLAS, no slow Triton autotuning); '' for XLA's defaults")
    p.add_argument("--child-timeout", type=float, default=300.0,
                   help="seconds a measurement child may take (default %(default)s)")
    # internal: a measurement child
    p.add_argument("--child", choices=("level", "pair", "gemm"), help=argparse.SUPPRESS)
    p.add_argument("--role", choices=("prefill", "decode"), help=argparse.SUPPRESS)
    p.add_argument("--partner-pct", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child == "pair" and args.role is None:
        parser.error("--child pair needs --role")
    if args.child == "gemm" and args.shape is None:
        parser.error("--child gemm needs --shape")
    if args.child:
        return child_main(args)
    shape, model_name = (load_model_shape(args.model_config) if args.model_config
                         else (None, ""))
    measure = measure_from_args(args)
    plan = Plan(levels=args.levels, pairs=args.pairs, shape=shape, model_name=model_name,
                gemm_tokens=args.gemm_tokens, measure=measure)
    runner = SubprocessRunner(measure, timeout_s=args.child_timeout)
    command_line = shlex.join(["python", "tools/calibrate.py", *argv])
    if args.fake:
        session = mps_session(not args.no_mps, find=lambda: None, start=FakeMPS)
    else:
        session = mps_session(not args.no_mps)
    started = time.monotonic()
    try:
        with session as (daemon, note), children_die_first():
            cal = calibrate(plan, runner, daemon, note, command_line)
    except CalibrationError as e:
        log(f"calibration failed: {e}")
        return 1
    except KeyboardInterrupt:
        log("calibration interrupted: measurement children killed, MPS daemon stopped if ours")
        return 130
    log(f"calibration took {time.monotonic() - started:.0f} s")
    written = None
    if args.fake and args.out is None:
        print(cal.profile.to_json(), end="")
    else:
        written = output_path(args.out, cal.profile.gpu_name)
        written.parent.mkdir(parents=True, exist_ok=True)
        cal.profile.save(written)
        DeviceProfile.from_json(written)  # what we wrote reads back
    print(markdown(cal, written), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
