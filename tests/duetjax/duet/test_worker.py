"""duetjax/duet/worker.py in-process: a worker's step compiles nothing once its buckets are
built."""
import jax
import numpy as np


def test_worker_steps_compile_nothing_after_start_up(tiny_llama_dir):
    """A worker serves from its start-up executables only: slicing the sampled tokens on the
    device compiled a small executable per new shape (tens of ms on a GPU, mid-serving)."""
    from duetjax import Engine
    from duetjax.core.model_runner import ModelRunner
    from duetjax.core.step_inputs import build_inputs, decode_step_choices, pack, unpack
    from duetjax.duet.worker import DECODE, PREFILL, run_step, worker_buckets

    engine = Engine(tiny_llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                    max_decode_steps=4, compile_on_start=False, show_progress=False)
    config = engine.config
    for role, steps in ((DECODE, decode_step_choices(config)), (PREFILL, (1,))):
        runner = ModelRunner(engine.model, config, engine.max_model_len, num_pages=64,
                             decode_steps=steps)
        buckets = worker_buckets(config, role)
        runner.compile_all(show_progress=False, buckets=buckets)
        compiles = []
        listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            last = None
            for b in buckets:
                template = build_inputs(b, None, runner.page_size, runner.max_pages_per_seq)
                inputs = unpack(template, pack(template))  # as a step message carries them
                for num_steps in sorted({1, b.steps}):
                    reply, last = run_step(runner, b, inputs, last, num_steps)
                    # token ids and logprobs of num_steps x rows, plus the top-n columns
                    assert len(reply) % (num_steps * b.num_seqs * 8) == 0
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert compiles == [], (role, compiles)
    assert np.all(np.isfinite(np.asarray(runner.kv_pool)))
