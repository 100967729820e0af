"""Scheduler behaviour that needs no model: split mode's chunks-only schedule."""
from duetjax.config import EngineConfig
from duetjax.core.block_manager import BlockManager
from duetjax.core.request import Request
from duetjax.core.scheduler import Scheduler, split_batch
from duetjax.sampling_params import SamplingParams


def scheduler_with(num_pages: int, budget: int = 16) -> Scheduler:
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=budget, page_size=4)
    return Scheduler(config, BlockManager(num_pages, 4, enable_prefix_caching=True), max_model_len=64)


def decoding(scheduler: Scheduler, prompt_len: int, n: int = 2) -> list[Request]:
    """``n`` requests whose prompts are computed and whose first tokens are back."""
    requests = [Request(f"d{i}", list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=8), seed=0)
                for i in range(n)]
    for request in requests:
        scheduler.add(request)
    scheduler.commit(scheduler.schedule())
    for request in requests:
        request.output_token_ids.append(9)
    return requests


def test_chunks_only_leaves_decodes_to_the_stream_and_keeps_their_budget():
    scheduler = scheduler_with(num_pages=32)
    decoders = decoding(scheduler, 6)
    scheduler.add(Request("long", list(range(3, 40)), SamplingParams(max_tokens=4), seed=0))
    batch = scheduler.schedule(4, split=True, chunks_only=True)
    chunks, decodes = split_batch(batch)
    assert not decodes.scheduled and [s.request.request_id for s in chunks.scheduled] == ["long"]
    assert chunks.num_tokens == 16 - len(decoders)  # each decode keeps its token of the budget
    assert all(d.num_computed_tokens == 6 for d in decoders)  # untouched


def test_chunks_only_preempts_nobody():
    # Two decodes hold 4 of 8 pages; "long" needs 8: its first chunk of 14 tokens gets the
    # other 4, and the second cannot grow. A full schedule would preempt the newest request;
    # chunks-only waits instead.
    scheduler = scheduler_with(num_pages=8)
    decoders = decoding(scheduler, 7)  # 2 pages each, the next token included
    scheduler.add(Request("long", list(range(3, 33)), SamplingParams(max_tokens=4), seed=0))
    chunk = scheduler.schedule(1, split=True, chunks_only=True)
    assert [(s.request.request_id, s.num_new_tokens) for s in chunk.scheduled] == [("long", 14)]
    scheduler.commit(chunk)
    stalled = scheduler.schedule(1, split=True, chunks_only=True)
    assert not stalled.scheduled and not stalled.preempted
    assert all(d.status.value == "running" for d in decoders)
    assert scheduler.schedule(1, split=True).preempted  # (what chunks-only avoided)


def test_requests_admitted_with_a_fresh_penalty_slot_are_reported_once_to_be_filled():
    """The scheduler writes nothing to the device: the batch names the requests whose slot
    tables (repetition penalty, logit bias) must be written before their first step, once."""
    scheduler = scheduler_with(num_pages=8, budget=64)
    biased = Request("biased", list(range(3, 9)), SamplingParams(logit_bias={5: 1.0}), seed=0)
    counted = Request("counted", list(range(3, 9)), SamplingParams(presence_penalty=0.5), seed=0)
    plain = Request("plain", list(range(3, 9)), SamplingParams(), seed=0)
    # 6 pages of 4 tokens: admitted after the others, with its slot taken while it waited
    repeated = Request("repeated", list(range(3, 27)), SamplingParams(repetition_penalty=1.2), seed=0)
    for request in (biased, counted, plain, repeated):
        scheduler.add(request)
    first = scheduler.schedule()
    assert [s.request.request_id for s in first.scheduled] == ["biased", "counted", "plain"]
    assert first.slots_to_fill == [biased]
    assert repeated.penalty_slot is not None  # (a slot, but no pages yet)
    scheduler.commit(first)
    for request in (biased, counted, plain):
        scheduler.finish(request, "stop")
    second = scheduler.schedule()
    assert [s.request.request_id for s in second.scheduled] == ["repeated"]
    assert second.slots_to_fill == [repeated]
    chunks, _ = split_batch(second)  # (split mode fills them before a worker's chunk)
    assert chunks.slots_to_fill == [repeated]
    scheduler.commit(second)
    repeated.penalty_slot_fresh = False  # (its first step was launched)
    scheduler.requeue(repeated)  # preempted: it keeps its slot and its tables
    assert scheduler.schedule().slots_to_fill == []


def test_queue_to_pace_holds_every_prompt_not_yet_computed_with_its_wait():
    """The preview stops at the step's budget; the queue an SLO-aware budget paces holds every
    prompt not yet computed, running prefills first, each with the time it has waited (and
    nothing without ``slo_ttft_ms``)."""
    assert scheduler_with(num_pages=64).queue_to_pace(0.0) is None
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, slo_ttft_ms=2000)
    scheduler = Scheduler(config, BlockManager(64, 4, enable_prefix_caching=True), max_model_len=64)
    decoding(scheduler, 6)  # decodes: no prompt left
    assert scheduler.queue_to_pace(0.0) == []
    for name, n, arrival in (("a", 30, 100.0), ("b", 20, 101.5)):
        scheduler.add(Request(name, list(range(3, 3 + n)), SamplingParams(max_tokens=4), seed=0,
                              arrival_time=arrival))
    prefill, _ = scheduler.preview()
    assert sum(n for n, _ in prefill) == 16 - 2  # cut at the budget
    assert scheduler.queue_to_pace(102.0) == [(30, 2.0), (20, 0.5)]
    scheduler.commit(scheduler.schedule())  # "a" gets its first 14 tokens
    assert scheduler.queue_to_pace(103.0) == [(30 - 14, 3.0), (20, 1.5)]
