"""The partition optimizer and its hysteresis, on constructed profiles."""
import itertools

import numpy as np
import pytest

from duetjax.perf.optimizer import (AGGREGATED, SPLIT, HysteresisConfig, ModeController,
                               OptimizerConfig, decide, predict_aggregated)
from duetjax.perf.roofline import DeviceProfile, InterferencePoint, ModelShape, Roofline, SMLevel

SHAPE = ModelShape(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, head_dim=16, vocab_size=256)
PAIRS = ((0.8, 0.2), (0.7, 0.3), (0.6, 0.4), (0.5, 0.5))


def saturating_profile(interference=()) -> DeviceProfile:
    """Like the H200 under MPS: compute linear in the SM share, bandwidth full at half the SMs."""
    levels = tuple(SMLevel(s / 10, 1e10 * s / 10, 1e8 * min(1.0, 2 * s / 10)) for s in range(1, 11))
    return DeviceProfile("Constructed", levels, interference=interference)


ROOFLINE = Roofline(SHAPE, saturating_profile())
SMALL_DECODE = [100] * 8       # 8 decodes with 100 cached tokens each
HEAVY_DECODE = [2000] * 32     # 32 decodes with 2000 cached tokens each


def brute_force(roofline, prefill, decodes, slo, pairs, k_max):
    """Every (s_p, s_d, k) whose decode step fits, with its objective; the best one."""
    t_dec, t_pre = len(decodes), sum(q for q, _ in prefill)
    candidates = []
    for (s_p, s_d), k in itertools.product(pairs, range(1, k_max + 1)):
        t_p, t_d = roofline.predict_split(prefill, decodes, s_p, s_d)
        if t_d <= slo:
            candidates.append(((k * t_dec + t_pre) / max(k * t_d, t_p), s_p, s_d, k))
    return max(candidates, key=lambda c: c[0]) if candidates else None


def test_aggregated_when_it_fits():
    prefill = [(256, 0)]
    t_agg = predict_aggregated(ROOFLINE, prefill, SMALL_DECODE)
    d = decide(ROOFLINE, prefill, SMALL_DECODE, OptimizerConfig(tbt_slo_s=t_agg * 1.01))
    assert (d.mode, d.s_p, d.s_d, d.k, d.slo_met) == (AGGREGATED, 1.0, 1.0, 1, True)
    assert d.t_aggregated == pytest.approx(t_agg) and d.t_prefill is None
    assert d.objective == pytest.approx((8 + 256) / t_agg)


@pytest.mark.parametrize("prefill,slo", [([(256, 0)], 0.01), ([(1024, 0), (512, 300)], 0.006),
                                         ([(300, 0)], 0.02), ([(4096, 0)], 0.012)])
def test_split_is_the_brute_force_best(prefill, slo):
    config = OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS, k_max=8)
    assert predict_aggregated(ROOFLINE, prefill, SMALL_DECODE) > slo  # the case needs a split
    best = brute_force(ROOFLINE, prefill, SMALL_DECODE, slo, PAIRS, 8)
    d = decide(ROOFLINE, prefill, SMALL_DECODE, config)
    assert d.mode == SPLIT and d.slo_met
    assert d.objective == pytest.approx(best[0])
    assert (d.s_p, d.s_d, d.k) == best[1:]
    assert d.t_decode <= slo


def test_infeasible_pairs_are_skipped():
    # SLO 0.01: the 20 % decode worker takes 0.0114 s per step, every other pair fits.
    prefill = [(256, 0)]
    t_d_20 = ROOFLINE.predict_split(prefill, SMALL_DECODE, 0.8, 0.2)[1]
    assert t_d_20 > 0.01
    d = decide(ROOFLINE, prefill, SMALL_DECODE, OptimizerConfig(tbt_slo_s=0.01, pairs=PAIRS))
    assert d.mode == SPLIT and d.s_d != 0.2
    only_20 = decide(ROOFLINE, prefill, SMALL_DECODE,
                     OptimizerConfig(tbt_slo_s=0.01, pairs=((0.8, 0.2),)))
    assert only_20.mode == AGGREGATED and not only_20.slo_met and "fallback" in only_20.reason


def test_interference_steers_the_choice():
    # Measure every pair: no slowdown, except that the decode client of the pair that wins
    # without interference keeps only 40 % of its rates. The optimizer must move elsewhere.
    prefill = [(4096, 0)]
    config = OptimizerConfig(tbt_slo_s=0.01, pairs=PAIRS, k_max=8)
    clean = decide(ROOFLINE, prefill, SMALL_DECODE, config)
    assert clean.mode == SPLIT
    factor = {pair: 0.4 if pair == (clean.s_p, clean.s_d) else 1.0 for pair in PAIRS}
    slowed = Roofline(SHAPE, saturating_profile(interference=tuple(
        InterferencePoint(s_p, s_d, decode_rate=f, decode_bandwidth=f)
        for (s_p, s_d), f in factor.items())))
    d = decide(slowed, prefill, SMALL_DECODE, config)
    best = brute_force(slowed, prefill, SMALL_DECODE, 0.01, PAIRS, 8)
    assert d.mode == SPLIT and (d.s_p, d.s_d, d.k) == best[1:]
    assert (d.s_p, d.s_d) != (clean.s_p, clean.s_d)
    slowed_t_d = slowed.predict_split(prefill, SMALL_DECODE, clean.s_p, clean.s_d)[1]
    assert slowed_t_d == pytest.approx(clean.t_decode / 0.4)


def test_fallback_when_nothing_fits():
    prefill = [(256, 0)]
    t_alone = ROOFLINE.predict_decode(SMALL_DECODE, 1.0)
    # SLO below even decode alone on the whole GPU.
    d = decide(ROOFLINE, prefill, SMALL_DECODE, OptimizerConfig(tbt_slo_s=t_alone / 2))
    assert d.mode == AGGREGATED and not d.slo_met
    assert "fallback" in d.reason and "misses it too" in d.reason
    # SLO that decode alone would meet, but neither aggregated nor any split pair does:
    # still aggregated (prefill is never starved), and the reason says decode alone fits.
    slo = t_alone * 1.001
    assert all(ROOFLINE.predict_split(prefill, SMALL_DECODE, *p)[1] > slo for p in PAIRS[:3])
    d = decide(ROOFLINE, prefill, SMALL_DECODE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS[:3]))
    assert d.mode == AGGREGATED and not d.slo_met and "would fit" in d.reason


def test_nothing_to_split_is_aggregated():
    config = OptimizerConfig(tbt_slo_s=1e-9)
    assert decide(ROOFLINE, [], SMALL_DECODE, config).mode == AGGREGATED
    no_decode = decide(ROOFLINE, [(4096, 0)], [], config)
    assert no_decode.mode == AGGREGATED and no_decode.slo_met  # no TBT to protect


def test_k_is_one_when_prefill_is_shorter_than_a_decode_step():
    # 32 long decodes and a 64-token chunk: only 50/50 fits SLO 0.17 s, and there the prefill
    # (0.0067 s) is shorter than one decode step (0.168 s): more decode steps only add time.
    prefill = [(64, 0)]
    assert predict_aggregated(ROOFLINE, prefill, HEAVY_DECODE) > 0.17
    t_p, t_d = ROOFLINE.predict_split(prefill, HEAVY_DECODE, 0.5, 0.5)
    assert t_p < t_d <= 0.17
    d = decide(ROOFLINE, prefill, HEAVY_DECODE, OptimizerConfig(tbt_slo_s=0.17, pairs=PAIRS, k_max=8))
    assert (d.mode, d.s_p, d.s_d, d.k) == (SPLIT, 0.5, 0.5, 1)
    assert d.objective == pytest.approx((32 + 64) / t_d)


def test_k_is_k_max_when_prefill_is_much_longer():
    prefill = [(4096, 0)]
    config = OptimizerConfig(tbt_slo_s=0.01, pairs=PAIRS, k_max=6)
    d = decide(ROOFLINE, prefill, SMALL_DECODE, config)
    assert d.t_prefill > 6 * d.t_decode  # the prefill outlasts k_max decode steps
    assert d.k == 6
    assert d.objective == pytest.approx((6 * 8 + 4096) / d.t_prefill)


def test_config_validation():
    with pytest.raises(ValueError):
        OptimizerConfig(tbt_slo_s=0.0)
    with pytest.raises(ValueError):
        OptimizerConfig(tbt_slo_s=0.1, k_max=0)
    with pytest.raises(ValueError):
        OptimizerConfig(tbt_slo_s=0.1, pairs=((1.2, 0.2),))


# --- hysteresis ---

def prefill_for(target_s: float) -> list[tuple[int, int]]:
    """The smallest single prefill chunk whose aggregated time with SMALL_DECODE exceeds target."""
    q = 1
    while predict_aggregated(ROOFLINE, [(q, 0)], SMALL_DECODE) <= target_s:
        q += 1
    return [(q, 0)]


@pytest.fixture(scope="module")
def cases():
    slo = 0.012
    fit = [(8, 0)]
    marginal = prefill_for(slo)  # misses by a hair
    big = prefill_for(slo * 1.5)
    t = {name: predict_aggregated(ROOFLINE, p, SMALL_DECODE) for name, p in
         (("fit", fit), ("marginal", marginal), ("big", big))}
    assert t["fit"] <= 0.9 * slo < slo < t["marginal"] <= 1.05 * slo < t["big"]
    return slo, fit, marginal, big


def test_hysteresis_enters_split_after_n_misses_or_one_big_miss(cases):
    slo, fit, marginal, big = cases
    ctl = ModeController(ROOFLINE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS),
                         HysteresisConfig(enter_after=2, enter_margin=0.05, headroom=0.0))
    first = ctl.step(marginal, SMALL_DECODE)
    assert first.mode == AGGREGATED and "hysteresis" in first.reason
    assert ctl.step(marginal, SMALL_DECODE).mode == SPLIT
    ctl = ModeController(ROOFLINE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS))
    assert ctl.step(big, SMALL_DECODE).mode == SPLIT


def test_hysteresis_does_not_flap_on_alternating_inputs(cases):
    slo, fit, marginal, big = cases
    ctl = ModeController(ROOFLINE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS),
                         HysteresisConfig(enter_after=2, exit_after=3, exit_margin=0.1,
                                          headroom=0.0))
    # Aggregated: marginal misses never come twice in a row, so it never splits.
    modes = [ctl.step(p, SMALL_DECODE).mode for p in [marginal, fit] * 5]
    assert modes == [AGGREGATED] * 10
    # Split: comfortable fits never come three times in a row, so it stays split.
    ctl.step(big, SMALL_DECODE)
    modes = [ctl.step(p, SMALL_DECODE).mode for p in [fit, fit, marginal] * 4]
    assert modes == [SPLIT] * 12
    # Three comfortable fits in a row bring it back.
    modes = [ctl.step(fit, SMALL_DECODE).mode for _ in range(3)]
    assert modes == [SPLIT, SPLIT, AGGREGATED]
    assert ctl.mode == AGGREGATED


def test_default_headroom_splits_a_near_miss_at_once(cases):
    """Predicted within the SLO but inside its 10 % headroom: split now (a real miss of a
    mixed iteration breaks the SLO for every running request)."""
    slo = 0.012
    near = prefill_for(0.93 * slo)
    assert predict_aggregated(ROOFLINE, near, SMALL_DECODE) <= slo
    ctl = ModeController(ROOFLINE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS))
    assert ctl.step(near, SMALL_DECODE).mode == SPLIT
    with pytest.raises(ValueError, match="exit_margin must be >= headroom"):
        HysteresisConfig(headroom=0.2, exit_margin=0.1)


def test_controller_split_decisions_are_the_optimizer_best(cases):
    slo, fit, marginal, big = cases
    ctl = ModeController(ROOFLINE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS, k_max=8))
    ctl.step(big, SMALL_DECODE)
    d = ctl.step(fit, SMALL_DECODE)  # still split (hysteresis), re-optimised for this batch
    best = brute_force(ROOFLINE, fit, SMALL_DECODE, slo, PAIRS, 8)
    assert d.mode == SPLIT and (d.s_p, d.s_d, d.k) == best[1:] and "staying split" in d.reason
    # An empty prefill queue ends split mode at once.
    assert ctl.step([], SMALL_DECODE).mode == AGGREGATED and ctl.mode == AGGREGATED


def test_h200_llama8b_splits_under_a_tight_slo():
    """The shipped profile on a real shape: 64 decodes at 2k context plus a 2048-token chunk."""
    import json
    from pathlib import Path

    from duetjax.perf.roofline import load_profile
    cfg = json.loads((Path(__file__).resolve().parents[3] / "models/configs/llama-3-8b/config.json").read_text())
    shape = ModelShape(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                       intermediate_size=cfg["intermediate_size"],
                       num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                       head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
                       vocab_size=cfg["vocab_size"])
    r = Roofline(shape, load_profile("NVIDIA H200"))
    prefill, decodes = [(2048, 0)], [2048] * 64
    config = OptimizerConfig(tbt_slo_s=0.030, k_max=16)
    d = decide(r, prefill, decodes, config)
    assert d.t_aggregated > 0.030 and d.mode == SPLIT and d.t_decode <= 0.030
    best = brute_force(r, prefill, decodes, 0.030, config.pairs, 16)
    assert (d.s_p, d.s_d, d.k) == best[1:]


def _roofline():
    from duetjax.perf.roofline import DeviceProfile, ModelShape, Roofline, SMLevel
    from models.config import ModelConfig
    from tests.helpers import TINY_LLAMA

    profile = DeviceProfile(gpu_name="test", overhead_s=0.0, levels=(
        SMLevel(0.5, 5e8, 1e18), SMLevel(1.0, 1e9, 1e18)))
    return Roofline(ModelShape.from_config(ModelConfig.from_hf(TINY_LLAMA), dtype_bytes=4), profile)


def test_static_controller_always_splits_when_both_phases_present():
    from duetjax.perf.optimizer import AGGREGATED, SPLIT, OptimizerConfig, StaticController, decide

    roofline = _roofline()
    config = OptimizerConfig(tbt_slo_s=10.0, pairs=((0.5, 0.5),), k_max=8)  # everything fits
    controller = StaticController(roofline, config)
    prefill, decode = [(24, 0)], [16, 30]
    assert decide(roofline, prefill, decode, config).mode == AGGREGATED  # DuetServe would not split
    d = controller.step(prefill, decode)
    assert (d.mode, d.s_p, d.s_d) == (SPLIT, 0.5, 0.5) and controller.mode == SPLIT
    t_p, t_d = roofline.predict_split(prefill, decode, 0.5, 0.5)
    objectives = [(k * 2 + 24) / max(k * t_d, t_p) for k in range(1, 9)]
    assert d.k == 1 + int(np.argmax(objectives))
    assert (d.t_prefill, d.t_decode) == (t_p, t_d)
    assert controller.step([], decode).mode == AGGREGATED
    assert controller.step(prefill, []).mode == AGGREGATED
    # a big prefill chunk: decode keeps stepping while it runs (k > 1)
    assert controller.step([(512, 0)], [16]).k > 1


def _budgeted_controller(slo, pairs=PAIRS):
    from duetjax.perf.token_budget import TokenBudget

    config = OptimizerConfig(tbt_slo_s=slo, pairs=pairs, k_max=8)
    return ModeController(ROOFLINE, config, token_budget=TokenBudget(
        ROOFLINE, slo, max_tokens=4096, min_tokens=16, min_prefill_tokens=16, headroom=0.0))


@pytest.mark.parametrize("prefill,slo", [([(256, 0)], 0.01), ([(1024, 0), (512, 300)], 0.006),
                                         ([(300, 0)], 0.02), ([(4096, 0)], 0.012)])
def test_a_smaller_aggregated_budget_competes_with_the_split(prefill, slo):
    """Where the full mixed step misses the SLO, the controller picks whichever predicts more
    tokens per second within the SLO: the best split, or the whole GPU at the largest budget
    that fits."""
    from duetjax.perf.token_budget import chunks_within

    controller = _budgeted_controller(slo)
    d = controller.step(prefill, SMALL_DECODE)
    split = decide(ROOFLINE, prefill, SMALL_DECODE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS))
    budget = controller.token_budget.choose(prefill, SMALL_DECODE)
    t = controller.token_budget.last_predicted_s
    tokens = len(SMALL_DECODE) + sum(q for q, _ in chunks_within(prefill, budget - len(SMALL_DECODE)))
    if t <= slo and tokens / t >= split.objective:  # (no headroom here)
        assert (d.mode, d.token_budget) == (AGGREGATED, budget)
        assert d.objective == pytest.approx(tokens / t) and d.t_aggregated == pytest.approx(t)
        assert d.slo_met
    else:
        assert d.mode == SPLIT and d.objective == pytest.approx(split.objective)
        assert d.token_budget is None


def test_the_smaller_budget_is_weighed_against_the_split_iteration_as_it_runs():
    """With ``split_seconds`` (the engine's expected split iteration: the chunk, the decode
    stream's ending, its own work), a split whose iteration lasts far longer than its chunk
    loses to the smaller budget it beat on max(k·t_d, t_p)."""
    from duetjax.perf.token_budget import TokenBudget

    cases = [([(256, 0)], 0.01), ([(1024, 0), (512, 300)], 0.006), ([(300, 0)], 0.02),
             ([(4096, 0)], 0.012)]
    def budget_fits(prefill, slo):
        budget = TokenBudget(ROOFLINE, slo, 4096, 16, 16, headroom=0.0)
        budget.choose(prefill, SMALL_DECODE)
        return 0 < budget.last_predicted_s <= slo

    splits = [(prefill, slo) for prefill, slo in cases if budget_fits(prefill, slo)
              and _budgeted_controller(slo).step(prefill, SMALL_DECODE).mode == SPLIT]
    assert splits  # (some cases above hold splits that beat a smaller budget that fits)
    for prefill, slo in splits:
        split = _budgeted_controller(slo).step(prefill, SMALL_DECODE)
        slow = ModeController(ROOFLINE, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS, k_max=8),
                              token_budget=TokenBudget(ROOFLINE, slo, 4096, 16, 16, headroom=0.0),
                              split_seconds=lambda d: 20 * d.t_prefill)
        tokens = sum(q for q, _ in prefill)
        assert slow.split_rate(split, len(SMALL_DECODE), tokens) == pytest.approx(
            len(SMALL_DECODE) / split.t_decode + tokens / (20 * split.t_prefill))
        d = slow.step(prefill, SMALL_DECODE)
        assert d.mode == AGGREGATED and d.token_budget is not None
        assert "beats the best split" in d.reason


def test_smaller_budget_wins_when_splitting_costs_more_than_it_gives():
    """A profile whose SM shares give much less than their share (heavy interference) makes
    every split slower than the whole GPU at a smaller chunk."""
    interference = tuple(InterferencePoint(p, d, 0.3, 0.3, 0.3, 0.3) for p, d in PAIRS)
    roofline = Roofline(SHAPE, saturating_profile(interference))
    from duetjax.perf.token_budget import TokenBudget

    prefill = [(4096, 0)]
    slo = predict_aggregated(roofline, [(512, 0)], SMALL_DECODE) * 1.05
    controller = ModeController(roofline, OptimizerConfig(tbt_slo_s=slo, pairs=PAIRS),
                                token_budget=TokenBudget(roofline, slo, 4096, 16, 16, headroom=0.0))
    d = controller.step(prefill, SMALL_DECODE)
    assert d.mode == AGGREGATED and d.token_budget == 512 and d.slo_met


def test_no_feasible_split_takes_the_smaller_budget():
    prefill = [(4096, 0)]
    slo = predict_aggregated(ROOFLINE, [(64, 0)], HEAVY_DECODE) * 1.01
    controller = _budgeted_controller(slo, pairs=((0.9, 0.1),))  # a decode share too small
    d = controller.step(prefill, HEAVY_DECODE)
    assert d.mode == AGGREGATED and d.token_budget is not None and d.token_budget < 4096
    assert "no split pair meets the SLO" in d.reason
