"""The FP8 KV pool in the runner's device state: the memory plan counts a byte per element,
and in shared buffers (duet mode) the pool travels as bytes and computes as e4m3."""
import jax
import numpy as np

from duetjax.config import EngineConfig
from duetjax.core import device_state
from duetjax.core.block_manager import BlockManager
from duetjax.core.model_runner import ModelRunner
from duetjax.core.request import Request
from duetjax.core.scheduler import ScheduledRequest, SchedulerOutput
from duetjax.sampling_params import SamplingParams
from models import load_model


def test_memory_plans_hold_twice_the_tokens(tiny_llama_dir, monkeypatch):
    model = load_model(tiny_llama_dir, dtype="bfloat16")
    monkeypatch.setattr(device_state.jax, "default_backend", lambda: "gpu")
    pages = {kind: device_state.plan_num_pages(model, EngineConfig(kv_cache_dtype=kind),
                                               free_bytes=1 << 26) for kind in ("auto", "fp8")}
    assert pages["fp8"] == 2 * pages["auto"] > 0
    per_token = {kind: device_state._kv_bytes_per_token(model, EngineConfig(kv_cache_dtype=kind))
                 for kind in ("auto", "fp8")}
    assert per_token["auto"] == 2 * per_token["fp8"]


def _first_tokens(runner: ModelRunner, prompts: list[list[int]]) -> list[int]:
    blocks = BlockManager(runner.num_pages, runner.page_size, enable_prefix_caching=False)
    scheduled = []
    for i, prompt in enumerate(prompts):
        request = Request(f"r{i}", prompt, SamplingParams(temperature=0.0), seed=i)
        blocks.grow(request, len(prompt))
        scheduled.append(ScheduledRequest(request, len(prompt)))
    sampled = runner.dispatch(SchedulerOutput(scheduled, [], 1), None).fetch()
    return sampled.token_ids[0].tolist()


def test_shared_fp8_pool_travels_as_bytes(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype="float32")
    config = EngineConfig(kv_cache_dtype="fp8", kv_cache_tokens=256, max_num_seqs=2,
                          max_num_batched_tokens=32, compile_on_start=False)
    prompts = [list(range(5, 25)), [7, 3, 250, 11, 9]]
    private = ModelRunner(model, config, max_model_len=64)
    assert private.kv_pool.dtype == jax.numpy.float8_e4m3fn
    want = _first_tokens(private, prompts)
    shared = ModelRunner(model, config, max_model_len=64, shared=True)
    try:
        spec = {s.name: s for s in shared.state.shared.buffers.specs}["kv_pool"]
        assert spec.dtype == "float8_e4m3fn" and spec.transport_dtype == np.uint8
        assert spec.nbytes == private.kv_pool.nbytes
        assert _first_tokens(shared, prompts) == want
        written = np.asarray(shared.kv_pool)
        assert written.dtype == np.uint8 and np.count_nonzero(written) > 0
        np.testing.assert_array_equal(written, np.asarray(private.kv_pool).view(np.uint8))
    finally:
        shared.state.close()
