"""Host arrays of one step, padded to a compiled bucket (numpy only, no device arrays).

The engine builds a step's inputs from the scheduler's batch; an executor (in this process or
in a worker process) runs them. Every step is padded to a bucket, and every bucket is compiled
ahead of time, so nothing compiles while serving:
- decode buckets: S sequences of one token each, S a power of two up to max_num_seqs; a decode
  bucket also exists as a k-step executable for each k of ``decode_step_choices`` (k is
  static: a loop with a known trip count needs no device-to-host sync per step);
- mixed buckets: T tokens (a power of two up to max_num_batched_tokens) over min(T, S_max)
  sequences (prefill, chunked prefill, decode tokens riding along).
Block tables always have the full width (max_model_len / page_size): the attention kernels'
cost follows the real context lengths, not the table width.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import numpy as np

from models.attention import AttentionMetadata

from ..config import EngineConfig
from ..perf.roofline import StepPadding, power_of_two
from .input_batch import InputBatch
from .request import PENDING
from .sampler import PenaltyArrays, SamplingArrays
from .scheduler import SchedulerOutput

MIN_MIXED_TOKENS = 16


bucket = power_of_two
"""Smallest power of two >= max(n, minimum): one definition, shared with the roofline's padding."""


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One compiled shape: ``num_tokens`` tokens over ``num_seqs`` sequences."""

    decode: bool
    """One token per sequence (the decode attention kernel applies)."""
    num_tokens: int
    num_seqs: int
    steps: int = 1
    """Decode steps the executable runs (k > 1: a device loop over decode steps)."""

    @property
    def multi_step(self) -> bool:
        return self.steps > 1


def step_padding(config: EngineConfig, max_model_len: int = 0) -> StepPadding:
    """The padding of ``bucket_for``, for the roofline (pure Python, no buckets needed), with
    the block tables' width in keys for ``max_model_len`` (0: unknown)."""
    width = -(-max_model_len // config.page_size) * config.page_size
    return StepPadding(max_seqs=bucket(config.max_num_seqs), min_tokens=MIN_MIXED_TOKENS,
                       max_context=width)


def decode_step_choices(config: EngineConfig) -> tuple[int, ...]:
    """The k values with k-step executables: powers of two up to max_decode_steps."""
    return tuple(1 << i for i in range(config.max_decode_steps.bit_length()))


def plan_buckets(config: EngineConfig, steps: tuple[int, ...] = ()) -> list[Bucket]:
    """Every shape the engine can ever run, given its batch limits, with k-step decode
    executables for each k > 1 in ``steps``."""
    max_seqs = bucket(config.max_num_seqs)
    max_tokens = bucket(config.max_num_batched_tokens, MIN_MIXED_TOKENS)
    sizes = [1 << i for i in range(max_seqs.bit_length())]
    decode = [Bucket(True, s, s) for s in sizes]
    multi = [Bucket(True, s, s, steps=k) for k in steps if k > 1 for s in sizes]
    mixed = [Bucket(False, t, min(t, max_seqs))
             for t in (1 << i for i in range(max_tokens.bit_length())) if t >= MIN_MIXED_TOKENS]
    return decode + multi + mixed


def bucket_for(batch: SchedulerOutput, config: EngineConfig) -> Bucket:
    if batch.continues is not None or batch.decode_only:
        s = bucket(len(batch.scheduled))
        return Bucket(True, s, s, steps=batch.num_steps)
    t = bucket(batch.num_tokens, MIN_MIXED_TOKENS)
    return Bucket(False, t, min(t, bucket(config.max_num_seqs)))


@flax.struct.dataclass
class StepInputs:
    """Everything a step executable reads besides weights, KV pool, penalty counts and slot
    tables."""

    tokens: jax.Array
    """int32[T]: token ids (PENDING ones are read from the previous step's output)."""
    from_previous: jax.Array
    """int32[T]: row of the in-flight step's output holding this token, or -1."""
    meta: AttentionMetadata
    logits_indices: jax.Array
    """int32[S]: the token of each sequence whose logits are sampled."""
    sampling: SamplingArrays
    penalties: PenaltyArrays
    valid_steps: jax.Array
    """int32[S]: steps of a k-step decode that count for each row (its token limit may end it
    sooner); later steps write no KV and their tokens are discarded."""
    advance: jax.Array
    """int32[1]: decode steps that every live row of a decode step is past the positions,
    context lengths and counters written here (``continue_packed`` leaves those as the last
    full build wrote them and counts the steps since; ``advanced`` applies them, on the device
    or on the host). 0 from ``build_inputs``."""


def advanced(x: StepInputs, page_size: int, xp=np) -> StepInputs:
    """``x`` with a decode step's ``advance`` applied: positions, context lengths and sampling
    counters of the live rows moved on, and their KV slots recomputed from the block tables
    (padding rows keep position 0, context 0 and slot -1). ``xp``: numpy, or jax.numpy inside
    an executable. Mixed steps come back unchanged (their advance is always 0)."""
    meta = x.meta
    if not meta.decode_only:
        return x
    step = x.advance[0]
    live = meta.context_lens > 0
    positions = xp.where(live, meta.positions + step, meta.positions)
    rows = xp.arange(positions.shape[0])
    page = xp.minimum(positions // page_size, meta.block_tables.shape[1] - 1)
    slots = xp.where(live, meta.block_tables[rows, page] * page_size + positions % page_size, -1)
    return x.replace(
        meta=meta.replace(positions=positions, slot_mapping=slots.astype(meta.slot_mapping.dtype),
                          context_lens=xp.where(live, meta.context_lens + step, 0)),
        sampling=x.sampling.replace(counters=xp.where(live, x.sampling.counters + step,
                                                      x.sampling.counters)))


class LastDispatch:
    """The inputs of the runner's last dispatch, as packed: a continuation of the steady decode
    (``SchedulerOutput.continues``) derives its own from them (``continue_packed``)."""

    def __init__(self) -> None:
        self.inputs: StepInputs | None = None
        """The last inputs built (``build_inputs``): the template of the packed layout."""
        self.packed: np.ndarray | None = None
        """uint8[n]: the last dispatch's packed inputs (``pack``)."""
        self.sampler_flags: tuple[bool, bool] | None = None
        """(needs the full sampler, wants logprobs) of the last inputs built."""
        self.spans: StepInputs | None = None
        """Where each of ``inputs``' arrays sits in ``packed`` (``continue_packed``)."""
        self.spans_fresh = False
        """``packed`` holds ``build_inputs``' arrays, not yet a continuation's."""

    def keep(self, inputs: StepInputs | None, packed: np.ndarray,
             sampler_flags: tuple[bool, bool]) -> None:
        """Records a dispatch: built from ``inputs``, or (None) continued from the last."""
        if inputs is not None:
            self.inputs, self.spans = inputs, None
        self.packed, self.sampler_flags = packed, sampler_flags


def build_inputs(b: Bucket, batch: SchedulerOutput | None, page_size: int,
                 max_pages_per_seq: int, in_flight: list | None = None) -> StepInputs:
    """Host arrays of one step in bucket ``b`` (all padding when ``batch`` is None). Block
    tables and sampling settings are gathered from the input batch holding the batch's
    requests (``SchedulerOutput.rows``; None: a batch of these requests alone). ``in_flight``:
    the ``scheduled`` list of the dispatch still running, whose output rows hold the newest
    tokens still PENDING on the host."""
    num_seqs, num_tokens = b.num_seqs, b.num_tokens
    tokens = np.zeros(num_tokens, np.int32)
    from_previous = np.full(num_tokens, -1, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, -1, np.int32)
    context_lens = np.zeros(num_seqs, np.int32)
    query_start_loc = np.zeros(num_seqs + 1, np.int32)
    logits_indices = np.zeros(num_seqs, np.int32)
    valid_steps = np.zeros(num_seqs, np.int32)
    counters = np.zeros(num_seqs, np.int32)
    reset = np.zeros(num_seqs, bool)
    count = np.zeros(num_seqs, bool)

    scheduled = batch.scheduled if batch is not None else []
    requests = [item.request for item in scheduled]
    num_real = len(requests)
    rows = batch.rows if batch is not None else None
    if rows is None:
        rows = InputBatch.of(requests, max_pages_per_seq)
    gathered = rows.gather(rows.rows(requests), num_seqs)
    block_tables, settings = gathered.block_tables, gathered.settings

    if num_real:
        # Per request only what needs its Python objects (tokens, counts); the
        # per-token arithmetic runs once over the whole step (host time is on every step).
        starts = np.fromiter((r.num_computed_tokens for r in requests), np.int32, num_real)
        counts = np.fromiter((item.num_new_tokens for item in scheduled), np.int32, num_real)
        ends = np.cumsum(counts, dtype=np.int32)
        at = int(ends[-1])
        flat: list[int] = []
        # Only the newest token of a request can still be in flight, sampled by the dispatch
        # in flight: its row there is where this step reads it (on the device).
        if at == num_real:  # one token each (decode steps): no slices, a third of the time
            for r in requests:
                index = r.num_computed_tokens - len(r.prompt_token_ids)  # < 0: in the prompt
                flat.append(r.output_token_ids[index] if index >= 0 else r.prompt_token_ids[index])
            newest = flat
        else:
            newest = []
            for item, r in zip(scheduled, requests):
                chunk = r.token_slice(r.num_computed_tokens, r.num_computed_tokens + item.num_new_tokens)
                flat += chunk
                newest.append(chunk[-1])
        tokens[:at] = flat
        if PENDING in newest:
            rows_in_flight = {id(item.request): row for row, item in enumerate(in_flight or ())}
            try:
                from_previous[ends - 1] = [rows_in_flight[id(r)] if token == PENDING else -1
                                           for r, token in zip(requests, newest)]
            except KeyError:
                raise RuntimeError("a request's newest token is in flight in no dispatch that "
                                   "this step follows: an engine bug") from None
        for s in gathered.penalized:
            reset[s], count[s] = requests[s].penalty_slot_fresh, scheduled[s].completes_sequence
        query_start_loc[1:num_real + 1] = ends
        query_start_loc[num_real + 1:] = at
        seq = np.repeat(np.arange(num_real), counts)
        pos = np.arange(at, dtype=np.int32) + np.repeat(starts - (ends - counts), counts)
        positions[:at] = pos
        slots[:at] = block_tables[seq, pos // page_size] * page_size + pos % page_size
        context_lens[:num_real] = starts + counts
        logits_indices[:num_real] = ends - 1
        valid_steps[:num_real] = [item.num_steps for item in scheduled]
        counters[:num_real] = [len(r.output_token_ids) for r in requests]

    meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                             context_lens=context_lens, query_start_loc=query_start_loc,
                             decode_only=b.decode)
    sampling = SamplingArrays(temperature=settings["temperature"], top_k=settings["top_k"],
                              top_p=settings["top_p"], min_p=settings["min_p"],
                              seeds=settings["seeds"], counters=counters,
                              want_logprobs=settings["want_logprobs"])
    penalties = PenaltyArrays(slots=settings["penalty_slots"], presence=settings["presence"],
                              frequency=settings["frequency"], repetition=settings["repetition"],
                              biased=settings["biased"], reset=reset, count=count)
    return StepInputs(tokens=tokens, from_previous=from_previous, meta=meta,
                      logits_indices=logits_indices, sampling=sampling, penalties=penalties,
                      valid_steps=valid_steps, advance=np.zeros(1, np.int32))


def continue_packed(batch: SchedulerOutput, last: LastDispatch) -> np.ndarray:
    """``pack`` of inputs equivalent to ``build_inputs``' for a batch that ``continues`` the
    runner's last dispatch, while that one is in flight: a copy of its packed buffer whose
    ``advance`` counts ``num_steps`` more (every row is that many tokens further along; the
    executable moves positions, context lengths, slots and counters on itself), whose rows
    read their newest token from the same row of the in-flight output, and whose rows that
    grew get their block tables anew (``SchedulerOutput.grown_rows``). A few array operations
    whatever the batch size: this is every decode step's host work while the decode is
    steady."""
    if last.packed is None:
        raise ValueError("continue_packed needs the packed inputs of the batch it continues")
    if last.spans is None:
        last.spans, last.spans_fresh = _spans(last.inputs), True
    spans, buf = last.spans, last.packed.copy()
    n = len(batch.scheduled)

    def view(span: tuple[int, int, tuple[int, ...], np.dtype]) -> np.ndarray:
        start, end, shape, dtype = span
        return buf[start:end].view(dtype).reshape(shape)

    view(spans.advance)[0] += batch.num_steps
    if batch.grown_rows:
        view(spans.meta.block_tables)[batch.grown_rows] = batch.grown_tables
    if last.spans_fresh:  # (the first continuation; later ones copy these already)
        view(spans.tokens)[:n] = PENDING
        view(spans.from_previous)[:n] = np.arange(n, dtype=np.int32)
        view(spans.penalties.reset)[:] = False
        last.spans_fresh = False
    return buf


def _spans(inputs: StepInputs) -> StepInputs:
    """The tree of ``inputs`` with (start, end, shape, dtype) in ``pack``'s buffer as leaves."""
    leaves, tree = jax.tree_util.tree_flatten(inputs)
    spans, at = [], 0
    for leaf in leaves:
        leaf = np.asarray(leaf)
        spans.append((at, at + leaf.nbytes, leaf.shape, leaf.dtype))
        at += leaf.nbytes
    return jax.tree_util.tree_unflatten(tree, spans)


def pack(inputs) -> bytes:
    """A step's host arrays (``StepInputs``, or any pytree of them) as one byte string: what a
    worker receives (``unpack``) and what an executable reads (``unpack_on_device``). No
    pickling of arrays on the per-step path."""
    return b"".join(np.ascontiguousarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(inputs))


Layout = tuple
"""A bucket's packed layout, static in an executable: (pytree def, ((shape, dtype name), ...))."""


def layout_of(inputs) -> Layout:
    """The static layout ``unpack_on_device`` needs for ``pack(inputs)``."""
    leaves, tree = jax.tree_util.tree_flatten(inputs)
    return tree, tuple((np.shape(leaf), np.asarray(leaf).dtype.name) for leaf in leaves)


def unpack_on_device(layout: Layout, packed: jax.Array) -> StepInputs:
    """Inverse of ``pack`` inside an executable: ``packed`` is uint8[n] (one host-to-device
    copy per step instead of one per array, which cost about 70 µs of host time each on an
    H200)."""
    import jax.numpy as jnp

    tree, specs = layout
    leaves, at = [], 0
    for shape, name in specs:
        dtype = np.dtype(name)
        size = int(np.prod(shape, dtype=np.int64))
        chunk = packed[at:at + size * dtype.itemsize]
        if dtype == np.bool_:
            leaf = chunk != 0
        elif dtype.itemsize == 1:
            leaf = jax.lax.bitcast_convert_type(chunk, dtype)
        else:
            leaf = jax.lax.bitcast_convert_type(chunk.reshape(size, dtype.itemsize), dtype)
        leaves.append(jnp.reshape(leaf, shape))
        at += size * dtype.itemsize
    if at != packed.shape[0]:
        raise ValueError(f"packed inputs of {packed.shape[0]} bytes do not match the layout ({at} bytes)")
    return jax.tree_util.tree_unflatten(tree, leaves)


def unpack(template: StepInputs, data: bytes) -> StepInputs:
    """Inverse of ``pack``, given the padding inputs of the same bucket as template."""
    leaves, tree = jax.tree_util.tree_flatten(template)
    out, at = [], 0
    for leaf in leaves:
        leaf = np.asarray(leaf)
        out.append(np.frombuffer(data, leaf.dtype, leaf.size, at).reshape(leaf.shape))
        at += leaf.nbytes
    if at != len(data):
        raise ValueError(f"step inputs of {len(data)} bytes do not match the bucket ({at} bytes)")
    return jax.tree_util.tree_unflatten(tree, out)
