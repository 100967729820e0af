"""The SLO-aware token budget of aggregated iterations: its choice, and an engine that uses it."""
import json

import numpy as np
import pytest

from duetjax import Engine, SamplingParams
from duetjax.config import ConfigError, EngineConfig
from duetjax.perf.correction import Correction, CorrectedRoofline
from duetjax.perf.roofline import DeviceProfile, ModelShape, Roofline, SMLevel, StepPadding
from duetjax.perf.token_budget import TokenBudget, budget_sizes, chunks_within, queue_pace

from ..test_engine import token_ids


class LinearStep:
    """A mixed step of 10 µs per token plus 1 µs per cached key of the decodes."""

    def __init__(self):
        self.calls = 0

    def predict_mixed(self, prefill, decode_context_lens, sm_share=1.0):
        self.calls += 1
        tokens = sum(q for q, _ in prefill) + len(decode_context_lens)
        return 1e-5 * tokens + 1e-6 * sum(decode_context_lens)


def test_budget_sizes_are_the_buckets_below_the_maximum():
    assert budget_sizes(512, 16) == (16, 32, 64, 128, 256, 512)
    assert budget_sizes(768, 16) == (16, 32, 64, 128, 256, 512, 768)
    assert budget_sizes(16, 16) == (16,)


def test_chunks_within_fills_first_come_first_served():
    assert chunks_within([(100, 0), (50, 7), (30, 0)], 120) == [(100, 0), (20, 7)]
    assert chunks_within([(10, 3)], 0) == []


@pytest.mark.parametrize("seed", range(20))
def test_choice_is_the_largest_budget_that_fits(seed):
    rng = np.random.default_rng(seed)
    step = LinearStep()
    slo = float(rng.uniform(1e-3, 2e-2))
    budget = TokenBudget(step, slo, max_tokens=2048, min_tokens=16, min_prefill_tokens=16,
                         headroom=0.0)
    decodes = rng.integers(1, 4000, size=int(rng.integers(1, 64))).tolist()
    prefill = [(int(q), int(c)) for q, c in zip(rng.integers(1, 3000, size=4),
                                                  rng.integers(0, 2000, size=4))]
    chosen = budget.choose(prefill, decodes)
    assert step.calls <= 4  # a binary search over at most 8 sizes

    def predicted(size):
        return step.predict_mixed(chunks_within(prefill, size - len(decodes)), decodes)

    sizes = [s for s in budget_sizes(2048, 16) if s >= len(decodes) + 16]
    fitting = [s for s in sizes if predicted(s) <= slo]
    wanted = len(decodes) + sum(q for q, _ in prefill)
    if fitting:
        best = max(fitting)
        # (a size past the first that holds all the work is never needed)
        expected = min(best, next(s for s in sizes if s >= wanted)) if wanted <= sizes[-1] else best
        assert chosen == expected
        assert budget.last_predicted_s == pytest.approx(predicted(chosen))
        assert budget.last_predicted_s <= slo
    else:  # nothing fits: the smallest budget that still gives prefill some tokens
        assert chosen == sizes[0]
        assert budget.last_predicted_s > slo


def test_headroom_and_prefill_floor():
    """The budget keeps a share of the SLO for prediction error, and never gives prefill less
    than its floor, whatever the prediction."""
    step = LinearStep()
    decodes = [100] * 8  # 0.08 ms + 0.8 ms; each prefill token 0.01 ms
    t = lambda size: step.predict_mixed([(size - 8, 0)], decodes)
    slo = t(256) * 1.05
    assert TokenBudget(step, slo, 2048, 16, 16, headroom=0.0).choose([(4000, 0)], decodes) == 256
    assert TokenBudget(step, slo, 2048, 16, 16, headroom=0.1).choose([(4000, 0)], decodes) == 128
    floor = TokenBudget(step, 1e-6, 2048, 16, min_prefill_tokens=256)  # nothing fits
    assert floor.choose([(4000, 0)], decodes) == 512  # 8 decodes + 256 prefill: the 512 bucket
    with pytest.raises(ValueError, match="headroom"):
        TokenBudget(step, slo, 2048, 16, 16, headroom=1.0)


def test_queue_pace_serves_each_prompt_that_can_still_make_its_ttft():
    # one fresh prompt: its tokens over the whole target
    assert queue_pace([(3000, 0.0)], 2.0) == pytest.approx(1500.0)
    # the second prompt has 0.5 s left and 3,000 tokens ahead of it, itself included
    assert queue_pace([(1000, 0.0), (2000, 1.5)], 2.0) == pytest.approx(6000.0)
    # a prompt with under a tenth of its target left sets no pace, but its tokens are ahead
    # of the ones behind it
    assert queue_pace([(5000, 1.9), (1000, 1.0)], 2.0) == pytest.approx(6000.0)
    assert queue_pace([(5000, 3.0)], 2.0) == 0.0 and queue_pace([], 2.0) == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_ttft_target_keeps_pace_with_the_queue(seed):
    """With a TTFT target, where the budget that fits the SLO computes prompt tokens more slowly
    than the queue's pace, the smallest larger budget that keeps that pace is taken instead,
    even past the SLO; otherwise the choice is unchanged."""
    rng = np.random.default_rng(seed)
    step = LinearStep()
    decodes = rng.integers(100, 2000, size=int(rng.integers(4, 64))).tolist()
    ttft = float(rng.uniform(1.0, 8.0))
    queue = [(int(n), float(w)) for n, w in zip(rng.integers(100, 8000, size=8),
                                                  np.sort(rng.uniform(0, ttft, size=8))[::-1])]
    prefill = [(4096, 0)]  # (the preview is cut at the largest budget; the queue is not)
    slo = float(rng.uniform(1e-3, 2e-2))
    paced = TokenBudget(step, slo, 2048, 16, min_prefill_tokens=16, ttft_target_s=ttft)
    plain = TokenBudget(step, slo, 2048, 16, min_prefill_tokens=16)
    chosen, fitting = paced.choose(prefill, decodes, queue), plain.choose(prefill, decodes, queue)

    def rate(size):
        return (size - len(decodes)) / step.predict_mixed(
            chunks_within(prefill, size - len(decodes)), decodes)

    sizes = [s for s in budget_sizes(2048, 16) if fitting <= s]
    keeping_pace = [s for s in sizes if rate(s) >= queue_pace(queue, ttft)]
    assert chosen == (keeping_pace[0] if keeping_pace else 2048)
    assert paced.last_predicted_s == pytest.approx(
        step.predict_mixed(chunks_within(prefill, chosen - len(decodes)), decodes))
    # without a queue, the preview's prompts set the pace as if they had just arrived
    assert paced.choose(prefill, decodes) == paced.choose(prefill, decodes, [(4096, 0.0)])
    with pytest.raises(ValueError, match="ttft_target_s"):
        TokenBudget(step, slo, 2048, 16, 16, ttft_target_s=0.0)


def test_no_decodes_or_no_prefill_take_the_full_budget():
    budget = TokenBudget(LinearStep(), 1e-4, max_tokens=512, min_tokens=16, min_prefill_tokens=16)
    assert budget.choose([(4000, 0)], []) == 512
    assert budget.choose([], [100, 200]) == 512


def test_real_roofline_keeps_the_step_within_the_slo():
    """On the roofline itself (an 8B shape on a constructed profile): the chosen budget's
    predicted step fits the SLO and the next larger size's does not."""
    profile = DeviceProfile(gpu_name="test", overhead_s=2e-3, levels=(
        SMLevel(0.5, 3.5e14, 1.6e12), SMLevel(1.0, 7e14, 3e12)))
    shape = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
                       num_kv_heads=8, head_dim=128, vocab_size=128256, dtype_bytes=2)
    roofline = Roofline(shape, profile, StepPadding(max_seqs=64, min_tokens=16))
    rng = np.random.default_rng(3)
    for _ in range(10):
        decodes = rng.integers(500, 8000, size=int(rng.integers(8, 64))).tolist()
        prefill = [(int(rng.integers(500, 8000)), 0) for _ in range(3)]
        budget = TokenBudget(roofline, 0.030, max_tokens=2048, min_tokens=16, min_prefill_tokens=16,
                             headroom=0.0)
        chosen = budget.choose(prefill, decodes)
        t = roofline.predict_mixed(chunks_within(prefill, chosen - len(decodes)), decodes)
        if chosen > min(s for s in budget.sizes if s >= len(decodes) + 16):
            assert t <= 0.030
        if chosen < 2048:
            bigger = 2 * chosen
            assert roofline.predict_mixed(chunks_within(prefill, bigger - len(decodes)), decodes) > 0.030


PADDING = StepPadding(max_seqs=64, min_tokens=16)


class PaddedLinearStep(LinearStep):
    """``LinearStep`` costed on the padded bucket, as the engine runs it; it shows the
    correction its buckets (``padding``) only when ``bucketed``."""

    def __init__(self, bucketed: bool):
        super().__init__()
        self.padding = PADDING if bucketed else None

    def predict_mixed(self, prefill, decode_context_lens, sm_share=1.0):
        tokens = sum(q for q, _ in prefill) + len(decode_context_lens)
        return 1e-5 * PADDING.padded(tokens, 1, False)[0] + 1e-6 * sum(decode_context_lens)


@pytest.mark.parametrize("bucketed", [True, False])
def test_small_steps_error_does_not_shrink_the_large_budgets(bucketed):
    """Steps of 512 tokens or fewer run 1.3x their prediction (a step's fixed costs weigh most
    on small ones), 1,024-token ones 1.05x; one iteration in three has only a short prompt
    tail left (a small step whatever the budget). With a ratio per bucket, every long-prompt
    iteration gets the 1,024 budget that its bucket's ratio says fits the SLO. One ratio over
    every size is pulled up by the small steps, shrinks the long prompts' budget, learns from
    the smaller steps that follows, and stays there."""
    raw = PaddedLinearStep(bucketed)
    bias = lambda tokens: 1.05 if PADDING.padded(tokens, 1, False)[0] > 512 else 1.3
    decodes = [500] * 24  # 12 ms of decode attention; each padded token 0.01 ms
    budget = TokenBudget(CorrectedRoofline(raw, Correction()), tbt_slo_s=0.027, max_tokens=1024,
                         min_tokens=16, min_prefill_tokens=16)
    full = raw.predict_mixed([(1000, 0)], decodes)
    assert full * 1.05 < budget.target_s < full * 1.15  # 1,024 fits, with its own ratio only
    long_prompt_budgets = []
    for i in range(300):
        prefill = [(300, 5000)] if i % 3 == 2 else [(6000, 0)]
        chosen = budget.choose(prefill, decodes)
        chunks = chunks_within(prefill, chosen - len(decodes))
        tokens = len(decodes) + sum(q for q, _ in chunks)
        measured = raw.predict_mixed(chunks, decodes) * bias(tokens)
        budget.observe_aggregated(budget.last_predicted_s, measured, tokens)
        if i >= 30 and i % 3 != 2:
            long_prompt_budgets.append(chosen)
    if bucketed:
        assert set(long_prompt_budgets) == {1024}
    else:  # what the buckets are for
        assert long_prompt_budgets.count(512) > len(long_prompt_budgets) / 2


@pytest.fixture(scope="module")
def slow_profile(tiny_llama_dir, tmp_path_factory):
    """A compute-bound profile whose step time is proportional to its tokens, and the SLO
    that a mixed step of 32 tokens fits and one of 64 misses."""
    from models.config import ModelConfig

    profile = DeviceProfile(gpu_name="test", overhead_s=0.0, levels=(
        SMLevel(0.5, 5e8, 1e18), SMLevel(1.0, 1e9, 1e18)))
    config = ModelConfig.from_hf(json.loads((tiny_llama_dir / "config.json").read_text()))
    roofline = Roofline(ModelShape.from_config(config, dtype_bytes=4), profile,
                        StepPadding(max_seqs=4, min_tokens=16))
    t32 = roofline.predict_mixed([(28, 0)], [10] * 4)
    t64 = roofline.predict_mixed([(60, 0)], [10] * 4)
    assert t32 < t64
    path = tmp_path_factory.mktemp("profile") / "slow.json"
    profile.save(path)
    return str(path), 1e3 * (t32 + t64) / 2 / 0.9  # (the budget keeps 10 % headroom)


def generate_recording(engine, batch, params):
    """The engine's tokens for ``batch``, with every batch it scheduled and every compilation
    that happened meanwhile."""
    import jax

    scheduled = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda *a, **kw: scheduled.append(schedule(*a, **kw)) or scheduled[-1]
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        got = token_ids(engine.generate(batch, params, use_tqdm=False))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return got, scheduled, compiles


def test_engine_uses_smaller_budgets_and_changes_no_token(tiny_llama_dir, slow_profile):
    path, slo_ms = slow_profile
    config = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=128,
                  show_progress=False, duet_online_correction=False, slo_min_prefill_tokens=16)
    rng = np.random.default_rng(11)
    batch = [{"prompt_token_ids": rng.integers(3, 256, size=n).tolist()}
             for n in (40, 150, 20, 90, 33, 120)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
              for m in (20, 8, 25, 6, 18, 10)]
    fixed = Engine(tiny_llama_dir, **config)
    expected = token_ids(fixed.generate(batch, params, use_tqdm=False))

    engine = Engine(tiny_llama_dir, tbt_slo_ms=slo_ms, device_profile=path, **config)
    got, scheduled, compiles = generate_recording(engine, batch, params)
    assert got == expected
    assert compiles == []
    choices = engine.stats().token_budget_choices
    assert 32 in choices and engine.stats().token_budget in choices  # (128: prefill alone)
    mixed = [b for b in scheduled if b.scheduled and not b.decode_only]
    with_decodes = [b for b in mixed if any(s.num_new_tokens == 1 for s in b.scheduled)]
    assert with_decodes, "no mixed step met a decode"
    assert max(b.num_tokens for b in with_decodes) <= 32  # the budget that fits the SLO
    assert max(b.num_tokens for b in mixed) > 32  # alone, prefill takes the whole budget


def test_engine_ttft_pace_takes_larger_budgets_past_the_slo(tiny_llama_dir, slow_profile):
    """A TTFT target too short for the queue: the pace takes budgets past the one that fits
    the TBT SLO (32), with the same tokens and nothing compiled while serving. (The queue is
    seen at a clock stopped before the requests arrive, so that none runs out of time.)"""
    import time

    path, slo_ms = slow_profile
    config = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=128,
                  show_progress=False, duet_online_correction=False, slo_min_prefill_tokens=16)
    batch = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (40, 150, 20, 90, 120)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = token_ids(Engine(tiny_llama_dir, **config).generate(batch, params, use_tqdm=False))
    engine = Engine(tiny_llama_dir, tbt_slo_ms=slo_ms, slo_ttft_ms=1.0, device_profile=path,
                    **config)
    queue_to_pace, stopped = engine.scheduler.queue_to_pace, time.time()
    engine.scheduler.queue_to_pace = lambda now: queue_to_pace(stopped)
    got, scheduled, compiles = generate_recording(engine, batch, params)
    assert got == expected and compiles == []
    with_decodes = [b for b in scheduled if b.scheduled and not b.decode_only
                    and any(s.num_new_tokens == 1 for s in b.scheduled)]
    assert with_decodes and max(b.num_tokens for b in with_decodes) > 32
    with pytest.raises(ConfigError, match="slo_ttft_ms"):
        EngineConfig(slo_ttft_ms=0.0)


def test_slo_in_aggregated_mode_on_cpu_needs_a_profile(tiny_llama_dir):
    with pytest.raises(ValueError, match="device_profile"):
        Engine(tiny_llama_dir, dtype="float32", tbt_slo_ms=50.0, show_progress=False,
               compile_on_start=False)


def test_engine_stats_show_what_the_budgets_correction_learned(tiny_llama_dir, slow_profile):
    """The SLO-aware budget's online correction is visible in ``stats()`` (and /metrics): it
    learns from mixed steps (the CPU runs this profile's steps at another speed than it
    predicts), and stays at 1.0 with the correction off."""
    path, slo_ms = slow_profile
    config = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=128,
                  show_progress=False, slo_min_prefill_tokens=16, tbt_slo_ms=slo_ms,
                  device_profile=path)
    batch = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (40, 150, 20, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    learning = Engine(tiny_llama_dir, **config)
    learning.generate(batch, params, use_tqdm=False)
    stats = learning.stats()
    assert stats.mixed_step_observations > 0 and stats.mixed_step_correction != 1.0
    p50, p90, p99 = stats.mixed_step_errors
    assert 0 < p50 <= p90 <= p99
    fixed = Engine(tiny_llama_dir, duet_online_correction=False, **config)
    fixed.generate(batch, params, use_tqdm=False)
    assert (fixed.stats().mixed_step_observations, fixed.stats().mixed_step_correction,
            fixed.stats().mixed_step_errors) == (0, 1.0, ())
