"""The persistent input batch: a row per running request, written as requests join, grow and
leave, and the step inputs gathered from it."""
import jax
import numpy as np

from duetjax.config import EngineConfig
from duetjax.core.block_manager import BlockManager
from duetjax.core.input_batch import InputBatch
from duetjax.core.request import PENDING, Request
from duetjax.core.scheduler import ScheduledRequest, SchedulerOutput
from duetjax.core.step_inputs import bucket_for, build_inputs
from duetjax.sampling_params import SamplingParams

from .test_persistent_batch import launch
from .test_scheduler import scheduler_with

PAGE, WIDTH = 4, 8


def rows_hold_their_tables(scheduler):
    rows = scheduler.input_batch
    assert len(rows) == len(scheduler.running)
    for request in scheduler.running:
        row = rows.row_of(request)
        table = request.block_table
        assert rows.block_tables[row, :len(table)].tolist() == table
        assert not rows.block_tables[row, len(table):].any()


def test_rows_follow_arrivals_growth_and_ends():
    scheduler = scheduler_with(num_pages=32, budget=64)
    rows = scheduler.input_batch
    requests = [Request(f"r{i}", list(range(3, 9 + i)), SamplingParams(max_tokens=20), seed=0)
                for i in range(3)]
    for request in requests:
        scheduler.add(request)
    launch(scheduler, scheduler.schedule())
    assert [rows.row_of(r) for r in requests] == [0, 1, 2]
    rows_hold_their_tables(scheduler)
    arrays = (rows.block_tables, *rows.settings.values())
    for _ in range(6):  # decode steps: tables grow past page boundaries
        launch(scheduler, scheduler.schedule())
        rows_hold_their_tables(scheduler)
    scheduler.finish(requests[1], "stop")
    assert rows.row_of(requests[1]) is None and len(rows) == 2
    newcomer = Request("new", list(range(3, 12)), SamplingParams(max_tokens=4, temperature=0.5,
                                                                 top_k=7), seed=5)
    scheduler.add(newcomer)
    launch(scheduler, scheduler.schedule())
    assert rows.row_of(newcomer) == 1  # (the freed row)
    assert rows.settings["top_k"][1] == 7 and rows.settings["temperature"][1] == 0.5
    rows_hold_their_tables(scheduler)
    # Every change was written in place: no array was rebuilt.
    assert all(a is b for a, b in zip(arrays, (rows.block_tables, *rows.settings.values())))


def test_preempted_requests_leave_their_rows_and_get_new_ones_back():
    scheduler = scheduler_with(num_pages=8, budget=64)
    requests = [Request(f"r{i}", list(range(3, 10)), SamplingParams(max_tokens=30), seed=0)
                for i in range(3)]
    for request in requests:
        scheduler.add(request)
    preempted = False
    for _ in range(20):
        batch = scheduler.schedule()
        preempted |= bool(batch.preempted)
        for victim in batch.preempted:
            assert scheduler.input_batch.row_of(victim) is None
        if batch.scheduled:
            launch(scheduler, batch)
        rows_hold_their_tables(scheduler)
    assert preempted


def test_gathered_inputs_equal_a_batch_of_the_requests_alone():
    """Inputs gathered from a long-lived input batch equal those of a batch built from the
    requests alone, after tables grew, after a request lost its pages and got new ones, in
    another row order, and for a mixed step."""
    blocks = BlockManager(num_pages=40, page_size=PAGE, enable_prefix_caching=False)
    rng = np.random.default_rng(1)
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, logprobs=2),
                SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5,
                               repetition_penalty=1.25, logit_bias={3: -1.0})]
    rows = InputBatch(max_rows=4, max_pages_per_seq=WIDTH)
    requests = []
    for i, params in enumerate(settings):
        r = Request(f"r{i}", rng.integers(3, 100, 5 + i).tolist(), params, seed=i)
        r.penalty_slot = 7 if params.penalized else None
        blocks.grow(r, len(r.prompt_token_ids))
        r.num_computed_tokens = len(r.prompt_token_ids) - 1  # its last prompt token decodes next
        rows.add(r)
        requests.append(r)
    in_flight: list = []  # the dispatch in flight: the row of each request's PENDING token

    def check(items, steps=1):
        batch = SchedulerOutput([ScheduledRequest(r, n, steps) for r, n in items], [], steps)
        b = bucket_for(batch, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32))
        alone = build_inputs(b, batch, PAGE, WIDTH, in_flight=in_flight)
        batch.rows = rows
        gathered = build_inputs(b, batch, PAGE, WIDTH, in_flight=in_flight)
        for want, got in zip(jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(gathered)):
            assert want.dtype == got.dtype
            np.testing.assert_array_equal(got, want)
        for s, (r, _) in enumerate(items):
            assert gathered.meta.block_tables[s, :len(r.block_table)].tolist() == r.block_table
        return gathered

    def decode_all(order):
        """Each request's next token is sampled into row ``order[i]`` of a step in flight."""
        in_flight[:] = [None] * len(order)
        for r, row in zip(requests, order):
            r.num_computed_tokens = r.num_tokens
            r.output_token_ids.append(PENDING)
            in_flight[row] = ScheduledRequest(r, 1)
            blocks.grow(r, r.num_tokens)
            rows.write_pages(r)

    x = check([(r, 1) for r in requests])
    assert x.tokens[:3].tolist() == [r.prompt_token_ids[-1] for r in requests]
    assert x.from_previous[:3].tolist() == [-1, -1, -1]
    assert x.penalties.repetition.tolist() == [1, 1, 1.25, 1]  # (padding rows: off)
    assert x.penalties.biased.tolist() == [False, False, True, False]
    assert x.sampling.top_k.tolist() == [0, 5, 0, 0] and x.sampling.seeds.tolist() == [0, 1, 2, 0]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # tables grow past page boundaries meanwhile
        decode_all(order)
        x = check([(r, 1) for r in requests])
        assert x.tokens[:3].tolist() == [PENDING] * 3 and x.from_previous[:3].tolist() == order
    rows.remove(requests[1])  # as a preemption does; then as many pages again, other ones
    blocks.free(requests[1])
    blocks.grow(requests[1], requests[1].num_tokens)
    rows.add(requests[1])
    check([(r, 1) for r in requests])
    check([(r, 1) for r in requests[::-1]])
    requests[2].num_computed_tokens = 2  # recomputing: a chunk of its prompt, then one token of it
    check([(requests[0], 1), (requests[2], 3)])
    x = check([(requests[0], 1), (requests[2], 1)])
    assert x.tokens[1] == requests[2].prompt_token_ids[2] and x.from_previous[1] == -1
