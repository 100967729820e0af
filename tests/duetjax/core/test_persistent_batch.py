"""The persistent batch of a steady decode, without a model: the scheduler forms it when every
running request decodes, continues it, and drops it when a row joins or leaves."""
from duetjax.core.request import PENDING, Request
from duetjax.sampling_params import SamplingParams

from .test_scheduler import decoding, scheduler_with


def launch(scheduler, batch):
    """What the engine does at launch: output slots reserved, then the step committed."""
    if batch.continues is not None:
        firsts = batch.continues.reserve(batch.num_steps)
        for request in batch.continues.requests:
            request.output_token_ids += [PENDING] * batch.num_steps
    else:
        firsts = [len(item.request.output_token_ids) for item in batch.scheduled]
        for item in batch.scheduled:
            item.request.output_token_ids += [PENDING] * item.num_steps
    scheduler.commit(batch)
    return firsts


def test_continuations_keep_the_rows_and_their_output_indices():
    scheduler = scheduler_with(num_pages=32, budget=64)
    requests = decoding(scheduler, 6, n=3)
    first = scheduler.schedule(2)
    assert first.continues is None and first.num_steps == 2
    launch(scheduler, first)
    rows = None
    for _ in range(2):
        batch = scheduler.schedule(2)
        assert batch.continues is not None and batch.scheduled is first.scheduled
        assert rows is None or batch.continues is rows  # (one batch, updated in place)
        rows = batch.continues
        assert rows.requests == requests
        firsts = launch(scheduler, batch)
        # each output index: where the dispatch's first token lands in its request's output
        assert firsts == [len(r.output_token_ids) - 2 for r in requests]


def test_a_row_that_joins_or_leaves_drops_the_persistent_batch():
    scheduler = scheduler_with(num_pages=32, budget=64)
    requests = decoding(scheduler, 6, n=2)
    launch(scheduler, scheduler.schedule())
    assert scheduler.schedule().continues is not None
    scheduler.finish(requests[0], "stop")
    assert scheduler.schedule().continues is None  # (a full schedule of what is left)
    scheduler.add(Request("new", list(range(3, 9)), SamplingParams(max_tokens=4), seed=0))
    joined = scheduler.schedule()
    assert joined.continues is None and len(joined.scheduled) == 2
