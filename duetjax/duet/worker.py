"""A DuetServe worker process: runs prefill or decode steps on its MPS share of the GPU.

Started by ``worker_client.WorkerClient`` as ``python -m duetjax.duet.worker FD`` with its MPS
environment (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) already set, since the SM share is fixed when
the process creates its CUDA context. FD is its end of a private socket pair:

1. the engine sends one pickled ``WorkerSetup`` (model architecture, engine config, and the
   layout of the shared weights / KV pool / penalty tables, which the worker attaches zero-copy);
2. the worker compiles its buckets (from the shared persistent compilation cache) and answers
   ``{"ready": ...}`` or ``{"error": ...}``;
3. then, per step, one byte message each way: a fixed header plus the step's packed host inputs
   (``step_inputs.pack``), and a header plus the packed sampled tokens. No arrays are pickled
   on the per-step path; the sampled tokens of a step stay on the worker's device for its next
   step (``USE_PREVIOUS``), like the engine's own pipelined loop.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import struct
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

PREFILL = "prefill"
DECODE = "decode"

STEP, STOP = 1, 2
RESULT, ERROR = 1, 2
USE_PREVIOUS = 1
REQUEST = struct.Struct("<BIIHB")
"""kind, step id, bucket index, decode steps, flags."""
REPLY = struct.Struct("<BId")
"""kind, step id, seconds the worker spent on the step (launch to results on the host)."""

log = logging.getLogger("duetjax.duet.worker")


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to start; pickled once over the private socket."""

    role: str
    """PREFILL (single-step buckets) or DECODE (k-step decode buckets)."""
    sm_percentage: int
    """Its MPS active-thread percentage (already in its environment; for logs)."""
    model_config: Any
    """``models.config.ModelConfig``."""
    dtype: str
    """Compute dtype name, e.g. 'bfloat16'."""
    quantization: Any
    """``models.quantization.Fp8Config`` of FP8 weights, or None."""
    kv_scales: Any
    """``LoadedModel.kv_scales``: the checkpoint's KV cache scales (per layer or per KV head),
    or None."""
    engine_config: Any
    """``duetjax.config.EngineConfig``."""
    max_model_len: int
    num_pages: int
    layout: Any
    """``shared_state.SharedLayout``: handles of the shared buffers."""
    compilation_cache_dir: str | None


def worker_buckets(engine_config: Any, role: str) -> list:
    """The buckets a worker of ``role`` compiles, in the order step messages index them."""
    from ..core.step_inputs import decode_step_choices, plan_buckets

    if role == DECODE:
        return [b for b in plan_buckets(engine_config, decode_step_choices(engine_config))
                if b.decode]
    return plan_buckets(engine_config)  # a prefill batch of 1-token prompts uses a decode bucket


class _StepFailed(Exception):
    """A step raised; the engine has its traceback already."""


def run_step(runner: Any, b: Any, inputs: Any, previous: Any, num_steps: int) -> tuple[bytes, Any]:
    """Runs one step message's work: (the packed sampled tokens of its ``num_steps`` steps,
    the last tokens, which stay on the device for the next step). The slicing happens on the
    host: a device-side slice compiles a small executable the first time each shape meets it,
    tens of milliseconds on a GPU in the middle of serving."""
    import jax

    from ..core.step_inputs import pack

    sampled, last, _ = runner.execute(b, inputs, previous, num_steps)
    host = jax.tree_util.tree_map(np.asarray, sampled)  # one transfer, waits for the step
    if not b.multi_step:
        host = jax.tree_util.tree_map(lambda a: a[None], host)
    return pack(jax.tree_util.tree_map(lambda a: a[:num_steps], host)), last


def _serve(conn: Connection) -> None:
    setup: WorkerSetup = conn.recv()
    import jax
    import jax.numpy as jnp

    from models import LoadedModel

    from ..compilation_cache import enable_compilation_cache
    from ..core.model_runner import ModelRunner
    from ..core.step_inputs import build_inputs, decode_step_choices, unpack
    from ..gc_pauses import freeze_startup_heap

    enable_compilation_cache(setup.compilation_cache_dir)
    model = LoadedModel(config=setup.model_config, params=None, tokenizer=None,
                        dtype=jnp.dtype(setup.dtype).type, path=f"<shared:{setup.role}>",
                        load_seconds=0.0, quantization=setup.quantization,
                        kv_scales=setup.kv_scales)
    runner = ModelRunner(model, setup.engine_config, setup.max_model_len,
                         num_pages=setup.num_pages, attach=setup.layout,
                         decode_steps=decode_step_choices(setup.engine_config)
                         if setup.role == DECODE else (1,))
    buckets = worker_buckets(setup.engine_config, setup.role)
    started = time.perf_counter()
    runner.compile_all(show_progress=False, buckets=buckets)
    templates = [build_inputs(b, None, runner.page_size, runner.max_pages_per_seq) for b in buckets]
    freeze_startup_heap()  # (a full collection over the start-up heap would stall a step)
    conn.send({"ready": True, "pid": os.getpid(), "device": str(jax.devices()[0]),
               "compile_seconds": time.perf_counter() - started})

    last = None
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return  # the engine went away
        kind, step_id, index, num_steps, flags = REQUEST.unpack_from(message)
        if kind == STOP:
            return
        try:
            started = time.perf_counter()
            b = buckets[index]
            inputs = unpack(templates[index], memoryview(message)[REQUEST.size:])
            reply, last = run_step(runner, b, inputs, last if flags & USE_PREVIOUS else None,
                                   num_steps)
            seconds = time.perf_counter() - started
            conn.send_bytes(REPLY.pack(RESULT, step_id, seconds) + reply)
        except Exception as e:
            conn.send_bytes(REPLY.pack(ERROR, step_id, 0.0) + traceback.format_exc().encode())
            raise _StepFailed from e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m duetjax.duet.worker FD  (started by the engine, not by hand)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    conn = Connection(int(argv[0]))
    try:
        _serve(conn)
    except _StepFailed:
        return 1
    except Exception:
        try:
            conn.send({"error": traceback.format_exc()})
        except (OSError, ValueError):
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
