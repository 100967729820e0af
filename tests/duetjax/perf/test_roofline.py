"""The roofline model: formulas by hand, regimes, interpolation, monotonicity, profiles."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from duetjax.perf.roofline import (DECODE_SPLITS, PREFILL_BLOCK_ROWS, DeviceProfile, Efficiency,
                              InterferencePoint, ModelShape, Roofline, SMLevel, StepPadding,
                              decode_splits, load_profile)

REPO = Path(__file__).resolve().parents[3]

# 1 layer, d = 8, 2 query heads and 1 KV head of width 4, MLP 16, vocab 32, bf16 (s = 2).
TINY = ModelShape(num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                  head_dim=4, vocab_size=32, dtype_bytes=2)


def flat_profile(flops: float, bandwidth: float, **kw) -> DeviceProfile:
    return DeviceProfile("Test GPU", (SMLevel(1.0, flops, bandwidth),), **kw)


def test_tiny_model_by_hand():
    # Π = 1000 FLOP/s, BW = 100 B/s: every op is memory bound, time = bytes / 100.
    # One request, q = 3 new tokens on c = 5 cached: n = 3 rows, 1 logit row.
    expected_bytes = {
        "embed": 2 * 3 * 8 * 2,                        # gather: read + write 3 rows of 8 = 96
        "attn_norm": (2 * 24 + 8) * 2,                 # 24 elements in and out + weight = 112
        "qkv_proj": (3 * 8 + 8 * 16 + 3 * 16) * 2,     # q 8 + k 4 + v 4 outputs: 400
        "attention": (2 * 2 * 3 * 4 + 2 * 1 * 8 * 4) * 2,  # Q in + O out, K and V of 8 keys = 224
        "o_proj": (3 * 8 + 8 * 8 + 3 * 8) * 2,         # 224
        "mlp_norm": (2 * 24 + 8) * 2,                  # 112
        "gate_up_proj": (3 * 8 + 8 * 32 + 3 * 32) * 2,  # 752
        "act": 3 * 48 * 2,                             # gate, up in, product out = 288
        "down_proj": (3 * 16 + 16 * 8 + 3 * 8) * 2,    # 400
        "final_norm": (2 * 8 + 8) * 2,                 # 48
        "lm_head": (1 * 8 + 8 * 32 + 1 * 32) * 2,      # 592
    }
    expected_flops = {
        "qkv_proj": 2 * 3 * 8 * 16,                   # 768
        # keys per new token 6, 7, 8 -> 21 pairs; 4 FLOPs per pair per head-dim element per q head
        "attention": 4 * 2 * 4 * (6 + 7 + 8),          # 672
        "gate_up_proj": 2 * 3 * 8 * 32,                # 1536
        "act": 5 * 48,                                 # 240
        "lm_head": 2 * 1 * 8 * 32,                     # 512
    }
    br = Roofline(TINY, flat_profile(1000.0, 100.0, overhead_s=0.5)).breakdown([(3, 5)])
    assert [op.name for op in br.ops] == list(expected_bytes)
    for name, b in expected_bytes.items():
        assert br.op(name).bytes == b, name
        assert br.op(name).bound == "memory", name
    for name, f in expected_flops.items():
        assert br.op(name).flops == f, name
    # 96+112+400+224+224+112+752+288+400+48+592 = 3248 bytes -> 32.48 s, + 0.5 s
    assert br.total_s == pytest.approx(32.48 + 0.5)


def test_compute_bound_and_efficiency_by_hand():
    # Π = 10, BW = 1e6: compute bound. A prefill of 4 tokens from scratch: causal pairs
    # 1+2+3+4 = 10 -> F = 4·2·4·10 = 320 -> 32 s; at attention efficiency 0.5 -> 64 s.
    shape = TINY
    r = Roofline(shape, flat_profile(10.0, 1e6, efficiency=Efficiency(attention=0.5)))
    att = r.breakdown([(4, 0)]).op("attention")
    assert att.flops == 320 and att.bound == "compute"
    assert att.time_s == pytest.approx(64.0)
    assert r.breakdown([(4, 0)]).op("qkv_proj").time_s == pytest.approx(2 * 4 * 8 * 16 / 10)


def test_attention_is_summed_per_request():
    # decode (1, 99):  F = 4·2·4·100 = 3200, B = (2·2·1·4 + 2·1·100·4)·2 = 1632
    # prefill (10, 0): F = 4·2·4·55 = 1760,  B = (2·2·10·4 + 2·1·10·4)·2 = 480
    # At Π = 300, BW = 100 the decode is memory bound (16.32 s > 10.67 s) and the prefill compute
    # bound (5.867 s > 4.8 s): per-request maxima sum to 22.187 s, while the max of the sums
    # would be max(4960 / 300, 2112 / 100) = 21.12 s.
    r = Roofline(TINY, flat_profile(300.0, 100.0))
    att = r.breakdown([(1, 99), (10, 0)]).op("attention")
    assert att.flops == 3200 + 1760 and att.bytes == 1632 + 480
    assert att.time_s == pytest.approx(16.32 + 1760 / 300)
    assert att.memory_s == pytest.approx(21.12) and att.compute_s == pytest.approx(4960 / 300)


def test_decodes_on_both_sides_of_the_ridge():
    # Π = BW = 1: a decode with k keys costs F = 32·k FLOPs (4·2 heads·4) and
    # B = 2·2·4·2 + k·2·1·4·2 = 32 + 16·k bytes, so k = 1 is memory bound (32 < 48) and
    # k = 6 compute bound (192 > 128): 48 + 192 = 240 s, not max(224, 176) = 224 s.
    r = Roofline(TINY, flat_profile(1.0, 1.0))
    assert r.breakdown([(1, 0), (1, 5)]).op("attention").time_s == pytest.approx(240.0)
    assert r.breakdown([(1, 5), (1, 5)]).op("attention").time_s == pytest.approx(384.0)
    assert r.breakdown([(1, 0), (1, 0)]).op("attention").time_s == pytest.approx(96.0)


@pytest.mark.parametrize("window", [0, 1, 2, 3, 5, 8, 100])
def test_sliding_window_counts_match_brute_force(window):
    shape = ModelShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2,
                       num_kv_heads=1, head_dim=4, vocab_size=32, layer_windows=(0, window))
    r = Roofline(shape, flat_profile(1.0, 1.0))
    for q, c in [(1, 0), (1, 7), (3, 5), (4, 1), (9, 0), (6, 20)]:
        pairs_full = sum(range(c + 1, c + q + 1))
        pairs_win = sum(min(p, window) if window else p for p in range(c + 1, c + q + 1))
        keys_full = q + c
        keys_win = len({k for p in range(c + 1, c + q + 1)
                        for k in range(1, p + 1) if not window or p - k < window})
        att = r.breakdown([(q, c)]).op("attention")
        assert att.flops == 4 * 2 * 4 * (pairs_full + pairs_win), (q, c)
        assert att.bytes == 2 * (2 * 2 * q * 4) * 2 + 2 * 1 * (keys_full + keys_win) * 4 * 2, (q, c)
    # The same requests in one batch: per-request maxima (Π = BW = 1), summed over both layers.
    batch = [(1, 0), (1, 3), (1, 12), (3, 5), (1, 40), (6, 20)]
    expected = 0.0
    for q, c in batch:
        for w in (0, window):
            keys = [min(p, w) if w else p for p in range(c + 1, c + q + 1)]
            read = len({k for p in range(c + 1, c + q + 1) for k in range(1, p + 1)
                        if not w or p - k < w})
            expected += max(4 * 2 * 4 * sum(keys), (2 * 2 * q * 4 + 2 * 1 * read * 4) * 2)
    assert r.breakdown(batch).op("attention").time_s == pytest.approx(expected)


def test_num_logits_and_layers_scale_as_stated():
    one = Roofline(TINY, flat_profile(1000.0, 100.0))
    four = Roofline(ModelShape(**{**TINY.__dict__, "num_layers": 4}), flat_profile(1000.0, 100.0))
    batch = [(3, 5), (1, 10)]
    b1, b4 = one.breakdown(batch), four.breakdown(batch)
    for name in ("qkv_proj", "attention", "act"):
        assert b4.op(name).time_s == pytest.approx(4 * b1.op(name).time_s)
    for name in ("embed", "lm_head", "final_norm"):  # once per model, not per layer
        assert b4.op(name).time_s == pytest.approx(b1.op(name).time_s)
    assert b1.op("lm_head").bytes == (2 * 8 + 8 * 32 + 2 * 32) * 2
    no_logits = one.breakdown(batch, num_logits=0)
    assert "lm_head" not in [op.name for op in no_logits.ops]
    with pytest.raises(ValueError):
        one.predict(batch, num_logits=5)  # only 4 rows exist


@pytest.fixture(scope="module")
def h200() -> DeviceProfile:
    return load_profile("NVIDIA H200")


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    from models.config import ModelConfig  # the models package imports jax: tests only
    cfg = ModelConfig.from_hf(json.loads((REPO / "models/configs/llama-3-8b/config.json").read_text()))
    shape = ModelShape.from_config(cfg)
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_dim) == (32, 4096, 8, 128)
    return shape


def _rates_only(profile: DeviceProfile) -> DeviceProfile:
    """The shipped profile's measured rates with every efficiency factor at 1 and no
    attention-span terms (what the hand computations below cost)."""
    return dataclasses.replace(profile, efficiency=Efficiency(), program_slots=0.0,
                               prefill_program_slots=0.0)


def test_decode_batch_one_is_bandwidth_bound(h200, llama8b):
    h200 = _rates_only(h200)
    r = Roofline(llama8b, h200)
    br = r.breakdown([(1, 2048)])
    assert all(op.bound == "memory" for op in br.ops)
    # Independent check: a batch-1 step reads every weight once (8.03e9 bf16 params) plus the
    # KV of 2049 tokens (32 layers · 2 · 8 heads · 128 · 2 bytes each), at the full-GPU copy rate.
    params = 32 * (4096 * 128 * (32 + 8 + 8 + 32) + 3 * 4096 * 14336) + 128256 * 4096
    kv = 32 * 2 * 8 * 128 * 2 * 2049
    expected = (params * 2 + kv) / h200.bandwidth_at(1.0) + h200.overhead_s
    assert br.total_s == pytest.approx(expected, rel=0.01)


def test_efficiency_divides_its_op_class(h200, llama8b):
    plain = Roofline(llama8b, _rates_only(h200)).breakdown([(1, 2048)])
    slowed = Roofline(llama8b, dataclasses.replace(h200, efficiency=Efficiency(gemm=0.5))).breakdown(
        [(1, 2048)])
    assert slowed.op("qkv_proj").time_s == pytest.approx(2 * plain.op("qkv_proj").time_s)
    assert slowed.op("attention").time_s == pytest.approx(plain.op("attention").time_s)


def test_long_prefill_is_compute_bound(h200, llama8b):
    h200 = _rates_only(h200)
    br = Roofline(llama8b, h200).breakdown([(8192, 0)], num_logits=1)
    for name in ("qkv_proj", "gate_up_proj", "down_proj", "attention"):
        assert br.op(name).bound == "compute", name
    linear_flops = 2 * 8192 * 32 * (4096 * 128 * (32 + 8 + 8 + 32) + 3 * 4096 * 14336)
    attn_flops = 4 * 32 * 128 * (8192 * 8193 // 2) * 32
    compute = (linear_flops + attn_flops) / h200.flops_at(1.0)
    # Norms, the activation, the gather and the 1-row LM head stay memory bound.
    n, d, inter = 8192, 4096, 14336
    elementwise = 32 * (2 * (2 * n * d + d) + 3 * n * inter) * 2 + 2 * n * d * 2
    head = ((2 * d + d) + (d + d * 128256 + 128256)) * 2
    assert br.total_s == pytest.approx(compute + (elementwise + head) / h200.bandwidth_at(1.0)
                                       + h200.overhead_s, rel=1e-6)


def test_interpolation_between_levels():
    p = DeviceProfile("X", (SMLevel(0.2, 100.0, 10.0), SMLevel(0.6, 300.0, 50.0)))
    assert p.flops_at(0.4) == pytest.approx(200.0) and p.bandwidth_at(0.4) == pytest.approx(30.0)
    assert p.flops_at(0.5) == pytest.approx(250.0) and p.bandwidth_at(0.3) == pytest.approx(20.0)
    assert p.flops_at(0.1) == pytest.approx(50.0) and p.bandwidth_at(0.1) == pytest.approx(5.0)
    assert p.flops_at(1.0) == 300.0 and p.bandwidth_at(0.6) == 50.0
    # A memory-bound op at 0.4 takes bytes / 30.
    r = Roofline(TINY, p)
    assert r.breakdown([(1, 0)], 0.4).op("embed").time_s == pytest.approx(2 * 8 * 2 / 30.0)
    with pytest.raises(ValueError):
        p.flops_at(0.0)


def test_h200_profile_is_a_plausible_calibration(h200):
    """The shipped profile comes from tools/calibrate.py on an H200: rates near the datasheet's
    reach (bf16 dense 989 TFLOP/s, HBM 4.8 TB/s) and docs/design.md's measurements, growing with the
    SM share, interference factors that slow clients down."""
    assert "calibrate.py" in h200.source and "H200" in h200.source
    assert 700e12 < h200.flops_at(1.0) < 900e12 and 3.8e12 < h200.bandwidth_at(1.0) < 4.8e12
    assert 0.2 < h200.flops_at(0.3) / h200.flops_at(1.0) < 0.45  # a matmul scales with SMs
    assert h200.bandwidth_at(0.5) / h200.bandwidth_at(1.0) > 0.8  # a copy saturates early
    assert 0 < h200.efficiency.gemm <= 1
    for point in h200.interference:
        assert 0 < point.prefill_rate <= 1 and 0 < point.decode_bandwidth <= 1


def test_more_sms_are_never_slower(h200, llama8b):
    r = Roofline(llama8b, h200)
    shares = [i / 20 for i in range(1, 21)]
    for batch in ([(1, 100)], [(1, 4096)] * 64, [(512, 0)], [(2048, 1024), (1, 300)]):
        times = [r.predict(batch, s) for s in shares]
        assert all(a >= b for a, b in zip(times, times[1:])), batch
        assert times[0] > times[-1]


def test_profile_validation():
    with pytest.raises(ValueError):  # bandwidth drops with more SMs
        DeviceProfile("X", (SMLevel(0.5, 1.0, 2.0), SMLevel(1.0, 2.0, 1.0)))
    with pytest.raises(ValueError):
        DeviceProfile("X", ())
    with pytest.raises(ValueError):
        flat_profile(1.0, 1.0, efficiency=Efficiency(gemm=1.5))
    with pytest.raises(ValueError, match="program_slots"):
        flat_profile(1.0, 1.0, program_slots=-1.0)
    with pytest.raises(ValueError, match="prefill_program_slots"):
        flat_profile(1.0, 1.0, prefill_program_slots=-1.0)


def test_interference_interpolates_within_a_total():
    p = flat_profile(1.0, 1.0, interference=(
        InterferencePoint(0.9, 0.1, prefill_rate=0.9, decode_bandwidth=0.7),
        InterferencePoint(0.5, 0.5, prefill_rate=0.5, decode_bandwidth=0.9),
        InterferencePoint(1.0, 1.0, prefill_rate=0.6, decode_bandwidth=0.4)))
    mid = p.interference_at(0.7, 0.3)
    assert mid.prefill_rate == pytest.approx(0.7) and mid.decode_bandwidth == pytest.approx(0.8)
    assert p.interference_at(0.95, 0.05).decode_bandwidth == pytest.approx(0.7)  # held
    assert p.interference_at(1.0, 1.0).decode_bandwidth == pytest.approx(0.4)
    with pytest.raises(ValueError, match="measured totals"):
        p.interference_at(0.5, 0.3)
    assert flat_profile(1.0, 1.0).interference_at(0.5, 0.3).decode_bandwidth == 1.0


def test_predict_split_applies_the_pair_slowdown():
    p = flat_profile(1000.0, 100.0, interference=(
        InterferencePoint(0.5, 0.5, prefill_bandwidth=0.5, decode_bandwidth=0.25),))
    r = Roofline(TINY, p)
    t_p, t_d = r.predict_split([(3, 5)], [7, 9], 0.5, 0.5)
    assert t_p == pytest.approx(2 * r.predict([(3, 5)], 0.5))  # memory bound: half bandwidth
    assert t_d == pytest.approx(4 * r.predict_decode([7, 9], 0.5))


def test_profile_json_round_trip(tmp_path):
    p = DeviceProfile("NVIDIA Test", (SMLevel(0.5, 1e12, 1e11), SMLevel(1.0, 2e12, 2e11)),
                      efficiency=Efficiency(0.9, 0.5, 0.8), overhead_s=1e-4, program_slots=116.0,
                      prefill_program_slots=340.0,
                      interference=(InterferencePoint(0.5, 0.5, 0.7, 0.6, 0.9, 0.8),),
                      source="test", notes=("a note",))
    path = tmp_path / "nvidia-test.json"
    p.save(path)
    assert DeviceProfile.from_json(path) == p
    assert load_profile("nvidia test", tmp_path) == p
    older = p.to_dict()
    del older["program_slots"], older["prefill_program_slots"]  # before the span terms
    assert DeviceProfile.from_dict(older).program_slots == 0.0  # not modelled
    assert DeviceProfile.from_dict(older).prefill_program_slots == 0.0


def test_no_matching_profile_lists_the_available_ones(tmp_path):
    flat_profile(1.0, 1.0).save(tmp_path / "test-gpu.json")
    with pytest.raises(LookupError, match=r"'NVIDIA H200 NVL'.*available: 'Test GPU' \(test-gpu.json\)"):
        load_profile("NVIDIA H200 NVL", tmp_path)
    with pytest.raises(LookupError, match="NVIDIA H200"):  # the shipped profiles are listed
        load_profile("NVIDIA B200")


def test_host_modules_do_not_import_jax():
    # duetjax/__init__ imports the engine (and jax), so load the two modules without it.
    code = (
        "import sys, types; pkg = types.ModuleType('duetjax'); "
        f"pkg.__path__ = [{str(REPO / 'duetjax')!r}]; sys.modules['duetjax'] = pkg; "
        "import duetjax.perf.roofline, duetjax.perf.optimizer; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy', 'models')]; "
        "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_from_config_keeps_windows_and_norms():
    from models.config import ModelConfig
    cfg = ModelConfig.from_hf(json.loads((REPO / "models/configs/gemma-2-9b/config.json").read_text()))
    shape = ModelShape.from_config(cfg, dtype_bytes=4)
    assert shape.sandwich_norm and shape.tie_word_embeddings and shape.dtype_bytes == 4
    assert shape.layer_windows == cfg.layer_windows and shape.window_counts() == {4096: 21, 0: 21}
    names = [op.name for op in Roofline(shape, flat_profile(1.0, 1.0)).breakdown([(1, 10)]).ops]
    assert "post_attn_norm" in names and "post_mlp_norm" in names and "q_norm" not in names


def test_host_side_modules_do_not_load_jax():
    """The scheduler, roofline and optimizer run on the host every iteration: no JAX import."""
    import subprocess
    import sys

    code = ("import sys, duetjax.perf.roofline, duetjax.perf.optimizer, duetjax.core.scheduler; "
            "sys.exit(1 if 'jax' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_padding_costs_the_bucket_that_runs(h200, llama8b):
    padding = StepPadding(max_seqs=64, min_tokens=16)
    padded, plain = Roofline(llama8b, h200, padding), Roofline(llama8b, h200)

    def op(roofline, batch, name):
        return roofline.breakdown(batch).op(name)

    # 1,100 prefill tokens run in the 2,048-token bucket, whose LM head has 64 rows
    assert op(padded, [(1100, 0)], "qkv_proj").flops == op(plain, [(2048, 0)], "qkv_proj").flops
    assert op(padded, [(1100, 0)], "lm_head").flops == op(plain, [(1, 0)] * 64, "lm_head").flops
    # attention is not padded: padded rows attend to nothing
    assert op(padded, [(1100, 0)], "attention").flops == op(plain, [(1100, 0)], "attention").flops
    # 33 decodes run in the 64-row decode bucket
    decodes = [(1, 500)] * 33
    assert op(padded, decodes, "down_proj").flops == op(plain, [(1, 500)] * 64, "down_proj").flops
    assert padded.predict(decodes) > plain.predict(decodes)
    assert padded.predict([(1, 500)] * 64) == pytest.approx(plain.predict([(1, 500)] * 64))


def test_attention_spans_by_hand():
    # Π = 1000, BW = 100, 10 decode program slots: a program gets 100 FLOP/s and 10 B/s; 20
    # prefill slots: 50 FLOP/s and 5 B/s.
    # decode (1, 99): one program (1 sequence x 1 KV head, no split-K: the longest context,
    #   100 keys, is all the block table is known to hold) over 100 keys for the group of 2
    #   query heads: F = 100·4·4·2 = 3200 -> 32 s, B = 100·(K + V 2·4·2) + q, o 2·2·4·2
    #   = 1632 -> 163.2 s.
    # prefill (10, 0): one 128-row program (the d 4 head takes the 128 entry) over 10 keys,
    #   masked rows computed too: F = 128·10·4·4 = 20480 -> 409.6 s,
    #   B = 10·16 + 2·128·4·2 = 2208 -> 441.6 s.
    r = Roofline(TINY, flat_profile(1000.0, 100.0, program_slots=10.0, prefill_program_slots=20.0))
    step = r.breakdown([(1, 99), (10, 0)])
    decode, prefill = step.op("decode_span"), step.op("prefill_span")
    assert (decode.op_class, decode.flops, decode.bytes) == ("decode_span", 3200, 1632)
    assert (prefill.op_class, prefill.flops, prefill.bytes) == ("prefill_span", 20480, 2208)
    assert decode.time_s == pytest.approx(163.2) and prefill.time_s == pytest.approx(441.6)
    assert decode.compute_s == pytest.approx(32) and prefill.compute_s == pytest.approx(409.6)
    # only the longest program of each kernel counts: a shorter decode adds nothing
    assert r.breakdown([(1, 99), (1, 5), (10, 0)]).op("decode_span").time_s == pytest.approx(163.2)
    # they add to the iteration; without program slots there is no such op
    plain = Roofline(TINY, flat_profile(1000.0, 100.0))
    assert r.predict([(1, 99), (10, 0)]) == pytest.approx(plain.predict([(1, 99), (10, 0)]) + 604.8)
    assert not {"decode_span", "prefill_span"} & {op.name for op in plain.breakdown([(1, 99)]).ops}
    decode_only = Roofline(TINY, flat_profile(1000.0, 100.0, program_slots=10.0))
    assert "prefill_span" not in [op.name for op in decode_only.breakdown([(10, 0)]).ops]
    # a block table of 2,048 keys: 1 sequence x 1 KV head splits 8 ways (DECODE_SPLITS),
    # ceil(100 / 8) = 13 keys: B = 13·16 + 32 = 240 -> 24 s (F = 416 -> 4.16 s)
    padded = Roofline(TINY, r.profile, StepPadding(max_seqs=64, min_tokens=16, max_context=2048))
    assert padded.breakdown([(1, 99)]).op("decode_span").time_s == pytest.approx(24.0)
    # a program runs on one SM: at half the SMs (half the rates) it is as fast
    half = Roofline(TINY, DeviceProfile("X", (SMLevel(1.0, 1000.0, 100.0),), program_slots=10.0))
    assert half.breakdown([(1, 99)], 0.5).op("decode_span").time_s == pytest.approx(163.2)


def test_attention_span_of_a_llama_decode_batch(h200, llama8b):
    # 64 decodes in the 64-row bucket, a 6,144-key block table: 512 programs, no split-K; the
    # longest walks 4,096 keys of one KV head (2·128·2 bytes each) in each of 32 layers.
    h200 = dataclasses.replace(h200, program_slots=116.0)
    padding = StepPadding(max_seqs=64, min_tokens=16, max_context=6144)
    span = Roofline(llama8b, h200, padding).breakdown([(1, 4095)] + [(1, 100)] * 63)
    expected = 32 * (4096 * 2 * 128 * 2 + 2 * 4 * 128 * 2) * 116 / h200.bandwidth_at(1.0)
    assert span.op("decode_span").time_s == pytest.approx(expected)
    # 16 decodes (128 programs) split 2 ways
    span16 = Roofline(llama8b, h200, padding).breakdown([(1, 4095)] + [(1, 100)] * 15)
    assert span16.op("decode_span").bytes == 32 * (2048 * 2 * 128 * 2 + 2 * 4 * 128 * 2)


def test_kernel_grid_tables_match_the_kernel_tuning():
    """The roofline's copies of the kernels' tiling (it imports no jax) match pallas_kernels."""
    from pallas_kernels import tuning

    for kv_heads in (1, 2, 8):
        for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for max_context in (512, 1024, 2048, 4096, 6144, 8192, 16384, 32768, 131072):
                cfg = tuning.decode_config(128, batch, kv_heads, max_context, family="hopper")
                assert decode_splits(batch * kv_heads, max_context) == cfg.num_splits, \
                    (batch, kv_heads, max_context)
    assert DECODE_SPLITS == tuple(tuning._DECODE_SPLITS["hopper"])
    for head_dim in (64, 128, 256):
        assert PREFILL_BLOCK_ROWS[head_dim] == tuning.prefill_config(head_dim, family="hopper").block_m


def test_fp8_weights_by_hand():
    """FP8 linear layers: a byte per weight (the LM head stays bf16) and, W8A8, the profile's
    FP8 matmul rate; weight-only they multiply at the bf16 rate."""
    from models.quantization import Fp8Config

    profile = flat_profile(1000.0, 100.0, fp8_flops_ratio=4.0)
    bf16 = Roofline(TINY, profile).breakdown([(3, 5)])
    fp8 = dataclasses.replace(TINY, linear_weight_bytes=1, fp8_matmul=True)
    br = Roofline(fp8, profile).breakdown([(3, 5)])
    assert br.op("qkv_proj").bytes == (3 * 8 + 3 * 16) * 2 + 8 * 16  # activations bf16, weight 1 B
    assert br.op("down_proj").bytes == (3 * 16 + 3 * 8) * 2 + 16 * 8
    assert br.op("lm_head").bytes == bf16.op("lm_head").bytes
    assert br.op("qkv_proj").flops == bf16.op("qkv_proj").flops  # same work, at 4x the rate
    assert br.op("qkv_proj").compute_s == pytest.approx(bf16.op("qkv_proj").compute_s / 4)
    assert br.op("lm_head").compute_s == bf16.op("lm_head").compute_s
    from models.config import ModelConfig
    cfg = ModelConfig.from_hf(json.loads((REPO / "models/configs/llama-3-8b/config.json").read_text()))
    w8a8 = ModelShape.from_config(cfg, quantization=Fp8Config("dynamic"))
    weight_only = ModelShape.from_config(cfg, quantization=Fp8Config("none"))
    assert (w8a8.linear_weight_bytes, w8a8.fp8_matmul) == (1, True)
    assert (weight_only.linear_weight_bytes, weight_only.fp8_matmul) == (1, False)
    assert ModelShape.from_config(cfg).linear_weight_bytes is None


def test_fp8_decode_reads_a_byte_less_per_linear_weight(h200, llama8b):
    fp8_shape = dataclasses.replace(llama8b, linear_weight_bytes=1, fp8_matmul=True)
    bf16, fp8 = (Roofline(shape, h200).breakdown([(1, 1024)]) for shape in (llama8b, fp8_shape))
    linear = 32 * (4096 * 128 * (32 + 8 + 8 + 32) + 3 * 4096 * 14336)  # 6.98e9 of 8.03e9 weights
    total = lambda br: sum(op.bytes for op in br.ops)
    assert total(bf16) - total(fp8) == linear
    assert fp8.total_s < 0.62 * bf16.total_s  # the KV read and the fixed overhead stay


def test_fp8_rate_defaults_to_twice_bf16_and_round_trips(tmp_path):
    p = flat_profile(1.0, 1.0)
    assert p.fp8_flops_ratio == 2.0
    older = p.to_dict()
    del older["fp8_flops_ratio"]  # profiles calibrated before FP8
    assert DeviceProfile.from_dict(older).fp8_flops_ratio == 2.0
    measured = dataclasses.replace(p, fp8_flops_ratio=1.7)
    measured.save(tmp_path / "test-gpu.json")
    assert DeviceProfile.from_json(tmp_path / "test-gpu.json").fp8_flops_ratio == 1.7


def test_fp8_kv_cache_halves_the_attention_reads(h200, llama8b):
    """An e4m3 pool: a byte per cached element, so decode attention reads half the KV bytes and
    the batch-64, 1k-context decode step of Llama-3-8B with FP8 weights and FP8 KV is predicted
    well under the bf16 one (what ``tools/bench_engine.py --kv-cache-dtype auto,fp8`` times)."""
    fp8_kv = dataclasses.replace(llama8b, kv_dtype_bytes=1)
    batch = [(1, 1024)] * 64
    bf16, half = (Roofline(shape, h200).breakdown(batch) for shape in (llama8b, fp8_kv))
    kv_read = 32 * 64 * 1025 * 8 * 2 * 128  # layers x keys x KV heads x (K, V) x d, a byte each
    assert bf16.op("attention").bytes - half.op("attention").bytes == kv_read
    assert half.op("qkv_proj").bytes == bf16.op("qkv_proj").bytes  # activations stay bf16
    both = dataclasses.replace(fp8_kv, linear_weight_bytes=1, fp8_matmul=True)
    assert Roofline(both, h200).breakdown(batch).total_s < bf16.total_s / 1.6
    from models.config import ModelConfig
    cfg = ModelConfig.from_hf(json.loads((REPO / "models/configs/llama-3-8b/config.json").read_text()))
    assert ModelShape.from_config(cfg, kv_dtype_bytes=1).kv_element_bytes == 1
    assert ModelShape.from_config(cfg).kv_element_bytes == 2
