"""Engine configuration: frozen, with a docstring per field."""
from __future__ import annotations

import dataclasses


KV_CACHE_DTYPES = ("auto", "fp8")
LAYER_WEIGHTS = ("auto", "stacked", "per-layer")
KV_SCALES_NOT_IN_DUET = "runs in aggregated mode only: duet mode loads the weights on the host"
"""Values of ``EngineConfig.kv_cache_dtype`` (vLLM's names)."""

DEFAULT_DUET_TBT_SLO_MS = 50.0
"""The TBT SLO duet mode protects when ``tbt_slo_ms`` is not set."""


class ConfigError(ValueError):
    """An engine option that cannot work: ``option`` names its EngineConfig field (or Engine
    argument), so that a command line can name its flag instead (``flag``)."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem

    def __reduce__(self):  # (pickled by its fields: a replica process sends it to the front)
        return ConfigError, (self.option, self.problem)

    @property
    def flag(self) -> str:
        """The command-line flag of the option: ``--`` and its name with dashes."""
        return "--" + self.option.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches work and sizes its KV pool."""

    max_num_seqs: int = 64
    """Most sequences in one step (decode batch size bound)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (prefill chunks and decode tokens together)."""
    page_size: int = 16
    """Tokens per KV page."""
    max_model_len: int | None = None
    """Longest prompt + output; None: the model's max_position_embeddings, capped at
    ``cpu_max_model_len`` on CPU."""
    kv_cache_tokens: int | None = None
    """KV pool capacity in tokens; None: ``kv_cache_memory_fraction`` of free GPU memory, or
    ``cpu_kv_cache_tokens`` on CPU."""
    kv_cache_memory_fraction: float = 0.85
    """Share of the device memory left after the weights that the KV pool takes (GPU)."""
    cpu_kv_cache_tokens: int = 16384
    """Default KV capacity on CPU."""
    cpu_max_model_len: int = 8192
    """Default context cap on CPU."""
    enable_prefix_caching: bool = True
    """Share the KV pages of common prompt prefixes between requests (hashed full pages)."""
    decode_steps: int = 1
    """Decode steps per dispatch while every running request decodes and none waits (k > 1:
    one executable runs k steps, so the host works once per k tokens; a request arriving
    meanwhile waits up to k steps longer for its first token)."""
    max_decode_steps: int = 8
    """Largest k of a k-step decode (a power of two; executables exist for every power of two
    up to it, in duet mode's decode workers)."""
    scan_unroll: int | None = None
    """Decoder layers per iteration of the compiled layer loop over stacked layer weights
    (``layer_weights``; per-layer weights always unroll it). None: all of them on GPU (a
    rolled loop slices each layer's weights out of the stacked arrays with a copy, which
    doubled the decode step of Llama-3-8B on an H200), one on CPU (smallest executables)."""
    layer_weights: str = "auto"
    """How the decoder layers' weights are held: 'stacked' (one array per weight for all the
    layers, indexed in the layer loop) or 'per-layer' (arrays of its own for every layer, the
    loop unrolled: no layer's slice of a stack for XLA:GPU to copy out before a GEMM that cannot
    read it in place, as cuBLASLt's FP8 GEMM). The engine takes the loaded stacked weights apart
    at start-up (one stacked array's extra memory at a time), each layer split over a tensor-
    parallel group as its stack was. 'auto': per-layer for FP8 weights on GPUs (the W8A8
    decode step of Llama-3-8B on an H100 went from 8.6 to 4.2 ms at batch 1), else stacked
    (bf16 gains nothing from it)."""
    attention_impl: str = "auto"
    """'auto' (Pallas on GPU, reference on CPU), 'pallas', 'interpret' or 'reference'."""
    gemm_backend: str = "cublas"
    """How XLA:GPU runs the matrix products: 'cublas' (library calls; an unrolled Llama-3-8B
    step compiles in about 2 s on an H200) or 'triton' (XLA's autotuned Triton GEMM fusions,
    which fuse more epilogues: about 3 % faster decode at batch 64, but about 22 s of
    autotuning and compiling per 8B step shape). No effect on CPU."""
    compile_on_start: bool = True
    """Compile every batch bucket at start-up, so nothing compiles while serving; False
    compiles each bucket on first use instead (one-shot scripts)."""
    compilation_cache_dir: str | None = None
    """Persistent XLA compilation cache (warm starts skip compiling); None: ``<cache>/xla``
    under the duetjax cache directory; "" disables it."""
    compile_threads: int = 1
    """Buckets compiled at once at start-up (XLA compiles with the GIL released). XLA:CPU
    already spreads one compile over the cores (two threads gained nothing on a 2-core host);
    XLA:GPU compiles most of a module on one core, so a GPU host with many cores may start
    several times faster with more. Each compile in flight holds its own host memory."""
    mode: str = "aggregated"
    """'aggregated' (one mixed batch on the whole GPU), 'duet' (DuetServe: split prefill and
    decode onto MPS-limited worker processes whenever the aggregated step is predicted to miss
    the TBT SLO) or 'auto' (duet when MPS is usable, else aggregated)."""
    tbt_slo_ms: float | None = None
    """Time-between-tokens SLO, milliseconds. Aggregated mode: each iteration's token budget is
    the largest (up to ``max_num_batched_tokens``) whose mixed step the roofline predicts
    within it (``token_budget.py``; needs a device profile); None: the fixed budget. Duet mode
    protects it by splitting (None: ``DEFAULT_DUET_TBT_SLO_MS``)."""
    slo_min_prefill_tokens: int = 256
    """With ``tbt_slo_ms``: prefill tokens each mixed iteration gets at least, whatever the
    roofline predicts. Below what arrivals bring, the queue and time to first token grow
    without bound (a 16-token floor at a 25 ms SLO let Mooncake-like prompts wait 12 s on an
    H100, ``benchmarks/results/slo-budget-mooncake-h100-2026-12-06.md``)."""
    slo_ttft_ms: float | None = None
    """With ``tbt_slo_ms``: the time to first token the SLO-aware budget keeps pace for. Where
    the budget that fits the TBT SLO computes prompt tokens more slowly than the queue needs
    for each waiting prompt that can still be served within this time of its arrival (first
    come, first served), the smallest larger budget that keeps that pace is taken, even past
    the TBT SLO (``token_budget.queue_pace``); None: the TBT SLO and
    ``slo_min_prefill_tokens`` alone decide."""
    duet_pairs: tuple[tuple[int, int], ...] = ((80, 20), (70, 30), (60, 40), (50, 50))
    """(prefill %, decode %) SM shares of the worker pairs duet mode starts (one process per
    distinct share and role)."""
    duet_policy: str = "adaptive"
    """'adaptive' (DuetServe: split only when the aggregated step is predicted to miss the SLO,
    choosing the pair and k) or 'static' (split every iteration with both prefill and decode
    work at the first pair of ``duet_pairs``: the baseline)."""
    duet_online_correction: bool = True
    """Duet mode and the SLO-aware budget: scale the roofline's predictions by measured/predicted ratios learned from the
    iterations the engine runs (``correction.py``): the calibrated roofline alone
    underestimated real 8B iterations by 25-35 % on an H200."""
    duet_carry_stream: bool = False
    """A split iteration ends when its prefill chunk does: the decode stream's dispatch then
    running carries over into the next iteration, whose chunk launches without waiting for it.
    Off: the iteration ends with the first decode dispatch to finish after the chunk (the
    behaviour every committed GPU figure was measured with; this one is not measured yet)."""
    device_profile: str | None = None
    """Roofline profile JSON for duet mode; None: the shipped profile of this GPU model."""
    duet_worker_reserve_gib: float = 5.0
    """GPU memory left free for each duet worker's CUDA context, XLA workspace and compiling
    (autotuning allocates operands as large as the LM head's weight)."""
    seed: int = 0
    """Seeds the per-request seeds of requests that bring none."""
    quantization: str | None = None
    """'fp8': the decoder's linear layers hold FP8 (e4m3) weights with a float32 scale per
    output channel, quantized on the device as a high-precision checkpoint loads (an FP8
    checkpoint runs in FP8 whatever this says). Embeddings, norms and the LM head stay in
    ``dtype``. None: the checkpoint's own precision."""
    fp8_activation: str = "dynamic"
    """With FP8 weights: 'dynamic' quantizes each token's activations to e4m3 and runs the
    GEMMs in FP8 (W8A8); 'none' upcasts the weights inside the GEMMs (weight-only)."""
    kv_cache_dtype: str = "auto"
    """The KV cache's element type (vLLM's option): 'auto', the model's dtype; 'fp8', e4m3
    with float32 K and V scales per layer (or per KV head, where the checkpoint has them so):
    a byte per element, so the pool holds twice the tokens of bf16 in the same memory and a
    decode step reads half the KV bytes. The scales come from the checkpoint
    (compressed-tensors ``k_scale`` / ``v_scale``) when it has them, else 1.0, as in vLLM.
    1.0 is safe enough for bf16 models: e4m3 keeps the same 3-bit relative precision anywhere
    in [2^-6, 448], which covers typical key and value activations (a unit scale only clamps
    outliers beyond 448 and coarsens values below 2^-6, which weigh little in dot products).
    ``calculate_kv_scales`` computes them instead for a checkpoint without any."""
    calculate_kv_scales: bool = False
    """With an FP8 KV cache and a checkpoint that has no KV scales: compute each layer's K and
    V scale at start-up from the model's keys and values over a built-in text of prose, code,
    a table and a dialogue (``models.kv_calibration``: powers of two that map its largest
    magnitudes to at most a quarter of e4m3's range). Checkpoint scales are kept where present.
    Aggregated mode only (duet mode holds the weights on the host while loading)."""
    tensor_parallel_size: int = 1
    """GPUs of this host the model is split over, Megatron-style (``models.tensor_parallel``:
    heads, MLP features and vocabulary split, the KV pool by KV heads; one all-reduce after
    attention and one after the MLP per layer). 1: one device, no mesh. Aggregated mode only
    for now."""
    generation_config: str = "auto"
    """Where requests' default sampling comes from (vLLM's option): 'auto', the model's
    generation config (``sampling_defaults.py``); 'vllm', ``SamplingParams``' own defaults; or a
    directory holding a generation_config.json."""

    @property
    def duet_tbt_slo_ms(self) -> float:
        """The TBT SLO duet mode protects."""
        return self.tbt_slo_ms if self.tbt_slo_ms is not None else DEFAULT_DUET_TBT_SLO_MS

    @property
    def active_duet_pairs(self) -> tuple[tuple[int, int], ...]:
        """The pairs duet mode starts workers for: the static baseline uses only its first."""
        return self.duet_pairs[:1] if self.duet_policy == "static" else self.duet_pairs

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size",
                     "slo_min_prefill_tokens", "compile_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every running "
                             "sequence needs a token of budget per step)")
        if self.slo_ttft_ms is not None and not self.slo_ttft_ms > 0:
            raise ConfigError("slo_ttft_ms", f"must be > 0, got {self.slo_ttft_ms}")
        for name in ("decode_steps", "max_decode_steps"):
            k = getattr(self, name)
            if k < 1 or k & (k - 1):
                raise ConfigError(name, f"must be a power of two >= 1, got {k}")
        if self.decode_steps > self.max_decode_steps:
            raise ValueError(f"decode_steps {self.decode_steps} > max_decode_steps "
                             f"{self.max_decode_steps}")
        object.__setattr__(self, "duet_pairs", tuple(tuple(int(x) for x in pair)
                                                     for pair in self.duet_pairs))
        for pair in self.duet_pairs:
            if len(pair) != 2:
                raise ValueError(f"duet_pairs holds (prefill %, decode %) pairs, got {pair}")
            p, d = pair
            if not (0 < p <= 100 and 0 < d <= 100):
                raise ValueError(f"duet_pairs holds SM percentages in 1..100, got {(p, d)}")
        if self.duet_policy not in ("adaptive", "static"):
            raise ValueError(f"duet_policy must be 'adaptive' or 'static', got {self.duet_policy!r}")
        if self.quantization not in (None, "fp8"):
            raise ConfigError("quantization", f"must be 'fp8' or unset, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.fp8_activation not in ("dynamic", "none"):
            raise ConfigError("fp8_activation",
                              f"must be 'dynamic' or 'none', got {self.fp8_activation!r}")
        if self.calculate_kv_scales and self.mode == "duet":  # ('auto': checked once resolved)
            raise ConfigError("calculate_kv_scales", KV_SCALES_NOT_IN_DUET)
        if self.layer_weights not in LAYER_WEIGHTS:
            raise ConfigError("layer_weights", f"must be one of {', '.join(LAYER_WEIGHTS)}, "
                              f"got {self.layer_weights!r}")
        if self.gemm_backend not in ("cublas", "triton"):
            raise ValueError(f"gemm_backend must be 'cublas' or 'triton', got {self.gemm_backend!r}")
        if self.tbt_slo_ms is not None and not 0 < self.tbt_slo_ms < float("inf"):
            raise ConfigError("tbt_slo_ms", f"must be a number > 0 (or unset), got {self.tbt_slo_ms}")
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size",
                              f"must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.mode == "duet":
            raise ConfigError("tensor_parallel_size",
                              "> 1 does not run in duet mode yet (its worker processes hold one "
                              "GPU each): use mode='aggregated'")
        if self.tensor_parallel_size > 1 and self.tbt_slo_ms is not None:
            raise ConfigError("tensor_parallel_size",
                              "> 1 does not take tbt_slo_ms yet (the roofline models one GPU, "
                              "without the all-reduces)")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
