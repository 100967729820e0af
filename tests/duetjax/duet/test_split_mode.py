"""Duet mode on CPU: real worker processes on shared memory, split iterations, worker crashes.

CPU workers have no SM limits, so the roofline profile here is constructed: compute-bound,
with a TBT SLO that a mixed iteration with more than 17 tokens misses and a decode batch of up
to 8 always fits at half the GPU. That drives the optimizer into split mode whenever prefill
work meets decode work, and the outputs must still be exactly the aggregated engine's.
"""
import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from duetjax import Engine, SamplingParams
from duetjax.config import ConfigError
from duetjax.duet import split_mode
from duetjax.duet.split_mode import (carried_split_seconds, decision_class, final_dispatch_steps,
                                     split_seconds)
from duetjax.perf.optimizer import AGGREGATED
from duetjax.duet.worker_client import RemoteInFlight
from duetjax.perf.roofline import DeviceProfile, ModelShape, Roofline, SMLevel

from ..test_engine import token_ids

CONFIG = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, show_progress=False,
              duet_online_correction=False)  # the constructed profile is what drives these tests
PARAMS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
          for m in (22, 9, 25, 5, 21, 13, 17, 10)]
_rng = np.random.default_rng(20)
# More requests than max_num_seqs and prompts longer than the token budget: prefill chunks keep
# meeting decodes.
PROMPTS = [{"prompt_token_ids": _rng.integers(3, 256, size=n).tolist()}
           for n in (40, 75, 20, 90, 33, 61, 25, 50)]


@pytest.fixture(scope="module")
def profile_and_slo(tiny_llama_dir, tmp_path_factory):
    from models.config import ModelConfig

    flops = 1e9
    profile = DeviceProfile(gpu_name="test", overhead_s=0.0, levels=(
        SMLevel(0.5, flops / 2, 1e18), SMLevel(1.0, flops, 1e18)))
    config = ModelConfig.from_hf(json.loads((tiny_llama_dir / "config.json").read_text()))
    shape = ModelShape.from_config(config, dtype_bytes=4)
    per_token = Roofline(shape, profile).predict_decode([16], 1.0)
    path = tmp_path_factory.mktemp("profile") / "test.json"
    profile.save(path)
    return str(path), 17 * per_token * 1e3


@pytest.fixture(scope="module")
def expected(tiny_llama_dir):
    aggregated = Engine(tiny_llama_dir, **CONFIG)
    return token_ids(aggregated.generate(PROMPTS, PARAMS, use_tqdm=False))


def duet_engine(tiny_llama_dir, profile_and_slo, **options):
    path, slo_ms = profile_and_slo
    engine = Engine(tiny_llama_dir, mode="duet", duet_pairs=((50, 50),), device_profile=path,
                    tbt_slo_ms=slo_ms, **CONFIG, **options)
    engine.wait_for_workers(timeout=600)
    return engine


def run_counting_splits(duet, params, busy):
    """Runs PROMPTS with ``params`` step by step; (outputs in order, split iterations that
    began while ``busy(duet.stats())`` held)."""
    ids = [duet.add_request(p, q) for p, q in zip(PROMPTS, params)]
    results, splits = {}, 0
    while duet.has_unfinished_requests():
        stats = duet.stats()
        for output in duet.step():
            if output.finished:
                results[output.request_id] = output
        if busy(stats):
            splits += duet.stats().split_iterations - stats.split_iterations
    return [results[i] for i in ids], splits


@pytest.fixture(scope="module")
def duet(tiny_llama_dir, profile_and_slo):
    engine = duet_engine(tiny_llama_dir, profile_and_slo)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def carrying(tiny_llama_dir, profile_and_slo):
    """A duet engine whose decode stream outlives its split iterations."""
    engine = duet_engine(tiny_llama_dir, profile_and_slo, duet_carry_stream=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def per_layer(tiny_llama_dir, profile_and_slo):
    """A duet engine whose workers attach to weights held an array per layer."""
    engine = duet_engine(tiny_llama_dir, profile_and_slo, layer_weights="per-layer")
    yield engine
    engine.close()


@pytest.mark.parametrize("engine", ["duet", "carrying", "per_layer"])
def test_duet_mode_splits_and_matches_aggregated(engine, expected, request):
    duet = request.getfixturevalue(engine)
    got = duet.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert token_ids(got) == expected
    stats = duet.split_history()
    assert stats.split_iterations >= 3 and max(stats.split_k) > 1
    assert len(stats.decode_worker_seconds) == stats.split_iterations
    # (a split whose chunk ends before the stream's dispatch counts that dispatch in the next)
    assert sum(stats.decode_worker_seconds) > 0 and sum(stats.decode_worker_steps) > 0
    assert len(stats.decode_worker_steps) == stats.split_iterations
    assert len(stats.measured_seconds) == stats.split_iterations
    assert len(stats.split_stream_k) == stats.split_iterations and min(stats.split_stream_k) >= 1
    assert duet.stats().num_free_pages == duet.stats().num_pages
    assert stats.decisions["split"] == stats.split_iterations
    assert sum(stats.decisions.values()) == stats.split_iterations + stats.aggregated_iterations
    # the smaller budget is weighed against a split as this engine runs its iterations
    assert duet.duet.controller.split_seconds == duet.duet.expected_split_seconds
    last = stats.last_decision
    if last is not None and last.t_prefill:
        assert duet.duet.expected_split_seconds(last) >= last.t_prefill


def test_decision_class_says_what_decided_an_iteration():
    from duetjax.perf.optimizer import Decision

    base = Decision(mode=AGGREGATED, s_p=1.0, s_d=1.0, k=1, t_aggregated=0.03, t_prefill=None,
                    t_decode=None, objective=1.0, slo_met=True, reason="")
    assert decision_class(base) == "full step"
    assert decision_class(dataclasses.replace(base, token_budget=512)) == "smaller budget"
    assert decision_class(dataclasses.replace(base, slo_met=False)) == "full step, nothing fits"
    assert decision_class(dataclasses.replace(base, mode="split", s_p=0.8, s_d=0.2)) == "split"


def test_split_seconds_adds_half_a_decode_step():
    # A 70 ms chunk beside 4-step dispatches of 10 ms steps: the last dispatch is sized to end
    # just after the chunk, so the iteration ends on average half a step (5 ms) after it.
    assert split_seconds(0.070, 0.010, 4) == pytest.approx(0.075)
    # A chunk shorter than one dispatch: the first dispatch ends the iteration.
    assert split_seconds(0.015, 0.010, 4) == pytest.approx(0.040)
    # No chunk (the prefill part was lost): the decode dispatch alone.
    assert split_seconds(0.0, 0.010, 2) == pytest.approx(0.020)


def test_a_carried_split_iteration_is_its_chunk_plus_the_step_overhead():
    assert carried_split_seconds(0.070, 0.002) == pytest.approx(0.072)
    assert carried_split_seconds(0.0, 0.002) == pytest.approx(0.002)  # no chunk: the overhead


def test_the_last_stream_dispatch_ends_just_after_the_chunk():
    # 4-step dispatches of 10 ms steps: with the chunk predicted to end in 45 ms or more the
    # dispatch is whole; sooner, the fewest steps (a power of two) that outlast it.
    assert final_dispatch_steps(0.045, 0.010, 4) == 4
    assert final_dispatch_steps(0.025, 0.010, 4) == 4
    assert final_dispatch_steps(0.015, 0.010, 4) == 2
    assert final_dispatch_steps(0.005, 0.010, 4) == 1
    assert final_dispatch_steps(-0.020, 0.010, 4) == 1  # the chunk is late: one step at a time
    assert final_dispatch_steps(0.001, 0.010, 1) == 1


def run_aborting_once(duet, extra, held_by_a_worker) -> dict:
    """Steps ``duet`` to the end, aborting ``extra`` the first time ``held_by_a_worker()``
    says a worker step writes its pages: the abort must wait for that step (its pages are kept,
    it is not finished yet) and free everything after. Returns the finished outputs by id."""
    results, aborted = {}, False
    while duet.has_unfinished_requests():
        for output in duet.step():
            if output.finished:
                results[output.request_id] = output
        if not aborted and held_by_a_worker():
            duet.abort(extra)
            aborted = True
            request = duet.output_processor.requests[extra]
            assert request.block_table and not request.is_finished
    assert aborted and extra not in duet.output_processor.requests
    assert duet.stats().num_free_pages == duet.stats().num_pages
    return results


def test_decode_streams_while_a_prefill_chunk_runs(duet, expected, monkeypatch):
    # CPU chunks finish at once: make each one look busy until the decode stream has sent
    # two more dispatches. An abort of a request inside a running chunk waits for the chunk
    # (its pages are still being written).
    real_done = RemoteInFlight.done
    stream_at_launch: dict[int, int] = {}

    def done(self):
        split = duet.split_executor.iteration
        if split is None or self is not split.prefill:
            return real_done(self)
        first = stream_at_launch.setdefault(id(self), duet.stats().stream_dispatches)
        return duet.stats().stream_dispatches >= first + 2 and real_done(self)

    monkeypatch.setattr(RemoteInFlight, "done", done)
    before = duet.stats().stream_dispatches
    ids = [duet.add_request(p, params) for p, params in zip(PROMPTS, PARAMS)]
    extra = duet.add_request({"prompt_token_ids": list(range(3, 70))},
                             SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    split_executor = duet.split_executor
    results = run_aborting_once(duet, extra, lambda: (
        split_executor.iteration is not None and extra in split_executor.iteration.request_ids))
    assert [results[i].outputs[0].token_ids for i in ids] == expected
    assert duet.stats().stream_dispatches > before


def test_the_decode_stream_outlives_its_split_iteration(carrying, expected, monkeypatch):
    # Make each decode dispatch look busy while its split's chunk runs: the chunk ends the
    # iteration, and the dispatch carries over into the next one (the next chunk does not wait
    # for it). An abort of a request in a carried dispatch waits for it (its pages are still
    # being written), and the outputs are the aggregated engine's.
    duet = carrying
    real_done = RemoteInFlight.done

    split_executor = duet.split_executor

    def done(self):
        if self is split_executor.stream and split_executor.iteration is not None:
            return False
        return real_done(self)

    monkeypatch.setattr(RemoteInFlight, "done", done)
    before = duet.stats().carried_dispatches
    # (first in: it decodes while the others' chunks run)
    extra = duet.add_request({"prompt_token_ids": list(range(3, 30))},
                             SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    ids = [duet.add_request(p, params) for p, params in zip(PROMPTS, PARAMS)]
    results = run_aborting_once(duet, extra, lambda: (
        split_executor.iteration is None and split_executor.stream is not None
        and any(item.request.request_id == extra for item in split_executor.stream.batch.scheduled)))
    assert [results[i].outputs[0].token_ids for i in ids] == expected
    assert duet.stats().carried_dispatches > before


@pytest.mark.parametrize("engine", ["duet", "carrying"])
def test_killed_decode_worker_loses_nothing(engine, expected, request, monkeypatch):
    # (carrying: killed while its dispatch outlives a split iteration, which the patched
    # ``done`` makes every split do; and while requests still wait, so later splits need it)
    duet = request.getfixturevalue(engine)
    decode_worker = duet.duet.workers[("decode", 50)]
    real_done = RemoteInFlight.done
    split_executor = duet.split_executor
    monkeypatch.setattr(RemoteInFlight, "done", lambda self: (
        not (self is split_executor.stream and split_executor.iteration is not None) and real_done(self)))
    ids = [duet.add_request(p, params) for p, params in zip(PROMPTS, PARAMS)]
    results = {}
    killed = False
    while duet.has_unfinished_requests():
        for output in duet.step():
            if output.finished:
                results[output.request_id] = output
        carried = split_executor.stream is not None and split_executor.iteration is None
        if (not killed and duet.stats().split_iterations and decode_worker.ready
                and duet.stats().num_waiting
                and (carried or not duet.config.duet_carry_stream)):
            os.kill(decode_worker.process.pid, signal.SIGKILL)
            decode_worker.process.wait()
            killed = True
    assert killed
    assert [results[i].outputs[0].token_ids for i in ids] == expected
    assert duet.stats().worker_failures >= 1 and decode_worker.restarts >= 1
    assert duet.stats().num_free_pages == duet.stats().num_pages
    decode_worker.wait_ready(timeout=600)  # restarted, serves again
    splits = duet.stats().split_iterations
    assert token_ids(duet.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
    assert duet.stats().split_iterations > splits


@pytest.mark.parametrize("engine", ["duet", "carrying"])
@pytest.mark.parametrize("role,first_token", [("prefill", 1), ("decode", 2)])
def test_a_request_whose_worker_step_inputs_cannot_be_built_fails_alone(engine, role, first_token,
                                                                        request, monkeypatch):
    """A request whose inputs for a worker's step cannot be built (a prefill chunk, or a decode
    stream dispatch) ends with finish reason "error"; that step is not sent, the requests batched
    with it get the tokens they get without it, no worker restarts, and the engine goes on."""
    from duetjax.duet.worker_client import WorkerClient

    from ..test_engine import break_next_input_token

    duet = request.getfixturevalue(engine)
    # (prompts no earlier test cached: the steps are those of a fresh engine)
    prompts = [{"prompt_token_ids": [first_token] + p["prompt_token_ids"]} for p in PROMPTS]
    dispatch, broken = WorkerClient.dispatch, []

    def break_one(self, batch, use_previous):
        """Breaks the last request of the first step of ``role`` that holds several."""
        if not broken and self.setup.role == role and len(batch.scheduled) > 1:
            broken.append(batch.scheduled[-1].request.request_id)
            break_next_input_token(batch.scheduled[-1].request)
        return dispatch(self, batch, use_previous)

    monkeypatch.setattr(WorkerClient, "dispatch", break_one)
    failures = duet.stats().worker_failures
    ids = [duet.add_request(p, params) for p, params in zip(prompts, PARAMS)]
    finished = {}
    while duet.has_unfinished_requests():
        finished.update((o.request_id, o) for o in duet.step() if o.finished)
    assert broken
    failed = finished[broken[0]]
    assert failed.outputs[0].finish_reason == "error" and "OverflowError" in failed.error
    assert duet.stats().worker_failures == failures
    assert duet.stats().num_free_pages == duet.stats().num_pages
    expected = token_ids(duet.generate(prompts, PARAMS, use_tqdm=False))  # (nothing breaks now)
    for i, request_id in enumerate(ids):
        if request_id != broken[0]:
            assert finished[request_id].error is None
            assert finished[request_id].outputs[0].token_ids == expected[i]


def test_close_stops_workers_and_frees_shared_memory(tiny_llama_dir, profile_and_slo):
    path, slo_ms = profile_and_slo
    engine = Engine(tiny_llama_dir, mode="duet", duet_pairs=((50, 50),), device_profile=path,
                    tbt_slo_ms=slo_ms, **CONFIG)
    processes = [w.process for w in engine.duet.workers.values()]
    segments = engine.runner.state.shared.buffers.handles().payload
    assert all(os.path.exists(f"/dev/shm/{name}") for name in segments)
    engine.close()
    assert all(p.poll() is not None for p in processes)
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in segments)


def test_bad_mode_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="mode must be one of"):
        Engine(tiny_llama_dir, mode="fast", **CONFIG)


def test_auto_mode_without_a_gpu_runs_aggregated(tiny_llama_dir, caplog):
    with caplog.at_level("INFO", logger="duetjax.engine"):
        engine = Engine(tiny_llama_dir, mode="auto", **CONFIG)
    assert engine.mode == "aggregated" and engine.duet is None
    assert "no GPU" in caplog.text  # the log line says which mode and why


def test_duet_on_a_gpu_without_mps_or_cupy_names_the_mode(monkeypatch):
    """Checked before anything starts (no daemon, no JAX backend); 'auto' falls back instead."""
    monkeypatch.setattr(split_mode, "_jax_uses_gpu", lambda: True)
    monkeypatch.setattr(split_mode.mps, "mps_status", lambda: "MPS unavailable: no control binary")
    with pytest.raises(ConfigError, match=r"duet needs MPS on the GPU \(MPS unavailable") as error:
        split_mode.prepare_process("duet")
    assert error.value.option == "mode"
    assert split_mode.prepare_process("auto")[:2] == ("aggregated", None)
    monkeypatch.setattr(split_mode.mps, "mps_status", lambda: "MPS available (test)")
    monkeypatch.setattr(split_mode.importlib.util, "find_spec", lambda name: None)  # no CuPy
    with pytest.raises(ConfigError, match="CuPy is missing") as error:
        split_mode.prepare_process("duet")
    assert error.value.option == "mode"
    assert split_mode.prepare_process("auto")[:2] == ("aggregated", None)


def test_duet_on_cpu_without_a_profile_is_a_clear_error(tiny_llama_dir):
    before = {n for n in os.listdir("/dev/shm") if n.startswith("duetjax_")}
    with pytest.raises(ValueError, match="device_profile is needed for duet mode on CPU"):
        Engine(tiny_llama_dir, mode="duet", duet_pairs=((50, 50),), **CONFIG)
    assert {n for n in os.listdir("/dev/shm") if n.startswith("duetjax_")} <= before  # nothing leaked


def test_static_policy_splits_every_mixed_iteration_at_its_pair(tiny_llama_dir, profile_and_slo,
                                                                 expected, monkeypatch):
    from duetjax.duet.worker_client import WorkerClient

    path, _ = profile_and_slo
    steps = []
    dispatch = WorkerClient.dispatch

    def spy(self, batch, use_previous):
        steps.append(batch.num_steps)
        return dispatch(self, batch, use_previous)

    monkeypatch.setattr(WorkerClient, "dispatch", spy)
    with Engine(tiny_llama_dir, mode="duet", duet_policy="static", duet_pairs=((50, 50), (70, 30)),
                device_profile=path, tbt_slo_ms=1e6, **CONFIG) as engine:  # an SLO nothing misses
        assert set(engine.duet.workers) == {("prefill", 50), ("decode", 50)}
        engine.wait_for_workers(timeout=600)
        assert token_ids(engine.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
        stats = engine.stats()
        assert stats.split_iterations >= 3 and stats.aggregated_iterations == 0
        assert max(steps) > 1  # with a loose SLO the decode stream runs k-step dispatches


def test_online_correction_learns_from_measured_iterations(tiny_llama_dir, profile_and_slo, expected):
    path, slo_ms = profile_and_slo
    config = CONFIG | {"duet_online_correction": True}
    with Engine(tiny_llama_dir, mode="duet", duet_pairs=((50, 50),), device_profile=path,
                tbt_slo_ms=slo_ms, **config) as engine:
        engine.wait_for_workers(timeout=600)
        assert token_ids(engine.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
        correction = engine.duet.correction
        # The constructed profile is far from this CPU: whatever was observed moved its ratio.
        observed = [kind for kind, n in correction.observations.items() if n]
        assert observed and all(correction.ratio[kind] != 1.0 for kind in observed)


def test_penalties_and_logit_bias_hold_across_workers(duet, tiny_llama_dir):
    """Penalty counts and slot tables are shared with the workers (the engine writes a request's
    prompt and biases into its slot; a worker may prefill it and another decode it): requests
    with every penalty and logit biases, more of them than slots, pick what greedy decoding by
    the definitions picks."""
    from models import load_model

    from ..test_engine import greedy_with_penalties

    settings = [  # (repetition, presence, frequency, logit_bias)
        (1.5, 0.0, 0.0, None), (1.0, 0.5, 0.5, {7: 2.0}), (0.8, 0.0, 1.0, None),
        (1.0, 0.0, 0.0, None), (2.0, 0.0, 0.0, {20: -1.0, 30: 1.5}), (1.0, 0.0, 0.0, {100: 1.0}),
        (1.2, 1.0, 0.0, None), (1.0, 0.0, 0.0, None)]
    params = [SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True,
                             repetition_penalty=r, presence_penalty=pr, frequency_penalty=f,
                             logit_bias=bias) for p, (r, pr, f, bias) in zip(PARAMS, settings)]
    splits = duet.stats().split_iterations
    got = token_ids(duet.generate(PROMPTS, params, use_tqdm=False))
    assert duet.stats().split_iterations > splits
    loaded = load_model(tiny_llama_dir, dtype="float32")
    assert got == greedy_with_penalties(loaded, [p["prompt_token_ids"] for p in PROMPTS], got, params)
    assert len(duet.scheduler.free_penalty_slots) == CONFIG["max_num_seqs"]


def test_structured_outputs_keep_iterations_aggregated(profile_and_slo, tmp_path):
    # Workers take no token masks: while a constrained request waits or runs, every iteration
    # runs aggregated, and the outputs are the aggregated engine's; splits resume after it.
    from tests.duetjax.server.helpers import write_tiny_chat_model

    chat = write_tiny_chat_model(tmp_path / "chat")
    constrained = SamplingParams(temperature=0.0, max_tokens=12,
                                 structured_outputs={"regex": "[a-z]{5,30}"})
    params = [constrained] + PARAMS[1:]
    want = token_ids(Engine(chat, **CONFIG).generate(PROMPTS, params, use_tqdm=False))
    duet = duet_engine(chat, profile_and_slo)
    try:
        got, splits_while_constrained = run_counting_splits(
            duet, params, lambda stats: stats.num_constrained)
        assert token_ids(got) == want
        assert splits_while_constrained == 0 and duet.stats().split_iterations > 0
        assert all("a" <= c <= "z" for c in got[0].outputs[0].text)
    finally:
        duet.close()


def test_duet_memory_plan_sets_the_weights_copy_and_workers_aside():
    from duetjax.core.device_state import duet_kv_bytes

    gib = 2**30
    # 62 GiB free, 8B weights (16 GiB) to copy into the shared buffers, and 4 workers
    left = duet_kv_bytes(62 * gib, 16 * gib, workers=4, worker_reserve_gib=3.0, kv_tokens=None,
                         kv_bytes_per_token=131072)
    assert left == (62 - 16 - 12) * gib
    assert duet_kv_bytes(62 * gib, 16 * gib, 4, 3.0, kv_tokens=131072,
                         kv_bytes_per_token=131072) == left  # 16 GiB of KV fits
    with pytest.raises(ValueError, match=r"327680 tokens \(40.0 GiB\).*room for 278528 tokens"):
        duet_kv_bytes(62 * gib, 16 * gib, 4, 3.0, kv_tokens=327680, kv_bytes_per_token=131072)
    with pytest.raises(ValueError, match="--kv-cache-tokens"):
        duet_kv_bytes(20 * gib, 16 * gib, 4, 3.0, None, 131072)


def test_a_smaller_aggregated_budget_replaces_splits_that_gain_nothing(tiny_llama_dir, expected,
                                                                        tmp_path):
    """With workers that the profile says run at a third of their share's rate, no split beats
    the whole GPU at a smaller prefill chunk: the engine stays aggregated, with mixed steps
    within the budget that fits the SLO, and the tokens are the aggregated engine's."""
    from models.config import ModelConfig

    from duetjax.perf.roofline import InterferencePoint, StepPadding

    flops = 1e9
    profile = DeviceProfile(gpu_name="test", overhead_s=0.0, levels=(
        SMLevel(0.5, flops / 2, 1e18), SMLevel(1.0, flops, 1e18)),
        interference=(InterferencePoint(0.5, 0.5, 0.3, 0.3, 0.3, 0.3),))
    path = tmp_path / "slow-split.json"
    profile.save(path)
    config = ModelConfig.from_hf(json.loads((tiny_llama_dir / "config.json").read_text()))
    roofline = Roofline(ModelShape.from_config(config, dtype_bytes=4), profile,
                        StepPadding(max_seqs=4, min_tokens=16))
    # (a 32-token step fits the SLO whatever the decodes' contexts)
    slo_ms = 1e3 * roofline.predict_mixed([(28, 90)], [128] * 4) * 1.05 / 0.9  # (10 % headroom)
    scheduled = []
    with Engine(tiny_llama_dir, mode="duet", duet_pairs=((50, 50),), device_profile=str(path),
                tbt_slo_ms=slo_ms, **CONFIG | {"max_num_batched_tokens": 64,
                                               "slo_min_prefill_tokens": 16}) as engine:
        engine.wait_for_workers(timeout=600)
        schedule = engine.scheduler.schedule
        engine.scheduler.schedule = lambda *a, **kw: scheduled.append(schedule(*a, **kw)) or scheduled[-1]
        assert token_ids(engine.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
        stats = engine.stats()
        assert stats.split_iterations == 0
        assert set(stats.token_budget_choices) == {32}  # what ran, counted
    mixed = [b for b in scheduled if any(s.num_new_tokens == 1 for s in b.scheduled)
             and not b.decode_only]
    assert mixed and max(b.num_tokens for b in mixed) <= 32
    assert max(b.num_tokens for b in scheduled) > 32  # prefill alone takes the whole budget


def test_prompt_logprobs_keep_iterations_aggregated_while_their_prompt_prefills(duet, tiny_llama_dir):
    # Workers compute no prompt logprobs: while a request asking for them waits or prefills,
    # every iteration runs aggregated, with the aggregated engine's results; splits resume after.
    params = [dataclasses.replace(p, prompt_logprobs=n)
              for p, n in zip(PARAMS, (None, 2, None, None, 0, None, None, None))]
    want = Engine(tiny_llama_dir, **CONFIG).generate(PROMPTS, params, use_tqdm=False)
    splits = duet.stats().split_iterations
    got, splits_while_prefilling = run_counting_splits(
        duet, params, lambda stats: stats.num_prompt_logprobs)
    assert token_ids(got) == token_ids(want)
    assert splits_while_prefilling == 0 and duet.stats().split_iterations > splits
    for a, b in zip(got, want):
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for x, y in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            assert x == y or x.keys() == y.keys() and np.allclose(list(x.values()),
                                                                   [y[t] for t in x], atol=1e-5)
    assert len(got[1].prompt_logprobs) == len(PROMPTS[1]["prompt_token_ids"])


def test_duet_mode_on_a_gpu_loads_the_weights_on_the_host(monkeypatch):
    """The weights go into shared buffers: loaded on the GPU first, their memory would stay in
    the engine's XLA allocator, out of reach of the workers and the KV pool."""
    monkeypatch.setattr(split_mode, "_jax_uses_gpu", lambda: True)
    with split_mode.weights_loading_device("duet"):
        assert jax.config.jax_default_device == jax.devices("cpu")[0]
    with split_mode.weights_loading_device("aggregated"):
        assert jax.config.jax_default_device is None
    monkeypatch.setattr(split_mode, "_jax_uses_gpu", lambda: False)
    with split_mode.weights_loading_device("duet"):
        assert jax.config.jax_default_device is None
