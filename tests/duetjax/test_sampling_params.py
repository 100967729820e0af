import numpy as np
import pytest

from duetjax import SamplingParams
from duetjax.sampling_params import MAX_LOGIT_BIAS


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"repetition_penalty": 0}, r"repetition_penalty must be in \[0.01, 100\]"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"logit_bias": {5: 100.5}}, r"logit_bias values must be numbers in \[-100, 100\]"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias values"),
    ({"logit_bias": {5: "1"}}, "logit_bias values"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {True: 1.0}}, "logit_bias keys"),
    ({"logit_bias": {t: 1.0 for t in range(MAX_LOGIT_BIAS + 1)}}, "at most 300"),
    ({"logit_bias": [(5, 1.0)]}, "logit_bias must map token ids"),
    ({"logit_bias": {2**31: 1.0}}, r"logit_bias keys must be token ids \(integers in \[0, 2147483647\]\)"),
    ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"temperature": "0.7"}, "temperature must be a number, got '0.7'"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"presence_penalty": float("-inf")}, "presence_penalty must be a finite number"),
    ({"repetition_penalty": 1000}, r"repetition_penalty must be in \[0.01, 100\]"),
    ({"top_k": 2**31}, r"top_k must be in \[-1, 2147483647\]"),
    ({"top_k": 10**20}, "top_k must be in"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"max_tokens": 10**20}, r"max_tokens must be in \[1, 2147483647\]"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"stop_token_ids": [2**64]}, r"stop_token_ids must be in \[0, 2147483647\], got 18446744073709551616"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be in"),
    ({"seed": 2**32}, r"seed must be in \[0, 4294967295\]"),
    ({"logprobs": 21}, r"logprobs must be in \[0, 20\]"),
])
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_normalizes_stop_top_k_and_tiny_temperatures():
    params = SamplingParams(stop="###", top_k=-1)
    assert params.stop == ("###",) and params.top_k == 0
    assert SamplingParams(temperature=1e-6).greedy  # (vLLM's rule: below 1e-5 is greedy)
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    exact = SamplingParams(top_k=np.int64(2**31 - 1), max_tokens=np.int32(5), temperature=np.float32(0.5))
    assert (type(exact.top_k), type(exact.max_tokens), type(exact.temperature)) == (int, int, float)


def test_repetition_penalty_and_logit_bias_take_a_penalty_slot():
    assert not SamplingParams().penalized and not SamplingParams(repetition_penalty=1.0).fills_slot
    bias = {np.int64(7): np.float32(-3), 9: 100}
    params = SamplingParams(logit_bias=bias)
    assert params.logit_bias == {7: -3.0, 9: 100.0} and params.logit_bias is not bias
    assert all(type(k) is int and type(v) is float for k, v in params.logit_bias.items())
    assert params.penalized and params.fills_slot and params.needs_full_sampler
    repetition = SamplingParams(repetition_penalty=1.2)
    assert repetition.penalized and repetition.fills_slot and repetition.needs_full_sampler
    assert SamplingParams(presence_penalty=1.0).penalized
    assert not SamplingParams(presence_penalty=1.0).fills_slot
    assert SamplingParams(logit_bias={}).logit_bias is None  # empty: off
    assert len(SamplingParams(logit_bias={t: 0.0 for t in range(MAX_LOGIT_BIAS)}).logit_bias) == 300
    hash(params)  # still hashable (logit_bias is left out of the hash)
