"""The model runner: owns the device state (``device_state.py``: weights, KV pool, penalty
counts and slot tables), the only writer of it, and the compiled steps.

One step runs the model over a ragged batch (prefill chunks and decode tokens together) and
samples on the device (``sampler.sample_basic``; a second, small executable runs the full
sampler over the step's logits when a request needs it, and another the prompt logprobs over
its hidden states, ``prompt_logprobs``); a k-step decode runs k decode steps in one executable
(a device loop that writes KV in place and feeds each step's tokens to the next). Inputs come
padded to a bucket (``step_inputs``) and every bucket is compiled at start-up, so nothing
compiles while serving.
Weights are arguments (not constants) and the KV pool and counts are donated, so XLA updates
them in place.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import pallas_kernels
from models import LoadedModel
from models.decoder import Decoder, unstack_layers
from models.quantization import FP8_DTYPE
from models.tensor_parallel import group_size, held_config, replicated

from ..compilation_cache import cache_counts
from ..config import EngineConfig
from ..sampling_params import SamplingParams
from ..structured_outputs import all_tokens_mask, token_mask_width
from . import prompt_logprobs
from .device_state import DeviceState, kv_dtype, kv_scales, plan_num_pages, shared_kv_bytes
from .prompt_logprobs import PromptChunk, PromptLogprobsInFlight
from .request import Request
from .sampler import (SampledTokens, SlotTables, apply_token_mask, fill_slot, needs_full_sampler,
                      sample_basic, sample_full, slot_row, wants_logprobs, with_logprobs)
from .scheduler import SchedulerOutput
from .shared_buffers import transport_dtype
from .shared_state import SharedLayout
from .step_inputs import (Bucket, LastDispatch, StepInputs, advanced, bucket, bucket_for,
                          build_inputs, continue_packed, layout_of, pack, plan_buckets, unpack,
                          unpack_on_device)

log = logging.getLogger(__name__)


class Samplers(NamedTuple):
    """The executables that run after a step over its logits, for one sequence bucket."""

    full: jax.stages.Compiled
    """``sample_full``: penalties, logit biases, top-k / top-p (replaces the step's tokens)."""
    logprobs: jax.stages.Compiled
    """``with_logprobs``: the sampled tokens' log-probabilities and the most likely tokens'."""
    masked: jax.stages.Compiled
    """Structured outputs: ``apply_token_mask``, then ``sample_basic`` on the masked logits
    (replaces the step's tokens; ``full`` then samples the masked logits where it runs)."""


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose results the host has not read yet."""

    batch: SchedulerOutput
    sampled: SampledTokens
    """Device arrays (futures): reading them waits for the step. A k-step decode's have a
    leading step axis."""
    last_tokens: jax.Array
    """int32[S_max]: each row's newest sampled token, which the next step reads on the device."""
    output_index: list[int | None] | None = None
    """Per row, the index in its request's output of the first token this dispatch samples
    (None: the row ends a prefill chunk, which samples nothing). Set by the engine at launch."""
    wants_logprobs: bool = True
    """Some row asked for log-probabilities: ``fetch`` reads them too."""
    finished_at_launch: int = 0
    """``Scheduler.num_finished`` at launch: while it stays, none of the rows has ended."""
    samples_constrained: bool = False
    """A row samples a structured-outputs token: the next step's mask needs it (set by the
    engine at launch)."""
    prompt_logprobs: PromptLogprobsInFlight | None = None
    """The prompt logprobs of the rows that compute prompt positions of requests asking for
    them (None: none does)."""

    def fetch(self) -> SampledTokens:
        """Waits for the step; host arrays with a leading step axis [k, n, ...], one column
        per scheduled request. Only the token ids leave the device unless a request asked for
        log-probabilities (the other fields are None then)."""
        n, k = len(self.batch.scheduled), self.batch.num_steps

        def take(a: jax.Array) -> np.ndarray:
            a = np.asarray(a)
            return a[None, :n] if k == 1 else a[:k, :n]

        if self.wants_logprobs:
            return jax.tree_util.tree_map(take, self.sampled)
        return SampledTokens(take(self.sampled.token_ids), None, None, None)


def uses_per_layer_weights(config: EngineConfig, model: LoadedModel) -> bool:
    """``config.layer_weights`` resolved for this model and backend ('auto': FP8 weights on
    GPUs, where a stacked layer's slice is copied out before every FP8 GEMM)."""
    if config.layer_weights != "auto":
        return config.layer_weights == "per-layer"
    return model.quantization is not None and jax.default_backend() == "gpu"


class ModelRunner:
    """Runs steps on this process's device, and holds its device state (``DeviceState``:
    weights, KV pool, penalty counts and slot tables), which only it writes. ``shared``: the
    state lives in buffers DuetServe's worker processes attach to (the engine's runner);
    ``attach``: the layout of those buffers (a worker's runner). With ``layer_weights``
    'per-layer' it takes ``model``'s stacked weights apart and frees them (``model.params`` is
    unusable afterwards; ``params`` holds the per-layer tree)."""

    def __init__(self, model: LoadedModel, config: EngineConfig, max_model_len: int, *,
                 num_pages: int | None = None, decode_steps: tuple[int, ...] | None = None,
                 shared: bool = False, attach: SharedLayout | None = None):
        self.config = config
        cfg = held_config(model.config, group_size(model.mesh))  # what the devices hold
        per_layer = uses_per_layer_weights(config, model)
        if per_layer and attach is None:  # (a worker attaches to the engine's per-layer arrays)
            model = dataclasses.replace(model, params=unstack_layers(model.params, cfg.num_layers,
                                                                     delete=True))
        self.mesh = model.mesh
        """The tensor-parallel group (None: one device)."""
        self.page_size = config.page_size
        self.max_pages_per_seq = -(-max_model_len // config.page_size)
        if num_pages is None:
            num_pages = plan_num_pages(model, config, shared_kv_bytes(model, config) if shared else None)
        self.num_pages = num_pages
        if self.num_pages < self.max_pages_per_seq:
            raise ValueError(
                f"the KV pool holds {self.num_pages * self.page_size} tokens, less than "
                f"max_model_len={max_model_len}; lower max_model_len or raise kv_cache_tokens")
        self.max_seqs = bucket(config.max_num_seqs)
        kv_pool_shape = pallas_kernels.kv_pool_shape(cfg.num_layers, self.num_pages,
                                                     cfg.num_kv_heads, self.page_size, cfg.head_dim)
        token_counts_shape = (config.max_num_seqs, cfg.vocab_size)
        if attach is not None:
            self.state = DeviceState.attach(attach)
        else:
            self.state = DeviceState.allocate(model.params, kv_pool_shape, kv_dtype(model, config),
                                              token_counts_shape, shared, model.mesh)
        self.model = dataclasses.replace(model, params=None) if self.state.shared else model
        """The model; in shared buffers its weights are the state's alone (one copy)."""
        self.writes_slots = self.state.owner
        """This process fills slot tables (``fill_slot``): the engine's, not a worker's."""
        self.computes_prompt_logprobs = self.state.owner
        """The engine's runner: duet workers never run prompt positions of a request that asks
        for prompt logprobs (iterations stay aggregated while one prefills)."""
        unroll = config.scan_unroll
        if unroll is None:
            unroll = cfg.num_layers if jax.default_backend() == "gpu" else 1
        self._decoder = Decoder(cfg, impl=config.attention_impl, dtype=model.dtype,
                                scan_unroll=unroll, quantization=model.quantization,
                                kv_scales=kv_scales(model, config), mesh=model.mesh,
                                per_layer_weights=per_layer)
        self.decode_steps = (config.decode_steps,) if decode_steps is None else decode_steps
        """The k values of its k-step decode executables (1: none)."""
        self._executables: dict[Bucket, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self.last_launch_seconds = 0.0
        """Host time of the last executable call (it blocks while the device queue is full)."""
        self._no_previous = jnp.zeros(self.max_seqs, jnp.int32)
        if self.mesh is not None:  # on every device of the group, as the steps' tokens are
            self._no_previous = jax.device_put(self._no_previous, replicated(self.mesh))
        self._last_dispatch = LastDispatch()
        """The last dispatch's packed inputs, which a steady decode's next one continues."""
        self._samplers: dict[int, Samplers] = {}
        """Sequence bucket -> its compiled ``Samplers``."""
        self._prompt_logprobs: dict[int, jax.stages.Compiled] = {}
        """Token bucket -> its compiled ``prompt_logprobs.compute``."""
        # Step inputs travel as one packed byte buffer (``step_inputs.pack``): one host-to-device
        # copy per step; each executable unpacks them with its bucket's static layout.
        self._jitted_step = jax.jit(self._step_fn, donate_argnums=(1,), static_argnames="layout")
        self._jitted_multi_step = jax.jit(self._multi_step_fn, donate_argnums=(1,),
                                          static_argnames=("layout", "num_steps"))
        self._jitted_full_sampler = jax.jit(self._full_sampler_fn, donate_argnums=(1,),
                                            static_argnames="layout")
        self._jitted_logprobs = jax.jit(with_logprobs)
        self._jitted_prompt_logprobs = jax.jit(self._prompt_logprobs_fn)
        self._jitted_masked_sampler = jax.jit(self._masked_sampler_fn, static_argnames="layout")
        self._jitted_fill_slot = jax.jit(self._fill_slot_fn, donate_argnums=(0,),
                                         static_argnames="layout")
        self._fill_slot_executable: jax.stages.Compiled | None = None

    @property
    def params(self) -> Any:
        """The weights (read-only: the state is written by the runner alone)."""
        return self.state.params

    @property
    def kv_pool(self) -> jax.Array:
        """The KV pool (read-only: the state is written by the runner alone)."""
        return self.state.kv_pool

    def compiled_buckets(self) -> list[Bucket]:
        """The step shapes compiled so far."""
        return list(self._executables)

    def compile_all(self, show_progress: bool = True, buckets: list[Bucket] | None = None) -> None:
        """Compiles every bucket (default: all the engine can run), and the full sampler for
        each of their sequence counts (from the persistent cache when it holds them)."""
        if buckets is None:
            buckets = plan_buckets(self.config, self.decode_steps)
        # This thread traces and lowers one bucket after another while the pool compiles those
        # already lowered (XLA releases the GIL).
        start = time.perf_counter()
        with ThreadPoolExecutor(self.config.compile_threads) as pool:
            compiling = {b: pool.submit(self._lower(b).compile,
                                        compiler_options=self._compiler_options)
                         for b in tqdm(buckets, desc="compile", disable=not show_progress)}
            for b, future in compiling.items():
                self._executables[b] = future.result()
        self.compile_seconds += time.perf_counter() - start
        for num_seqs in sorted({b.num_seqs for b in buckets}):
            self._compile_samplers(num_seqs)
        if self.computes_prompt_logprobs:
            for num_tokens in sorted({b.num_tokens for b in buckets if not b.multi_step}):
                self._compile_prompt_logprobs(num_tokens)
        if self.writes_slots:
            self._compile_fill_slot()
        hits, looked = cache_counts()
        log.info("compiled %d buckets in %.1fs (this process so far: %d of %d compilations "
                 "loaded from the persistent cache)", len(buckets), self.compile_seconds, hits,
                 looked)
        if jax.default_backend() == "gpu":
            self.warm_up(buckets)

    def warm_up(self, buckets: list[Bucket]) -> None:
        """Runs every bucket once on padding (no KV written, nothing sampled for anyone). On a
        GPU an executable's first run instantiates its CUDA graphs and loads its kernels, a
        stall for the first request to need each shape (docs/design.md, "Measured facts")."""
        start = time.perf_counter()
        for b in buckets:
            inputs = build_inputs(b, None, self.page_size, self.max_pages_per_seq)
            sampled, _, _ = self.execute(b, inputs, None, b.steps)
            jax.block_until_ready(sampled)
        vocab = self.model.config.vocab_size
        state = self.state
        for num_seqs, samplers in self._samplers.items():
            x = build_inputs(Bucket(True, num_seqs, num_seqs), None, self.page_size,
                             self.max_pages_per_seq)
            settings = _packed((x.sampling, x.penalties))
            logits, _, _ = samplers.masked(jnp.zeros((num_seqs, vocab), jnp.float32),
                                           all_tokens_mask(num_seqs, vocab), settings)
            # penalties neither reset nor count on padding: the counts come back unchanged
            sampled, _, state.token_counts = samplers.full(
                logits, state.token_counts, state.slot_tables, settings)
            jax.block_until_ready(samplers.logprobs(logits, sampled.token_ids))
        hidden_size = self.model.config.hidden_size
        for num_tokens, executable in self._prompt_logprobs.items():
            jax.block_until_ready(executable(state.params, jnp.zeros((num_tokens, hidden_size),
                                                                    self.model.dtype),
                                             np.zeros(num_tokens, np.int32)))
        if self._fill_slot_executable is not None:  # a slot out of range: nothing is written
            state.slot_tables = self._fill_slot_executable(state.slot_tables,
                                                           _packed(self._slot_inputs(None)))
            jax.block_until_ready(state.slot_tables)
        log.info("ran %d buckets once in %.1fs", len(buckets), time.perf_counter() - start)

    @property
    def _compiler_options(self) -> dict[str, bool | str]:
        """Per-executable XLA options (the process's XLA_FLAGS stay untouched).

        - XLA's dot merger is off: it fused GEMMs that share an input by concatenating their
          weights on every step; the models store q/k/v and gate/up fused at load instead.
        - Rematerialization is off: it counts the KV pool argument against the device's
          memory, and with a pool of most of the GPU it recomputed GEMMs to save memory the
          step never needed. The engine sizes the pool leaving room for the steps'
          temporaries itself.
        What each cost: docs/design.md, "Measured facts"."""
        return {"xla_gpu_enable_triton_gemm": self.config.gemm_backend == "triton",
                "xla_disable_hlo_passes": "dot-merger,rematerialization"}

    def _lower(self, b: Bucket) -> jax.stages.Lowered:
        inputs = build_inputs(b, None, self.page_size, self.max_pages_per_seq)
        args = (self.state.params, self.state.kv_pool, self._no_previous, _packed(inputs))
        if b.multi_step:
            return self._jitted_multi_step.lower(*args, layout=layout_of(inputs),
                                                 num_steps=b.steps)
        return self._jitted_step.lower(*args, layout=layout_of(inputs))

    def _compile(self, b: Bucket) -> jax.stages.Compiled:
        start = time.perf_counter()
        self._executables[b] = self._lower(b).compile(compiler_options=self._compiler_options)
        self.compile_seconds += time.perf_counter() - start
        return self._executables[b]

    def _abstract(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        """An input the executables receive from the steps or the host: on every device of a
        tensor-parallel group (as the steps' logits, tokens and hidden states are)."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(self.mesh))

    def _compile_samplers(self, num_seqs: int) -> Samplers:
        """The ``Samplers`` for ``num_seqs`` sequences."""
        start = time.perf_counter()
        x = build_inputs(Bucket(True, num_seqs, num_seqs), None, self.page_size, self.max_pages_per_seq)
        vocab = self.model.config.vocab_size
        logits = self._abstract((num_seqs, vocab), jnp.float32)
        settings = (x.sampling, x.penalties)
        options = self._compiler_options
        compiled = Samplers(
            self._jitted_full_sampler.lower(logits, self.state.token_counts, self.state.slot_tables,
                                            _packed(settings), layout=layout_of(settings)
                                            ).compile(compiler_options=options),
            self._jitted_logprobs.lower(logits, self._abstract((num_seqs,), jnp.int32)
                                        ).compile(compiler_options=options),
            self._jitted_masked_sampler.lower(
                logits, self._abstract((num_seqs, token_mask_width(vocab)), jnp.int32),
                _packed(settings), layout=layout_of(settings)).compile(compiler_options=options))
        self._samplers[num_seqs] = compiled
        self.compile_seconds += time.perf_counter() - start
        return compiled

    def _compile_prompt_logprobs(self, num_tokens: int) -> jax.stages.Compiled:
        """``prompt_logprobs.compute`` over the hidden states of a ``num_tokens`` step."""
        start = time.perf_counter()
        hidden = self._abstract((num_tokens, self.model.config.hidden_size), self.model.dtype)
        targets = self._abstract((num_tokens,), jnp.int32)
        compiled = self._jitted_prompt_logprobs.lower(self.state.params, hidden, targets).compile(
            compiler_options=self._compiler_options)
        self._prompt_logprobs[num_tokens] = compiled
        self.compile_seconds += time.perf_counter() - start
        return compiled

    def _prompt_logprobs_fn(self, params, hidden, targets):
        params = self._compute_dtype(params)
        return prompt_logprobs.compute(
            lambda rows: self._decoder.apply({"params": params}, rows, method=Decoder.logits),
            hidden, targets)

    def _masked_sampler_fn(self, logits, mask, packed, layout):
        sampling, _ = unpack_on_device(layout, packed)
        masked = apply_token_mask(logits, mask)
        sampled = sample_basic(masked, sampling)
        return masked, sampled, self._pad_rows(sampled.token_ids)

    def _full_sampler_fn(self, logits, counts, tables, packed, layout):
        sampling, penalties = unpack_on_device(layout, packed)
        sampled, counts = sample_full(logits, counts, tables, sampling, penalties)
        return sampled, self._pad_rows(sampled.token_ids), counts

    def _slot_inputs(self, request: Request | None) -> tuple[np.ndarray, SlotTables]:
        """What ``fill_slot`` reads: (int32[1] slot, its row). None: a slot out of range and an
        empty row, which change nothing (compilation, warm-up)."""
        slots, vocab = self.state.token_counts.shape
        if request is None:
            return np.asarray([slots], np.int32), slot_row(SamplingParams(), [], vocab)
        return (np.asarray([request.penalty_slot], np.int32),
                slot_row(request.params, request.prompt_token_ids, vocab))

    def _fill_slot_fn(self, tables, packed, layout):
        slot, row = unpack_on_device(layout, packed)
        return fill_slot(tables, slot, row)

    def _compile_fill_slot(self) -> jax.stages.Compiled:
        start = time.perf_counter()
        inputs = self._slot_inputs(None)
        self._fill_slot_executable = self._jitted_fill_slot.lower(
            self.state.slot_tables, _packed(inputs), layout=layout_of(inputs)
        ).compile(compiler_options=self._compiler_options)
        self.compile_seconds += time.perf_counter() - start
        return self._fill_slot_executable

    def fill_slot(self, request: Request) -> None:
        """Writes ``request``'s prompt tokens and logit biases into its penalty slot's tables
        (``SlotTables``), before any step samples for it. Launched without waiting (in duet
        mode ``DeviceState.after_fill`` makes the row visible to the workers first)."""
        executable = self._fill_slot_executable
        if executable is None:
            if self.config.compile_on_start:
                raise RuntimeError("no compiled fill_slot executable")
            executable = self._compile_fill_slot()
        state = self.state
        state.slot_tables = executable(state.slot_tables, _packed(self._slot_inputs(request)))
        state.after_fill(request.penalty_slot)

    def _read_previous(self, previous: jax.Array, x: StepInputs) -> jax.Array:
        # Tokens sampled by the step still in flight never visit the host: they are read here,
        # on the device, from that step's output.
        return jnp.where(x.from_previous >= 0, previous[jnp.maximum(x.from_previous, 0)], x.tokens)

    def _pad_rows(self, tokens: jax.Array) -> jax.Array:
        return jnp.zeros(self.max_seqs, jnp.int32).at[:tokens.shape[0]].set(tokens)

    def _compute_dtype(self, tree):
        """Shared buffers hold bfloat16 as uint16 and FP8 weights as uint8 (DLPack has
        neither): a free bitcast back."""
        dtype = self.model.dtype

        def logical(a):
            if a.dtype != dtype and a.dtype == transport_dtype(dtype):
                return jax.lax.bitcast_convert_type(a, dtype)
            if a.dtype == transport_dtype(FP8_DTYPE):
                return jax.lax.bitcast_convert_type(a, FP8_DTYPE)
            return a

        return jax.tree_util.tree_map(logical, tree)

    def _step_fn(self, params, kv_pool, previous, packed, layout):
        """(sampled, last tokens, KV pool, logits, hidden states): the logits feed the full
        sampler and the hidden states (of every token) the prompt logprobs when the host runs
        them."""
        x: StepInputs = advanced(unpack_on_device(layout, packed), self.page_size, jnp)
        stored = kv_pool.dtype
        params, kv_pool = self._compute_dtype((params, kv_pool))
        tokens = self._read_previous(previous, x)
        hidden, kv_pool = self._decoder.apply({"params": params}, tokens, kv_pool, x.meta,
                                              method=Decoder.hidden_states)
        logits = self._decoder.apply({"params": params}, hidden[x.logits_indices],
                                     method=Decoder.logits)
        sampled = sample_basic(logits, x.sampling)
        return (sampled, self._pad_rows(sampled.token_ids),
                jax.lax.bitcast_convert_type(kv_pool, stored), logits, hidden)

    def _multi_step_fn(self, params, kv_pool, previous, packed, layout, num_steps: int):
        """``num_steps`` (static) decode steps over one decode bucket, basic sampling only (the
        scheduler runs requests that need the full sampler one step per dispatch). A static trip
        count matters on GPU: a loop with a runtime bound copies its predicate to the host every
        iteration, and the GPU idles while the next step's kernels are launched."""
        x: StepInputs = advanced(unpack_on_device(layout, packed), self.page_size, jnp)
        stored = kv_pool.dtype
        params, kv_pool = self._compute_dtype((params, kv_pool))
        meta, page = x.meta, self.page_size
        live = meta.context_lens > 0
        rows = jnp.arange(meta.context_lens.shape[0])
        last_page = meta.block_tables.shape[1] - 1

        def one_step(j, carry):
            tokens, kv_pool, out = carry
            # A row past its valid steps repeats its last position without writing KV; its
            # tokens are discarded by the host.
            writes = live & (j < x.valid_steps)
            offset = jnp.minimum(j, jnp.maximum(x.valid_steps - 1, 0))
            positions = meta.positions + offset
            slots = (meta.block_tables[rows, jnp.minimum(positions // page, last_page)] * page
                     + positions % page)
            step_meta = meta.replace(positions=positions, slot_mapping=jnp.where(writes, slots, -1),
                                     context_lens=jnp.where(live, meta.context_lens + offset, 0))
            logits, kv_pool = self._decoder.apply({"params": params}, tokens, kv_pool, step_meta,
                                                  x.logits_indices)
            sampled = sample_basic(logits, x.sampling.replace(counters=x.sampling.counters + j))
            out = jax.tree_util.tree_map(lambda o, v: o.at[j].set(v), out, sampled)
            return sampled.token_ids, kv_pool, out

        tokens = self._read_previous(previous, x)
        shapes = jax.eval_shape(lambda: sample_basic(
            jnp.zeros((rows.shape[0], self.model.config.vocab_size), jnp.float32), x.sampling))
        out = jax.tree_util.tree_map(lambda s: jnp.zeros((num_steps, *s.shape), s.dtype), shapes)
        tokens, kv_pool, out = jax.lax.fori_loop(0, num_steps, one_step, (tokens, kv_pool, out))
        return out, self._pad_rows(tokens), jax.lax.bitcast_convert_type(kv_pool, stored)

    def dispatch(self, batch: SchedulerOutput, previous: InFlight | None,
                 token_mask: np.ndarray | None = None,
                 prompt_chunks: list[PromptChunk] | None = None) -> InFlight:
        """Launches one dispatch without waiting for it (nor for ``previous``, whose sampled
        tokens feed this one on the device). ``token_mask``: int32[rows, ceil(vocab / 32)],
        the tokens each scheduled row may sample (structured outputs; None: any).
        ``prompt_chunks``: the batch's positions that need prompt logprobs
        (``prompt_logprobs.chunks_of``; None or empty: none)."""
        b = bucket_for(batch, self.config)
        last = self._last_dispatch
        previous_tokens = previous.last_tokens if previous is not None else None
        if batch.continues is not None and previous is not None and last.packed is not None:
            # (a continuation follows the dispatch of its rows launched last, still in flight
            # here: the same settings, the same sampler flags)
            packed = continue_packed(batch, last)
            sampled, last_tokens, _ = self.execute(b, None, previous_tokens, batch.num_steps,
                                                   last.sampler_flags, packed)
            return InFlight(batch, sampled, last_tokens, wants_logprobs=last.sampler_flags[1])
        inputs = build_inputs(b, batch, self.page_size, self.max_pages_per_seq,
                              previous.batch.scheduled if previous is not None else None)
        targets = prompt_logprobs.targets_of(prompt_chunks, b.num_tokens) if prompt_chunks else None
        sampled, last_tokens, prompt_results = self.execute(
            b, inputs, previous_tokens, batch.num_steps, token_mask=token_mask,
            prompt_targets=targets)
        launched = InFlight(batch, sampled, last_tokens, wants_logprobs=last.sampler_flags[1])
        if prompt_results is not None:
            launched.prompt_logprobs = PromptLogprobsInFlight(prompt_chunks, prompt_results)
        return launched

    def execute(self, b: Bucket, inputs: StepInputs | None, previous_tokens: jax.Array | None,
                num_steps: int = 1, sampler_flags: tuple[bool, bool] | None = None,
                packed: np.ndarray | None = None,
                token_mask: np.ndarray | None = None, prompt_targets: np.ndarray | None = None
                ) -> tuple[SampledTokens, jax.Array, SampledTokens | None]:
        """Runs prepared inputs; returns (sampled, last tokens, prompt logprobs) as device
        arrays, and records them as the last dispatch. ``sampler_flags``: (needs the full
        sampler, wants logprobs) when already known. ``packed``: the inputs already packed
        (``continue_packed``: ``inputs`` is None then, and is unpacked from ``packed`` where it
        is needed, with the last dispatch's inputs as the template).
        ``token_mask``: see ``dispatch`` (its rows run the full sampler).
        ``prompt_targets``: int32[num_tokens], the token each of the step's tokens predicts
        (``prompt_logprobs.targets_of``): the step then returns ``with_logprobs`` of them at
        every token (else None)."""
        executable = self._executables.get(b)
        if executable is None:
            if self.config.compile_on_start:
                raise RuntimeError(f"no compiled executable for {b} (buckets: "
                                   f"{sorted(self._executables, key=str)}): a scheduler bug")
            log.info("compiling %s on first use", b)
            executable = self._compile(b)
        if packed is None:
            packed = _packed(inputs)
        if sampler_flags is None:
            sampler_flags = (needs_full_sampler(inputs.sampling, inputs.penalties),
                             wants_logprobs(inputs.sampling))
        full, logprobs = sampler_flags
        masked = token_mask is not None
        last = self._last_dispatch
        last.keep(inputs, packed, sampler_flags)
        state = self.state
        if inputs is None and (full or masked or state.shared is not None):  # (the host needs them)
            inputs = advanced(unpack(last.inputs, packed), self.page_size)
        if (full or logprobs or masked or prompt_targets is not None) and b.multi_step:
            raise RuntimeError(f"a {b.steps}-step decode holds a request that needs the full "
                               "sampler, logprobs, a token mask or prompt logprobs: a scheduler "
                               "bug")
        args = (state.params, state.kv_pool,
                self._no_previous if previous_tokens is None else previous_tokens, packed)
        start = time.perf_counter()
        prompt_results = None
        if b.multi_step:
            sampled, last, state.kv_pool = executable(*args)
        else:
            sampled, last, state.kv_pool, logits, hidden = executable(*args)
            if prompt_targets is not None:
                prompt_results = self._prompt_logprobs_executable(b.num_tokens)(
                    state.params, hidden, prompt_targets)
        if full or logprobs or masked:
            samplers = self._samplers.get(b.num_seqs)
            if samplers is None:
                if self.config.compile_on_start:
                    raise RuntimeError(f"no compiled full sampler for {b.num_seqs} sequences")
                samplers = self._compile_samplers(b.num_seqs)
            settings = _packed((inputs.sampling, inputs.penalties)) if full or masked else None
            allowed = logits
            if masked:
                padded = all_tokens_mask(b.num_seqs, self.model.config.vocab_size)
                padded[:len(token_mask)] = token_mask
                allowed, sampled, last = samplers.masked(logits, padded, settings)
            if full:
                sampled, last, state.token_counts = samplers.full(
                    allowed, state.token_counts, state.slot_tables, settings)
            if logprobs:  # (the model's distribution, before penalties and masks)
                sampled = samplers.logprobs(logits, sampled.token_ids)
        self.last_launch_seconds = time.perf_counter() - start
        state.after_step((b, full), inputs, num_steps, self.page_size)
        return sampled, last, prompt_results

    def _prompt_logprobs_executable(self, num_tokens: int) -> jax.stages.Compiled:
        executable = self._prompt_logprobs.get(num_tokens)
        if executable is None:
            if self.config.compile_on_start:
                raise RuntimeError(f"no compiled prompt logprobs for {num_tokens} tokens")
            executable = self._compile_prompt_logprobs(num_tokens)
        return executable


def _packed(tree) -> np.ndarray:
    """Host arrays as the one uint8 buffer the executables unpack (``step_inputs.pack``)."""
    return np.frombuffer(pack(tree), np.uint8)
