"""Attention-aware roofline model: predicted iteration time from the batch composition.

DuetServe decides every scheduling iteration whether the mixed (aggregated) batch would miss the
time-between-tokens SLO, and if so how to split the SMs. That decision needs a latency estimate
that is cheap (plain Python, no device, no jax import) and that sees what a token count alone
hides: attention cost depends on each request's cached context, not on the batch's token total.

Every op costs ``max(F / Π(S), B / BW(S)) / efficiency`` where Π(S) and BW(S) are the compute
rate and HBM bandwidth *measured* at SM share S (under MPS they are not proportional to S: a copy
saturates HBM at about half the SMs, a matmul scales linearly). Token-level ops (projections, MLP,
norms) depend on the total new tokens n; attention is costed per request from its q new and c
cached tokens and summed; the LM head runs only on the rows that produce logits.

FLOP counting of attention: we count what a causal, block-skipping kernel computes. New token j
(0-based) of a request with c cached tokens attends to ``c + j + 1`` keys; QKᵀ and PV each cost
2·d_h FLOPs per (query, key) pair per query head, so ``F_attn = 4·h_q·d_h·Σ_j keys_j =
4·h_q·d_h·(q·c + q(q+1)/2)``. For a decode step (q = 1) this equals the DuetServe paper's
``4·h_q·q·(q+c)·d_h``; for a prefill chunk it counts the causal half of the new×new block instead
of the whole square. Softmax FLOPs and the waste on diagonal blocks are left to the attention
efficiency factor. Sliding-window layers cap each query's keys at the window.

Padding: an engine runs every step padded to a compiled bucket (``step_inputs``), so with a
``StepPadding`` the token-level ops cost the bucket's token count and the LM head its rows; a
step of 1,100 tokens runs (and costs) 2,048. Padded rows attend to nothing.

Critical path of attention: an attention kernel is a grid of programs (thread blocks), and it
lasts at least as long as its longest program, which runs on one SM at a slot's share of the
rates (``DeviceProfile.program_slots`` for the decode kernel, ``prefill_program_slots`` for the
prefill kernel, whose programs stream keys about four times slower). A decode program walks one
sequence's keys for one KV head (a 1/splits share of them under split-K); a prefill program,
``block_m`` query rows of one chunk over all the keys its last token sees. This term is added
per layer to the summed roofline times (the bound of greedy scheduling: work / rate + longest
program). Without it, decode steps whose bucket changes the kernel's split-K and short chunks
after long cached prefixes (a few dozen programs for all the SMs) were mispredicted most
(docs/design.md, "Measured facts").

Not modelled (small next to the ops above, or absorbed by calibration): rotary embeddings,
residual adds, biases, sampling; the KV write is the k/v projections' output. Tensor-parallel
all-reduce is not modelled yet (duetjax runs one GPU).
"""
from __future__ import annotations

import dataclasses
import json
import re
from bisect import bisect_left
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # only for the annotation: importing ``models`` at runtime pulls in jax
    from models.config import ModelConfig

PROFILES_DIR = Path(__file__).parent / "profiles"
"""Where the device profiles shipped with duetjax live (package data)."""

OP_CLASSES = ("gemm", "attention", "elementwise")
"""Op classes that carry their own efficiency factor."""

SPAN_CLASSES = ("decode_span", "prefill_span")
"""Classes of the attention kernels' critical paths (``DeviceProfile.program_slots`` and
``prefill_program_slots``)."""

NORM_FLOPS_PER_ELEMENT = 4
"""RMSNorm: square, accumulate, scale by the reciprocal root, multiply by the weight."""

ACT_FLOPS_PER_ELEMENT = 5
"""Gated activation act(gate)·up: about four for SiLU/GELU-tanh plus the product."""


@dataclasses.dataclass(frozen=True)
class SMLevel:
    """Measured rates of one MPS client alone at one SM share."""

    sm_share: float
    """Fraction of the SMs the client may use (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` / 100)."""
    flops: float
    """Dense bf16 matmul rate at this share, FLOP/s (Π(S))."""
    bandwidth: float
    """HBM copy bandwidth at this share, bytes/s, read + write counted (BW(S))."""


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fraction of the measured roofline an op class reaches, in (0, 1].

    The levels are measured with a large matmul and a large copy; real kernels reach less
    (our paged decode attention, small GEMMs). Calibration fits these; 1 means "as measured".
    """

    gemm: float = 1.0
    """Projections, MLP and LM head."""
    attention: float = 1.0
    """The attention kernel (prefill and decode)."""
    elementwise: float = 1.0
    """Norms, the gated activation, the embedding gather."""

    def of(self, op_class: str) -> float:
        """The factor of one of ``OP_CLASSES``."""
        return getattr(self, op_class)


@dataclasses.dataclass(frozen=True)
class InterferencePoint:
    """Slowdown of a prefill client and a decode client running at once at (s_p, s_d).

    Each factor multiplies the rate that the client would have *alone* at its share: co-running
    clients contend for HBM and L2 (on an H200, a copy client at 30 % kept 78 % of its bandwidth
    next to a matmul client at 70 %: docs/design.md, "Measured facts").
    """

    s_p: float
    """SM share of the prefill client."""
    s_d: float
    """SM share of the decode client."""
    prefill_rate: float = 1.0
    """Multiplier on Π(s_p) of the prefill client."""
    prefill_bandwidth: float = 1.0
    """Multiplier on BW(s_p) of the prefill client."""
    decode_rate: float = 1.0
    """Multiplier on Π(s_d) of the decode client."""
    decode_bandwidth: float = 1.0
    """Multiplier on BW(s_d) of the decode client."""


NO_INTERFERENCE = InterferencePoint(s_p=1.0, s_d=1.0)
"""What a profile without interference measurements assumes: none."""


def normalize_gpu_name(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': how profile files are named and GPU names are matched."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What the roofline model knows about one GPU: measured rates per SM share, and more."""

    gpu_name: str
    """Device kind as JAX reports it (``jax.devices()[0].device_kind``), e.g. 'NVIDIA H200'."""
    levels: tuple[SMLevel, ...]
    """Measured SM levels, sorted by share; rates are interpolated linearly between them,
    proportionally to the share below the lowest (compute and bandwidth both vanish at zero
    SMs) and held at the highest level above it."""
    efficiency: Efficiency = Efficiency()
    """Per op class fraction of the roofline reached."""
    overhead_s: float = 0.0
    """Fixed time per iteration (executable launch, host work), seconds."""
    program_slots: float = 0.0
    """Attention programs that share the device's rates at once, about its SM count (fitted by
    tools/roofline_fit.py: 89 on an H200 with 132 SMs). An attention kernel lasts at least as
    long as its longest program, which gets 1/program_slots of the rates. 0: not modelled.
    This is the decode kernel's; ``prefill_program_slots`` is the prefill kernel's."""
    prefill_program_slots: float = 0.0
    """``program_slots`` of the prefill kernel (fitted: 345 on an H200: a prefill program
    streams keys at about a quarter of a decode program's rate). 0: not modelled."""
    interference: tuple[InterferencePoint, ...] = ()
    """Measured co-running pairs; empty: clients do not slow each other down."""
    fp8_flops_ratio: float = 2.0
    """FP8 (e4m3) matmul rate over the bf16 one of ``levels``, at every share: the rate of the
    W8A8 GEMMs of FP8 weights. ``tools/calibrate.py`` measures it where the GPU has FP8 tensor
    cores; 2.0 (the Hopper datasheet's dense FP8 over dense bf16) in profiles measured before."""
    source: str = ""
    """Where the numbers come from (measurement, date, tool)."""
    notes: tuple[str, ...] = ()
    """How derived numbers were derived, assumptions, hints for calibration."""

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a device profile needs at least one SM level")
        shares = [lv.sm_share for lv in self.levels]
        if any(not 0 < s <= 1 for s in shares) or shares != sorted(set(shares)):
            raise ValueError(f"SM levels must be distinct shares in (0, 1], sorted: {shares}")
        for name in ("flops", "bandwidth"):
            values = [getattr(lv, name) for lv in self.levels]
            if any(v <= 0 for v in values) or values != sorted(values):
                # Monotone levels make "more SMs is never slower" hold for every prediction.
                raise ValueError(f"{name} must be positive and non-decreasing in the SM share: {values}")
        for op_class in OP_CLASSES:
            if not 0 < self.efficiency.of(op_class) <= 1:
                raise ValueError(f"efficiency.{op_class} must be in (0, 1]")
        if self.overhead_s < 0:
            raise ValueError("overhead_s must be >= 0")
        for name in ("program_slots", "prefill_program_slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for p in self.interference:
            if min(p.prefill_rate, p.prefill_bandwidth, p.decode_rate, p.decode_bandwidth) <= 0:
                raise ValueError(f"interference factors must be positive: {p}")

    def flops_at(self, sm_share: float) -> float:
        """Π(S): compute rate at SM share ``sm_share``, FLOP/s."""
        return self._interpolate(sm_share, [lv.flops for lv in self.levels])

    def bandwidth_at(self, sm_share: float) -> float:
        """BW(S): HBM bandwidth at SM share ``sm_share``, bytes/s."""
        return self._interpolate(sm_share, [lv.bandwidth for lv in self.levels])

    def _interpolate(self, sm_share: float, values: Sequence[float]) -> float:
        if not 0 < sm_share <= 1:
            raise ValueError(f"SM share must be in (0, 1], got {sm_share}")
        shares = [lv.sm_share for lv in self.levels]
        i = bisect_left(shares, sm_share)
        if i < len(shares) and shares[i] == sm_share:
            return values[i]
        if i == 0:
            return values[0] * sm_share / shares[0]
        if i == len(shares):
            return values[-1]
        w = (sm_share - shares[i - 1]) / (shares[i] - shares[i - 1])
        return values[i - 1] + w * (values[i] - values[i - 1])

    def interference_at(self, s_p: float, s_d: float) -> InterferencePoint:
        """Slowdown factors of the pair (s_p, s_d).

        Pairs are grouped by total share (complementary pairs sum to 1; both clients at 100 %
        sum to 2) and interpolated linearly in s_d within a group, held at the group's ends.
        Without measurements: no slowdown. A total that no measured pair has is an error,
        because guessing would make split mode look better than it is.
        """
        if not self.interference:
            return NO_INTERFERENCE
        total = s_p + s_d
        group = sorted((p for p in self.interference if abs(p.s_p + p.s_d - total) < 1e-6),
                       key=lambda p: p.s_d)
        if not group:
            totals = sorted({round(p.s_p + p.s_d, 6) for p in self.interference})
            raise ValueError(f"no interference measurement for pairs with s_p + s_d = {total:g} "
                             f"in profile {self.gpu_name!r}; measured totals: {totals}")
        fields = ("prefill_rate", "prefill_bandwidth", "decode_rate", "decode_bandwidth")
        if s_d <= group[0].s_d:
            lo = hi = group[0]
        elif s_d >= group[-1].s_d:
            lo = hi = group[-1]
        else:
            j = next(j for j, p in enumerate(group) if p.s_d >= s_d)
            lo, hi = group[j - 1], group[j]
        w = 0.0 if hi.s_d == lo.s_d else (s_d - lo.s_d) / (hi.s_d - lo.s_d)
        return InterferencePoint(s_p=s_p, s_d=s_d, **{
            f: getattr(lo, f) + w * (getattr(hi, f) - getattr(lo, f)) for f in fields})

    # --- JSON ---

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the layout of the files in ``duetjax/perf/profiles``)."""
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        return data

    def to_json(self) -> str:
        """JSON text of the profile; ``from_json`` reads it back."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Writes ``to_json()`` to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceProfile":
        """Builds a profile from ``to_dict``'s layout."""
        return cls(
            gpu_name=data["gpu_name"],
            levels=tuple(SMLevel(**lv) for lv in data["levels"]),
            efficiency=Efficiency(**data.get("efficiency", {})),
            overhead_s=float(data.get("overhead_s", 0.0)),
            program_slots=float(data.get("program_slots", 0.0)),
            prefill_program_slots=float(data.get("prefill_program_slots", 0.0)),
            interference=tuple(InterferencePoint(**p) for p in data.get("interference", ())),
            fp8_flops_ratio=float(data.get("fp8_flops_ratio", 2.0)),
            source=data.get("source", ""),
            notes=tuple(data.get("notes", ())),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "DeviceProfile":
        """Reads a profile file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a device profile ({e!r})") from None


def load_profile(gpu_name: str, directory: str | Path | None = None) -> DeviceProfile:
    """The profile in ``directory`` (default: duetjax's own) whose ``gpu_name`` matches.

    Names match after normalisation (case, spaces and punctuation), and exactly otherwise:
    an 'H200 NVL' or an 'H100 PCIe' has other rates than its SXM sibling, so no prefix match.
    """
    directory = Path(directory) if directory is not None else PROFILES_DIR
    wanted = normalize_gpu_name(gpu_name)
    available = []
    for path in sorted(directory.glob("*.json")):
        profile = DeviceProfile.from_json(path)
        if normalize_gpu_name(profile.gpu_name) == wanted:
            return profile
        available.append(f"{profile.gpu_name!r} ({path.name})")
    raise LookupError(
        f"no device profile for GPU {gpu_name!r} in {directory}; available: "
        f"{', '.join(available) or 'none'}. Measure one (tools/calibrate.py) or pass a profile.")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that the cost model needs (nothing about weights or rope)."""

    num_layers: int
    """Decoder layers."""
    hidden_size: int
    """Width of the residual stream (d)."""
    intermediate_size: int
    """Width of the gated MLP."""
    num_heads: int
    """Query heads (h_q)."""
    num_kv_heads: int
    """Key/value heads (h_kv)."""
    head_dim: int
    """Width of one head (d_h)."""
    vocab_size: int
    """Rows of the LM head."""
    dtype_bytes: int = 2
    """Bytes per element of weights, activations and KV (s): 2 for bf16."""
    linear_weight_bytes: float | None = None
    """Bytes per weight of the decoder layers' linear layers (q/k/v, o, gate/up, down), their
    scales included: 1 + 4 / in_features for FP8 with a float32 scale per output channel,
    rounded here to 1 (the scales are 0.1 % of an 8B model's weights). None: ``dtype_bytes``.
    The embedding and the LM head stay at ``dtype_bytes``."""
    kv_dtype_bytes: int | None = None
    """Bytes per element of the KV cache: 1 for an FP8 (e4m3) pool, whose per-layer scales are
    negligible. None: ``dtype_bytes``. Decode attention reads every cached key and value once,
    so this halves its bytes."""
    fp8_matmul: bool = False
    """The decoder layers' linear layers multiply in FP8 (W8A8): their FLOPs run at the
    profile's FP8 rate (``DeviceProfile.fp8_flops_ratio``); the LM head's stay bf16."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding table. Costs the same (the head reads vocab × d either
    way); kept so a shape describes its checkpoint fully."""
    qk_norm: bool = False
    """RMSNorm on queries and keys (Qwen3, Gemma 3): two more elementwise ops per layer."""
    sandwich_norm: bool = False
    """Norms after attention and after the MLP too (Gemma 2/3): four norms per layer, not two."""
    layer_windows: tuple[int, ...] = ()
    """Sliding window per layer (0: full attention); empty: every layer full."""

    def __post_init__(self) -> None:
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for "
                             f"{self.num_layers} layers")

    @property
    def kv_element_bytes(self) -> int:
        """Bytes of one cached K or V element."""
        return self.dtype_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes

    @classmethod
    def from_config(cls, cfg: "ModelConfig", dtype_bytes: int = 2,
                    quantization: Any = None, kv_dtype_bytes: int | None = None) -> "ModelShape":
        """The shape of a ``models.config.ModelConfig`` (read by attribute: no import needed),
        with FP8 linear layers when ``quantization`` (a ``models.quantization.Fp8Config``)
        is given and ``kv_dtype_bytes`` per cached element (None: ``dtype_bytes``)."""
        windows = tuple(cfg.layer_windows)
        fp8 = quantization is not None
        return cls(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
                   num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   vocab_size=cfg.vocab_size, dtype_bytes=dtype_bytes,
                   tie_word_embeddings=cfg.tie_word_embeddings, qk_norm=cfg.qk_norm,
                   sandwich_norm=cfg.sandwich_norm,
                   layer_windows=() if not any(windows) else windows,
                   linear_weight_bytes=1 if fp8 else None, kv_dtype_bytes=kv_dtype_bytes,
                   fp8_matmul=fp8 and quantization.activation == "dynamic")

    def window_counts(self) -> dict[int, int]:
        """Layers per attention window (0: full attention)."""
        counts: dict[int, int] = {}
        for w in self.layer_windows or (0,) * self.num_layers:
            counts[w] = counts.get(w, 0) + 1
        return counts


@dataclasses.dataclass(frozen=True)
class OpCost:
    """Predicted cost of one op, summed over the layers it appears in."""

    name: str
    """Op name, e.g. 'qkv_proj', 'attention', 'lm_head'."""
    op_class: str
    """One of ``OP_CLASSES``: which efficiency factor applies; or one of ``SPAN_CLASSES`` (no
    efficiency: the profile's program slots scale it)."""
    flops: float
    """Floating-point operations."""
    bytes: float
    """HBM bytes moved (read + write)."""
    compute_s: float
    """flops / (Π · efficiency): the time if compute bound."""
    memory_s: float
    """bytes / (BW · efficiency): the time if memory bound."""
    time_s: float
    """Predicted time: max(compute_s, memory_s), except attention, which takes that max per
    request and sums it (so long prefills cannot hide the KV reads of decodes)."""

    @property
    def bound(self) -> str:
        """'compute' or 'memory': which roof limits this op."""
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclasses.dataclass(frozen=True)
class IterationBreakdown:
    """Per-op prediction of one iteration (for logs and for measuring the model's error)."""

    ops: tuple[OpCost, ...]
    """Every op, in execution order."""
    overhead_s: float
    """The profile's fixed per-iteration overhead."""
    sm_share: float
    """SM share the prediction assumes."""

    @property
    def total_s(self) -> float:
        """Predicted iteration time, seconds."""
        return sum(op.time_s for op in self.ops) + self.overhead_s

    def op(self, name: str) -> OpCost:
        """The op called ``name``."""
        return next(op for op in self.ops if op.name == name)


def _causal_keys(q: int, c: int, window: int) -> int:
    """Σ over the q new tokens of the keys each attends to: min(position, window) for the
    1-based positions c+1 .. c+q (window 0: unlimited)."""
    first, last = c + 1, c + q
    if window <= 0 or last <= window:
        return (first + last) * q // 2
    if first > window:
        return q * window
    return (first + window) * (window - first + 1) // 2 + (last - window) * window


def _keys_read(q: int, c: int, window: int) -> int:
    """Distinct cached + new keys the request's queries touch (each read once)."""
    return q + c if window <= 0 else min(q + c, window + q - 1)


DECODE_SPLITS = ((16, 32768, 64), (16, 16384, 32), (16, 4096, 16), (16, 1024, 8),
                 (64, 16384, 16), (64, 4096, 8), (64, 1024, 4),
                 (128, 8192, 4), (128, 2048, 2),
                 (512, 8192, 2))
"""Split-K of the decode kernel (``pallas_kernels.tuning``'s table; a test checks they agree):
(most programs, fewest keys, splits) rows; the first row whose program count (sequence rows ×
KV heads) is at most its first number and whose block table holds at least its second number
of keys gives the splits, no row: 1."""

PREFILL_BLOCK_ROWS = {64: 128, 128: 128, 256: 64}
"""(token, query head) rows of one prefill-kernel program by head dim (``pallas_kernels.tuning``,
checked by a test); other head dims take the 128 entry."""


def decode_splits(programs: int, max_context: int) -> int:
    """Programs per (sequence, KV head) of the decode kernel: ``DECODE_SPLITS``."""
    return next((splits for most, keys, splits in DECODE_SPLITS
                 if programs <= most and max_context >= keys), 1)


@dataclasses.dataclass(frozen=True)
class StepPadding:
    """How an engine pads a step to its compiled bucket (``step_inputs.plan_buckets``; a test
    checks the two agree): the roofline costs the shape that runs."""

    max_seqs: int
    """Sequence rows of the largest bucket (max_num_seqs rounded up to a power of two)."""
    min_tokens: int
    """Tokens of the smallest mixed (non-decode) bucket."""
    max_context: int = 0
    """Keys a sequence's block table holds (max_model_len rounded up to whole pages): the
    decode kernel's split-K depends on it. 0: unknown, taken as the longest context in the
    batch (the fewest splits the kernel can have)."""

    def padded(self, num_tokens: int, num_seqs: int, decode_only: bool) -> tuple[int, int]:
        """(tokens, LM-head rows) of the bucket that runs such a step."""
        if decode_only:
            rows = power_of_two(num_seqs)
            return rows, rows
        tokens = power_of_two(num_tokens, self.min_tokens)
        return tokens, min(tokens, self.max_seqs)


def power_of_two(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the bucket sizes (``step_inputs.bucket``)."""
    return 1 << (max(n, minimum, 1) - 1).bit_length()


_OpRow = tuple[str, str, float, float, float, float, float]
"""(name, op_class, flops, bytes, compute_s, memory_s, time_s): an ``OpCost`` before it is one."""


class Roofline:
    """Predicts iteration latency of a model on a device profile at an SM share.

    The optimizer calls it about ten times per scheduling iteration over the whole running
    batch, so the hot path works on plain tuples and sums, and decodes (q = 1) are costed in
    closed form when they all sit on the same side of the roofline ridge.
    """

    def __init__(self, shape: ModelShape, profile: DeviceProfile,
                 padding: StepPadding | None = None) -> None:
        self.shape = shape
        self.profile = profile
        self.padding = padding
        """None: cost the tokens as given (a kernel-level estimate, no buckets)."""
        self._window_counts = tuple(shape.window_counts().items())

    # --- predictions ---

    def predict(self, batch: Sequence[tuple[int, int]], sm_share: float = 1.0, *,
                num_logits: int | None = None) -> float:
        """Seconds for one iteration over ``batch`` = [(q new tokens, c cached tokens), ...].

        ``num_logits``: rows that go through the LM head; None: one per request (decodes and
        last prefill chunks). Pass fewer when some prefill chunks do not end their prompt.
        """
        decode_ctx, prefill = _split_batch(batch)
        return self._time(decode_ctx, prefill, sm_share, num_logits, 1.0, 1.0)

    def predict_decode(self, context_lens: Iterable[int], sm_share: float = 1.0) -> float:
        """One decode step: each request adds one token to ``context_len`` cached ones."""
        return self._time(list(context_lens), [], sm_share, None, 1.0, 1.0)

    def predict_mixed(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      sm_share: float = 1.0, *, num_logits: int | None = None) -> float:
        """One aggregated iteration: the prefill chunks and one step of every decode together
        (same as ``predict(prefill + [(1, c) for c in decode_context_lens])``)."""
        return self._time(list(decode_context_lens), list(prefill), sm_share,
                          num_logits, 1.0, 1.0)

    def predict_prefill(self, chunks: Sequence[tuple[int, int]], sm_share: float = 1.0, *,
                        num_logits: int | None = None) -> float:
        """A prefill batch of (chunk tokens, already cached tokens) per request."""
        return self.predict(chunks, sm_share, num_logits=num_logits)

    def predict_split(self, prefill: Sequence[tuple[int, int]], decode_context_lens: Sequence[int],
                      s_p: float, s_d: float, *,
                      num_logits: int | None = None) -> tuple[float, float]:
        """(t_p, t_d): prefill on an s_p client and one decode step on an s_d client, running
        at once, with the profile's interference factors of that pair."""
        slow = self.profile.interference_at(s_p, s_d)
        t_p = self._time([], list(prefill), s_p, num_logits, slow.prefill_rate,
                         slow.prefill_bandwidth)
        t_d = self._time(list(decode_context_lens), [], s_d, None, slow.decode_rate,
                         slow.decode_bandwidth)
        return t_p, t_d

    def breakdown(self, batch: Sequence[tuple[int, int]], sm_share: float = 1.0, *,
                  num_logits: int | None = None, rate_factor: float = 1.0,
                  bandwidth_factor: float = 1.0) -> IterationBreakdown:
        """Per-op prediction; ``rate_factor``/``bandwidth_factor`` scale Π and BW (interference)."""
        decode_ctx, prefill = _split_batch(batch)
        rows = self._rows(decode_ctx, prefill, sm_share, num_logits, rate_factor,
                          bandwidth_factor)
        return IterationBreakdown(tuple(OpCost(*row) for row in rows), self.profile.overhead_s,
                                  sm_share)

    # --- the model ---

    def _time(self, decode_ctx: list[int], prefill: list[tuple[int, int]], sm_share: float,
              num_logits: int | None, rate_factor: float, bandwidth_factor: float) -> float:
        rows = self._rows(decode_ctx, prefill, sm_share, num_logits, rate_factor, bandwidth_factor)
        return sum(row[6] for row in rows) + self.profile.overhead_s

    def _rows(self, decode_ctx: list[int], prefill: list[tuple[int, int]], sm_share: float,
              num_logits: int | None, rate_factor: float, bandwidth_factor: float) -> list[_OpRow]:
        """Every op of one iteration, in execution order: decodes (one new token on
        ``decode_ctx`` cached ones) and prefill chunks (q, c) together."""
        if any(q < 1 or c < 0 for q, c in prefill) or (decode_ctx and min(decode_ctx) < 0):
            raise ValueError("each request needs q >= 1 new and c >= 0 cached tokens")
        sh, s = self.shape, self.shape.dtype_bytes
        flops = self.profile.flops_at(sm_share) * rate_factor
        bandwidth = self.profile.bandwidth_at(sm_share) * bandwidth_factor
        eff = self.profile.efficiency
        layers = sh.num_layers
        n = len(decode_ctx) + sum(q for q, _ in prefill)
        seqs = len(decode_ctx) + len(prefill)
        m = seqs if num_logits is None else num_logits
        if not 0 <= m <= n:
            raise ValueError(f"num_logits must be in [0, {n}], got {num_logits}")
        if self.padding is not None and n:
            # the bucket's LM head runs on every row, whether or not its logits are sampled
            n, seqs = self.padding.padded(n, seqs, not prefill)
            m = seqs
        d, d_q, d_kv = sh.hidden_size, sh.num_heads * sh.head_dim, sh.num_kv_heads * sh.head_dim

        def cost(name: str, op_class: str, f: float, b: float, count: int,
                 rate: float = 1.0) -> _OpRow:
            """``rate``: the op's FLOP rate over the profile's bf16 one."""
            e = eff.of(op_class)
            f, b = f * count, b * count
            compute_s, memory_s = f / (flops * rate * e), b / (bandwidth * e)
            return name, op_class, f, b, compute_s, memory_s, max(compute_s, memory_s)

        w = s if sh.linear_weight_bytes is None else sh.linear_weight_bytes
        fp8_rate = self.profile.fp8_flops_ratio if sh.fp8_matmul else 1.0

        def linear(name: str, rows: int, d_in: int, d_out: int, count: int = layers) -> _OpRow:
            """A decoder layer's linear layer: its weight's bytes and FLOP rate are the
            quantization's."""
            return cost(name, "gemm", 2 * rows * d_in * d_out,
                        (rows * d_in + rows * d_out) * s + d_in * d_out * w, count, fp8_rate)

        def lm_head(rows: int) -> _OpRow:
            return cost("lm_head", "gemm", 2 * rows * sh.hidden_size * sh.vocab_size,
                        (rows * d + d * sh.vocab_size + rows * sh.vocab_size) * s, 1)

        def norm(name: str, elements: int, weight: int, count: int = layers) -> _OpRow:
            return cost(name, "elementwise", NORM_FLOPS_PER_ELEMENT * elements,
                        (2 * elements + weight) * s, count)

        ops = [cost("embed", "elementwise", 0, 2 * n * d * s, 1)]
        if n:
            ops.append(norm("attn_norm", n * d, d))
            ops.append(linear("qkv_proj", n, d, d_q + 2 * d_kv))  # fused, as the model runs it
            if sh.qk_norm:
                ops += [norm("q_norm", n * d_q, sh.head_dim), norm("k_norm", n * d_kv, sh.head_dim)]
            ops.append(self._attention(decode_ctx, prefill, flops, bandwidth))
            if self.profile.program_slots or self.profile.prefill_program_slots:
                ops += self._attention_spans(decode_ctx, prefill, seqs, flops / sm_share,
                                             bandwidth / sm_share)
            ops.append(linear("o_proj", n, d_q, d))
            if sh.sandwich_norm:
                ops.append(norm("post_attn_norm", n * d, d))
            ops.append(norm("mlp_norm", n * d, d))
            ops.append(linear("gate_up_proj", n, d, 2 * sh.intermediate_size))
            inter = n * sh.intermediate_size
            ops.append(cost("act", "elementwise", ACT_FLOPS_PER_ELEMENT * inter, 3 * inter * s, layers))
            ops.append(linear("down_proj", n, sh.intermediate_size, d))
            if sh.sandwich_norm:
                ops.append(norm("post_mlp_norm", n * d, d))
        if m:
            ops.append(norm("final_norm", m * d, d, count=1))
            ops.append(lm_head(m))
        return ops

    def _attention(self, decode_ctx: list[int], prefill: list[tuple[int, int]], flops: float,
                   bandwidth: float) -> _OpRow:
        """Attention over all layers: max(F/Π, B/BW) per request and window group, summed."""
        sh = self.shape
        e = self.profile.efficiency.attention
        inv_f, inv_b = 1.0 / (flops * e), 1.0 / (bandwidth * e)
        flops_per_key = 4 * sh.num_heads * sh.head_dim                  # QKᵀ and PV, per q head
        q_bytes = 2 * sh.num_heads * sh.head_dim * sh.dtype_bytes      # read Q, write O
        kv_bytes = 2 * sh.num_kv_heads * sh.head_dim * sh.kv_element_bytes  # read K and V
        total_f = total_b = 0
        time_s = 0.0
        for window, layers in self._window_counts:
            f_sum, b_sum, t = _decode_attention(decode_ctx, window, flops_per_key * inv_f,
                                                q_bytes, kv_bytes, inv_b)
            f_sum *= flops_per_key
            for q, c in prefill:
                f = _causal_keys(q, c, window) * flops_per_key
                b = q * q_bytes + _keys_read(q, c, window) * kv_bytes
                f_sum += f
                b_sum += b
                t += max(f * inv_f, b * inv_b)
            total_f += layers * f_sum
            total_b += layers * b_sum
            time_s += layers * t
        return ("attention", "attention", total_f, total_b, total_f * inv_f, total_b * inv_b,
                time_s)

    def _attention_spans(self, decode_ctx: list[int], prefill: list[tuple[int, int]], seqs: int,
                         flops_per_share: float, bandwidth_per_share: float) -> list[_OpRow]:
        """Critical paths of the attention kernels over all layers: per layer, the longest
        decode program and the longest prefill program (the kernels run one after the other),
        each at max(F, B) over 1/slots of the device's rates (``program_slots``,
        ``prefill_program_slots``). The rates are per unit of SM share: a program runs on one SM
        whatever share its client has.

        ``seqs``: sequence rows of the step, the decode kernel's batch (with padding, the
        bucket's: split-K is chosen from the compiled shape)."""
        sh, s = self.shape, self.shape.dtype_bytes
        group = sh.num_heads // sh.num_kv_heads
        kv_bytes = 2 * sh.head_dim * sh.kv_element_bytes  # K and V of one KV head, per key
        max_context = self.padding.max_context if self.padding is not None else 0
        if not max_context:
            max_context = max([c + 1 for c in decode_ctx] + [q + c for q, c in prefill])
        splits = decode_splits(seqs * sh.num_kv_heads, max_context)
        block_rows = PREFILL_BLOCK_ROWS.get(sh.head_dim, PREFILL_BLOCK_ROWS[128])
        block_tokens = max(1, block_rows // group)

        def longest_decode(window: int) -> tuple[int, int]:
            keys = -(-_keys_read(1, max(decode_ctx), window) // splits)
            return keys * 4 * sh.head_dim * group, keys * kv_bytes + 2 * group * sh.head_dim * s

        def longest_prefill(window: int) -> tuple[int, int]:
            # a chunk's last block of rows sees the most keys; masked rows still compute
            keys = max(_keys_read(min(q, block_tokens), c + q - min(q, block_tokens), window)
                       for q, c in prefill)
            return block_rows * keys * 4 * sh.head_dim, keys * kv_bytes + 2 * block_rows * sh.head_dim * s

        kernels = [("decode_span", self.profile.program_slots, longest_decode, decode_ctx),
                   ("prefill_span", self.profile.prefill_program_slots, longest_prefill, prefill)]
        rows = []
        for name, slots, longest, work in kernels:
            if not (work and slots):
                continue
            inv_f, inv_b = slots / flops_per_share, slots / bandwidth_per_share
            total_f = total_b = 0
            compute_s = memory_s = time_s = 0.0
            for window, layers in self._window_counts:
                f, b = longest(window)
                total_f += layers * f
                total_b += layers * b
                compute_s += layers * f * inv_f
                memory_s += layers * b * inv_b
                time_s += layers * max(f * inv_f, b * inv_b)
            rows.append((name, name, total_f, total_b, compute_s, memory_s, time_s))
        return rows


def _split_batch(batch: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """(contexts of the decodes, the other requests): decodes take the closed-form path."""
    return [c for q, c in batch if q == 1], [(q, c) for q, c in batch if q != 1]


def _decode_attention(contexts: list[int], window: int, time_per_key: float, q_bytes: int,
                      kv_bytes: int, inv_b: float) -> tuple[int, int, float]:
    """(keys, bytes, Σ per-request time) of one layer's decodes (q = 1) with these contexts.

    A decode attends to k = min(c + 1, window) keys: time max(k·a, (q_bytes + k·kv_bytes)·inv_b)
    with a = ``time_per_key``. Both terms are linear in k, so if the smallest and the largest k
    are on the same side of the ridge, every request is, and the sum has a closed form."""
    if not contexts:
        return 0, 0, 0.0
    lo, hi = min(contexts) + 1, max(contexts) + 1
    if window > 0 and hi > window:
        keys = [min(c + 1, window) for c in contexts]
        lo, hi, k_sum = min(lo, window), window, sum(keys)
    else:
        keys, k_sum = None, sum(contexts) + len(contexts)
    b_sum = len(contexts) * q_bytes + k_sum * kv_bytes

    def compute_bound(k: int) -> bool:
        return k * time_per_key >= (q_bytes + k * kv_bytes) * inv_b

    if compute_bound(lo) == compute_bound(hi):
        t = k_sum * time_per_key if compute_bound(lo) else b_sum * inv_b
    else:
        ks = keys if keys is not None else [c + 1 for c in contexts]
        t = sum(max(k * time_per_key, (q_bytes + k * kv_bytes) * inv_b) for k in ks)
    return k_sum, b_sum, t
