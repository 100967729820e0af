"""Start-up: the parts an ``Engine`` drives, built around a loaded model.

``prepare`` readies the process for its mode before JAX meets the GPU, and checks what the mode
needs before the slow part starts; ``assemble`` then builds the model runner (compiling every
step), DuetServe's workers in duet mode, and the loop around them: scheduler, output processor,
executors and admission. It lives in ``duet/`` because that is the one layer below the public
API that sees both modes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from models import LoadedModel, ModelConfig, load_model
from models.kv_calibration import calculate_kv_scales
from models.kv_scales import describe as describe_kv_scales
from models.tensor_parallel import TensorParallelError, make_mesh

from ..compilation_cache import enable_compilation_cache
from ..config import KV_SCALES_NOT_IN_DUET, ConfigError, EngineConfig
from ..core.admission import Admission
from ..core.block_manager import BlockManager
from ..core.executor import LocalExecutor
from ..core.model_runner import ModelRunner
from ..core.output_processor import OutputProcessor
from ..core.scheduler import Scheduler
from ..loop_stats import LoopStats
from ..perf.correction import Correction
from ..perf.roofline import DeviceProfile
from ..perf.token_budget import TokenBudget
from .mps import MPSDaemon
from .split_executor import SplitExecutor
from .split_mode import (Duet, build_roofline, device_profile, prepare_process,
                         slo_token_budget, weights_loading_device)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
    """The mode this process runs in, and what it needs (``prepare``)."""

    mode: str
    """'aggregated' or 'duet' ('auto' resolved)."""
    why: str
    """Why that mode (for the log)."""
    daemon: MPSDaemon | None
    """Duet mode on a GPU: the MPS daemon the workers join."""
    profile: DeviceProfile | None
    """The roofline's device profile, when the mode or a TBT SLO needs one."""


def prepare(config: EngineConfig) -> ProcessSetup:
    """Readies this process for ``config.mode`` (call it before any other JAX call) and
    checks what the mode needs (a ConfigError naming the option), before anything is loaded."""
    if config.tensor_parallel_size > 1:  # (duet mode is refused by the config)
        mode, daemon, why = "aggregated", None, "tensor parallel: duet mode not built for it yet"
        local = jax.local_device_count()
        if config.tensor_parallel_size > local:
            raise ConfigError("tensor_parallel_size", f"{config.tensor_parallel_size} is more than "
                              f"the {local} local devices ({jax.default_backend()})")
    else:
        mode, daemon, why = prepare_process(config.mode)
    profile = None
    if mode == "duet" or config.tbt_slo_ms is not None:
        profile = device_profile(config, "duet mode" if mode == "duet"
                                 else "tbt_slo_ms in aggregated mode")
    return ProcessSetup(mode, why, daemon, profile)


@dataclasses.dataclass(frozen=True, eq=False)
class EngineParts:
    """What ``Engine`` drives (its attributes of the same names)."""

    model: LoadedModel
    """The model; in duet mode without weights of its own (the runner's shared ones alone)."""
    max_model_len: int
    runner: ModelRunner
    duet: Duet | None
    """Duet mode's workers and controller (None: aggregated mode)."""
    token_budget: TokenBudget | None
    """Aggregated mode with a TBT SLO: each iteration's token budget (None: the fixed one)."""
    scheduler: Scheduler
    output_processor: OutputProcessor
    executor: LocalExecutor
    split_executor: SplitExecutor | None
    """Duet mode's split iterations (None: aggregated mode)."""
    admission: Admission
    loop_stats: LoopStats
    """Where the host loop's time goes."""


def load(model: Any, dtype: Any, load_format: str, config: EngineConfig,
         setup: ProcessSetup) -> LoadedModel:
    """The checkpoint, its weights loaded where ``setup.mode`` wants them
    (``weights_loading_device``), split over the tensor-parallel group (its mesh made here,
    once) and quantized as ``config`` asks."""
    calculate = config.calculate_kv_scales and config.kv_cache_dtype == "fp8"
    if calculate and setup.mode == "duet":  # (mode 'auto' may have chosen it)
        raise ConfigError("calculate_kv_scales", KV_SCALES_NOT_IN_DUET)
    mesh = make_mesh(config.tensor_parallel_size)
    try:
        with weights_loading_device(setup.mode):
            loaded = load_model(model, dtype=dtype, load_format=load_format,
                                quantization=config.quantization,
                                fp8_activation=config.fp8_activation, mesh=mesh)
    except TensorParallelError as err:
        raise ConfigError("tensor_parallel_size", err.problem) from err
    if calculate and loaded.kv_scales is None:
        loaded = dataclasses.replace(loaded, kv_scales=calculate_kv_scales(loaded))
        log.info("FP8 KV scales computed over the calibration text: %s",
                 describe_kv_scales(loaded.kv_scales))
    return loaded


def assemble(model: LoadedModel, config: EngineConfig, setup: ProcessSetup,
             show_progress: bool = True) -> EngineParts:
    """The parts of an engine serving ``model`` in ``setup.mode``."""
    max_model_len = _max_model_len(model.config, config)
    enable_compilation_cache(config.compilation_cache_dir)
    # Duet mode: weights, KV pool and counts in buffers the workers attach to.
    runner = ModelRunner(model, config, max_model_len, shared=setup.mode == "duet")
    model = runner.model
    if config.compile_on_start:
        runner.compile_all(show_progress=show_progress)
    duet = None
    if setup.mode == "duet":  # after compiling: prefill workers load the same executables
        try:
            duet = Duet(model, config, max_model_len, runner.num_pages, runner.state.shared,
                        setup.daemon, setup.profile)
        except BaseException:
            runner.state.close()
            raise
    token_budget = None
    if setup.mode == "aggregated" and config.tbt_slo_ms is not None:
        roofline = build_roofline(model.config, model.dtype, config, max_model_len, setup.profile,
                                  Correction() if config.duet_online_correction else None,
                                  model.quantization)
        token_budget = slo_token_budget(roofline, config, config.tbt_slo_ms)
    scheduler = Scheduler(config, BlockManager(runner.num_pages, config.page_size,
                                               config.enable_prefix_caching), max_model_len)
    outputs = OutputProcessor(scheduler)
    executor = LocalExecutor(runner, outputs, config, model.config.vocab_size,
                             learner=duet if duet is not None else token_budget)
    loop_stats = LoopStats()
    split_executor = (SplitExecutor(duet, outputs, executor, config, loop_stats)
                      if duet is not None else None)
    eos_token_ids = frozenset(model.tokenizer.eos_token_ids if model.tokenizer
                              else model.config.eos_token_ids)
    admission = Admission(model.tokenizer, model.path, model.config.vocab_size, max_model_len,
                          eos_token_ids, config.seed, in_use=outputs.requests)
    log.info("engine ready: %s (%s, %s), max_model_len %d, load %.1fs%s", model.path,
             model.config.architecture, np.dtype(model.dtype).name, max_model_len,
             model.load_seconds, f", tensor parallel over {config.tensor_parallel_size} devices"
             if config.tensor_parallel_size > 1 else "")
    return EngineParts(model, max_model_len, runner, duet, token_budget, scheduler, outputs,
                       executor, split_executor, admission, loop_stats)


def _max_model_len(model_config: ModelConfig, config: EngineConfig) -> int:
    """``max_model_len``, else the model's own, capped at ``cpu_max_model_len`` off the GPU."""
    if config.max_model_len is not None:
        return config.max_model_len
    if jax.default_backend() != "gpu":
        return min(model_config.max_position_embeddings, config.cpu_max_model_len)
    return model_config.max_position_embeddings
