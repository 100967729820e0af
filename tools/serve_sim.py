"""Serving simulation: duetjax's own scheduler, SLO-aware token budget and DuetServe planner,
run on a virtual clock whose steps last what the roofline predicts. Plain Python on a CPU:

    python tools/serve_sim.py --model-config models/configs/llama-3-8b \\
        --profile duetjax/perf/profiles/nvidia-h100-80gb-hbm3.json --dataset mooncake \\
        --qps 3.5 --num-requests 300 --modes aggregated@512,aggregated@1024,slo,duet \\
        --tbt-slos-ms 50,25 --kv-cache-tokens 309344 --out sim.json --table sim.md
    python tools/serve_sim.py summary sim.json ...   # duet against the best aggregated, per rate

Each point replays ``bench_duet``'s workload (the same lengths, Poisson arrivals and seed, so
the same schedule the GPU runs saw) through a ``Scheduler`` configured as ``bench_duet``
configures each mode's engine, and scores it with ``bench_duet``'s metrics (three goodput
definitions, TTFT, TBT). What is simulated is the device and the worker processes:

- an aggregated step (mixed or decode-only) lasts ``roofline × mixed_factor + overhead``;
- a split iteration runs its prefill chunk on the S_p worker, ``roofline × prefill_factor``,
  while the S_d worker runs decode dispatches of ``stream_k`` steps (each step
  ``roofline × decode_factor``), the last one sized as the engine sizes it; the iteration
  ends with the dispatch running when the chunk ends, whose tokens arrive together;
- a worker dispatch costs ``dispatch_overhead`` more.

The SLO-aware budget and the planner learn their online correction from these simulated
times exactly as they do from measured ones. Steps are not pipelined (a token reaches its
request when its step ends, as a pipelined engine's does one step later on the host), and
nothing here models the host's own stalls, compilation or memory: it predicts what the
engine's policies do with the roofline's device, to be checked against a GPU run of the same
workload (``--compare`` takes that run's ``results.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_duet import (GOODPUT_CRITERIA, RequestRecord, add_serving_args,  # noqa: E402
                        best_aggregated_table, check_serving_args, engine_kwargs, make_point,
                        mode_kind, sample_lengths, summarize)
from duetjax.config import EngineConfig  # noqa: E402
from duetjax.core.block_manager import BlockManager  # noqa: E402
from duetjax.core.request import Request  # noqa: E402
from duetjax.core.scheduler import Scheduler, SchedulerOutput, split_batch  # noqa: E402
from duetjax.duet.split_mode import (SplitPlanner, build_roofline, final_dispatch_steps,  # noqa: E402
                                     slo_token_budget)
from duetjax.perf.correction import Correction  # noqa: E402
from duetjax.perf.optimizer import AGGREGATED, Decision  # noqa: E402
from duetjax.perf.roofline import DeviceProfile, Roofline, power_of_two  # noqa: E402
from duetjax.perf.token_budget import TokenBudget  # noqa: E402
from duetjax.core.step_inputs import MIN_MIXED_TOKENS  # noqa: E402
from duetjax.sampling_params import SamplingParams  # noqa: E402
from models.config import ModelConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SimulatedDevice:
    """How long the simulated GPU takes: the roofline's prediction times a factor per kind of
    work, plus a fixed cost per dispatch."""

    roofline: Roofline
    """The uncorrected roofline of the model as the engine pads its steps."""
    mixed_factor: float = 1.0
    """Measured over predicted of an aggregated step (mixed or decode-only) on the whole GPU."""
    bucket_factors: tuple[tuple[int, float], ...] = ()
    """(token bucket, factor) where a mixed step padded to that bucket has its own factor."""
    prefill_factor: float = 1.0
    """Measured over predicted of a prefill chunk on the S_p worker."""
    decode_factor: float = 1.0
    """Measured over predicted of one decode step on the S_d worker."""
    step_overhead_s: float = 0.0
    """Added to every aggregated step (what the prediction leaves out whatever the size)."""
    dispatch_overhead_s: float = 0.0
    """Added to every worker dispatch (the request and reply between processes)."""

    def aggregated(self, prefill: Sequence[tuple[int, int]], decodes: Sequence[int]) -> float:
        if not prefill:
            return self.roofline.predict_decode(decodes, 1.0) * self.mixed_factor + self.step_overhead_s
        tokens = power_of_two(max(MIN_MIXED_TOKENS, len(decodes) + sum(q for q, _ in prefill)))
        factor = dict(self.bucket_factors).get(tokens, self.mixed_factor)
        return self.roofline.predict_mixed(prefill, decodes, 1.0) * factor + self.step_overhead_s

    def split(self, prefill: Sequence[tuple[int, int]], decodes: Sequence[int], s_p: float,
              s_d: float) -> tuple[float, float]:
        """(the chunk's time on the S_p worker, one decode step's on the S_d worker)."""
        t_p, t_d = self.roofline.predict_split(prefill, decodes, s_p, s_d)
        return t_p * self.prefill_factor, t_d * self.decode_factor


def _work(batch: SchedulerOutput) -> tuple[list[tuple[int, int]], list[int]]:
    """(prefill chunks as (new, cached), decode contexts) of a batch before it is committed."""
    prefill, decodes = [], []
    for item in batch.scheduled:
        r = item.request
        if item.num_new_tokens == 1 and r.num_tokens - r.num_computed_tokens == 1:
            decodes.append(r.num_computed_tokens)
        else:
            prefill.append((item.num_new_tokens, r.num_computed_tokens))
    return prefill, decodes


class SimulatedEngine:
    """One mode's engine on the simulated device: the real scheduler and policies, a virtual
    clock (``now``, seconds since the point's first arrival)."""

    def __init__(self, mode: str, config: EngineConfig, model_config: ModelConfig,
                 profile: DeviceProfile, device: SimulatedDevice, num_pages: int,
                 max_model_len: int):
        self.kind, _ = mode_kind(mode)
        self.config = config
        self.device = device
        self.scheduler = Scheduler(config, BlockManager(num_pages, config.page_size, False),
                                   max_model_len)
        self.token_budget: TokenBudget | None = None
        self.planner: SplitPlanner | None = None
        if self.kind == "slo":
            roofline = build_roofline(model_config, "bfloat16", config, max_model_len, profile,
                                      Correction() if config.duet_online_correction else None)
            self.token_budget = slo_token_budget(roofline, config, config.tbt_slo_ms)
        elif self.kind in ("duet", "static"):
            self.planner = SplitPlanner(model_config, "bfloat16", None, config, max_model_len,
                                        profile)
        self.now = 0.0
        self.records: dict[str, RequestRecord] = {}
        self.budgets: dict[int, int] = {}

    def add(self, request_id: str, prompt_ids: list[int], max_tokens: int, arrival: float) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.scheduler.add(Request(request_id, prompt_ids, params, seed=0, arrival_time=arrival))
        self.records[request_id] = RequestRecord(len(prompt_ids), max_tokens, arrival, arrival)

    def step(self) -> None:
        """One iteration: aggregated, or (in duet mode) a whole split iteration."""
        decision = None
        if self.planner is not None:
            prefill, decodes = self.scheduler.preview()
            if prefill and decodes:
                decision, _ = self.planner.decide(prefill, decodes,
                                                  self.scheduler.queue_to_pace(self.now))
        if decision is not None and decision.mode != AGGREGATED:
            self._split(decision)
        elif decision is not None:
            self._aggregated(decision.token_budget, decision.t_aggregated, self.planner)
        else:
            budget = predicted = None
            if self.token_budget is not None and self.scheduler.has_prefill_work():
                budget = self.token_budget.choose(*self.scheduler.preview(),
                                                  self.scheduler.queue_to_pace(self.now))
                predicted = self.token_budget.last_predicted_s or None
            self._aggregated(budget, predicted, self.token_budget)

    def _schedule(self, decode_steps: int, **kwargs: Any) -> tuple[SchedulerOutput, list, list]:
        self.scheduler.input_batch.steady = None  # (a full schedule each time: same batches)
        batch = self.scheduler.schedule(decode_steps, **kwargs)
        return (batch, *_work(batch))

    def _aggregated(self, budget: int | None, predicted: float | None, learner: Any) -> None:
        if budget is not None:
            self.budgets[budget] = self.budgets.get(budget, 0) + 1
        batch, prefill, decodes = self._schedule(self.config.decode_steps, budget=budget)
        if not batch.scheduled:
            raise RuntimeError("the scheduler found nothing to run while requests wait")
        sampling = self._sampling(batch)
        self.scheduler.commit(batch)
        seconds = self.device.aggregated(prefill, decodes)
        self.now += seconds
        self._emit(sampling, self.now)
        if learner is not None and predicted:
            learner.observe_aggregated(predicted, seconds, batch.num_tokens)

    def _split(self, decision: Decision) -> None:
        planner, scheduler, device = self.planner, self.scheduler, self.device
        started = self.now
        stream_k = planner.stream_steps(decision)
        batch, prefill, decodes = self._schedule(stream_k, split=True)
        chunk, stream = split_batch(batch)
        chunk_ids = {item.request.request_id for item in chunk.scheduled}
        chunk_sampling = self._sampling(chunk)
        t_p = device.split(prefill, decodes, decision.s_p, decision.s_d)[0] if prefill else 0.0
        chunk_end = started + t_p + device.dispatch_overhead_s
        scheduler.commit(batch)
        step_predicted = planner.stream_step_seconds(decision, stream_k)
        t, decode_seconds, decode_steps, dispatches = started, 0.0, 0, 0
        first_batch = len(stream.scheduled)
        part = stream
        while part.scheduled:
            if part is not stream:
                scheduler.commit(part)
            contexts = [item.request.num_computed_tokens - item.num_steps for item in part.scheduled]
            per_step = device.split(prefill if t < chunk_end else [], contexts,
                                    decision.s_p, decision.s_d)[1]
            seconds = part.num_steps * per_step + device.dispatch_overhead_s
            t += seconds
            decode_seconds += seconds
            decode_steps += part.num_steps
            dispatches += 1
            self._emit(self._sampling_after_commit(part), t)
            if t >= chunk_end:
                break
            remaining = (decision.t_prefill or 0.0) - (t - started)
            steps = final_dispatch_steps(remaining, step_predicted, stream_k)
            part = scheduler.schedule_decodes(steps, chunk_ids)
        end = max(chunk_end, t)
        self._emit(chunk_sampling, end)
        self.now = end
        planner.record_split(decision, end - started, (t_p, decode_seconds), decode_steps,
                             stream_k, dispatches, chunk.num_tokens, first_batch)

    @staticmethod
    def _sampling(batch: SchedulerOutput) -> list[tuple[Request, int]]:
        """(request, tokens) of the batch's items that sample, judged before it is committed."""
        return [(item.request, item.num_steps) for item in batch.scheduled
                if item.completes_sequence]

    @staticmethod
    def _sampling_after_commit(part: SchedulerOutput) -> list[tuple[Request, int]]:
        return [(item.request, item.num_steps) for item in part.scheduled]

    def _emit(self, sampling: list[tuple[Request, int]], at: float) -> None:
        """Their tokens reach the host at ``at``; a request at its length ends."""
        for request, n in sampling:
            if request.is_finished:
                continue
            n = min(n, request.max_output_tokens - len(request.output_token_ids))
            request.output_token_ids += [0] * n
            record = self.records[request.request_id]
            record.token_times += [at] * n
            if len(request.output_token_ids) >= request.max_output_tokens:
                record.finished, record.output_len = at, len(request.output_token_ids)
                self.scheduler.finish(request, "length")


def run_point(engine: SimulatedEngine, items: Sequence[Any],
              drain_timeout_s: float) -> tuple[list[RequestRecord], float]:
    """Feeds the arrivals, steps until every request ends or ``drain_timeout_s`` after the
    last arrival (what still runs then is aborted, as ``bench_duet.drive`` does)."""
    items = sorted(items, key=lambda w: w.arrival)
    deadline = items[-1].arrival + drain_timeout_s
    i = 0
    while True:
        while i < len(items) and items[i].arrival <= engine.now:
            engine.add(f"r{i}", items[i].prompt_ids, items[i].max_tokens, items[i].arrival)
            i += 1
        if engine.scheduler.has_work():
            if engine.now > deadline:
                for record in engine.records.values():
                    if record.finished is None:
                        record.aborted = True
                return list(engine.records.values()), engine.now
            engine.step()
        elif i < len(items):
            engine.now = items[i].arrival
        else:
            ends = [r.finished for r in engine.records.values() if r.finished is not None]
            return list(engine.records.values()), max(ends, default=engine.now)


def simulate_mode(args: argparse.Namespace, mode: str, model_config: ModelConfig,
                  profile: DeviceProfile, lengths: list[tuple[int, int]]) -> dict[str, Any]:
    config = EngineConfig(**engine_kwargs(args, mode))
    roofline = build_roofline(model_config, "bfloat16", config, args.max_model_len, profile, None)
    device = SimulatedDevice(roofline, args.mixed_factor, args.bucket_factors, args.prefill_factor,
                             args.decode_factor, args.step_overhead_ms / 1e3,
                             args.dispatch_overhead_ms / 1e3)
    points = []
    for index, qps in enumerate(args.qps):
        engine = SimulatedEngine(mode, config, model_config, profile, device,
                                 args.kv_cache_tokens // config.page_size, args.max_model_len)
        items = make_point(lengths, model_config.vocab_size, qps, args.seed, index)
        records, duration = run_point(engine, items, args.drain_timeout_s)
        point = {"qps": qps, **summarize(records, duration, args.tbt_slos_ms, args.ttft_slo_ms)}
        point["budgets"] = {str(b): n for b, n in sorted(engine.budgets.items())}
        if engine.planner is not None:
            stats = engine.planner.stats
            point["duet"] = {"split_iterations": stats.split_iterations,
                             "aggregated_iterations": stats.aggregated_iterations,
                             "decisions": dict(stats.decisions),
                             "pairs": {f"{round(100 * p)}/{round(100 * d)}": stats.split_shares.count((p, d))
                                       for p, d in sorted(set(stats.split_shares))}}
        points.append(point)
        log(f"[{mode}] qps {qps:g}: {point['completed']}/{point['issued']} in "
            f"{duration:.1f} s, {point['request_throughput']:.2f} req/s, TTFT p50 "
            f"{point['ttft_ms']['p50'] or 0:.0f} ms, TBT p99 {point['tbt_ms']['p99'] or 0:.1f} ms, "
            f"goodput@{args.tbt_slos_ms[0]:g} "
            + "/".join(f"{point['goodput'][f'{args.tbt_slos_ms[0]:g}'][c]:.2f}"
                       for c in GOODPUT_CRITERIA[:3])
            + (f", {point['duet']['split_iterations']} splits" if "duet" in point else "")
            + (f", budgets {point['budgets']}" if point["budgets"] else ""))
    return {"mode": mode, "points": points,
            "engine_config": {k: getattr(config, k) for k in (
                "max_num_seqs", "max_num_batched_tokens", "decode_steps", "max_decode_steps",
                "duet_pairs", "tbt_slo_ms")}}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    slos = [f"{s:g}" for s in a["tbt_slos_ms"]]
    lines = [f"# Serving simulation: {report['model']} on the {report['profile']} profile "
             f"({report['date']})", "", f"Command: `{report['command']}`", "",
             f"Workload: {a['dataset']} lengths x{a['scale']:g} (outputs x"
             f"{a['output_scale'] if a['output_scale'] is not None else a['scale']:g}), "
             f"{a['num_requests']} requests per point, seed {a['seed']}; KV "
             f"{a['kv_cache_tokens']} tokens. Simulated device: aggregated steps x"
             f"{a['mixed_factor']:g}"
             + "".join(f" ({t} tokens: x{f:g})" for t, f in a["bucket_factors"])
             + f" + {a['step_overhead_ms']:g} ms, split chunks x"
             f"{a['prefill_factor']:g}, split decode steps x{a['decode_factor']:g}, worker "
             f"dispatches + {a['dispatch_overhead_ms']:g} ms.", "",
             "Goodput (req/s) as `tpot / p99_tbt / max_tbt / max_tbt_amortised` "
             "(`bench_duet.py`'s definitions).", ""]
    lines += best_aggregated_table(report, slos)
    lines += ["| mode | QPS | done | req/s | TTFT p50 | TTFT p99 | TBT p99 | TPOT mean | "
              + " | ".join(f"goodput @{s} ms" for s in slos) + " | budgets | splits |",
              "|" + " --- |" * (10 + len(slos))]
    for mode, res in report["modes"].items():
        for p in res["points"]:
            good = " | ".join("/".join(f"{p['goodput'][s][c]:.2f}" for c in GOODPUT_CRITERIA)
                              for s in slos)
            duet = p.get("duet")
            lines.append(
                f"| {mode} | {p['qps']:g} | {p['completed']}/{p['issued']} | "
                f"{p['request_throughput']:.2f} | {p['ttft_ms']['p50'] or 0:.0f} | "
                f"{p['ttft_ms']['p99'] or 0:.0f} | {p['tbt_ms']['p99'] or 0:.1f} | "
                f"{p['tpot_ms']['mean'] or 0:.1f} | {good} | "
                + (", ".join(f"{b}: {n}" for b, n in p["budgets"].items()) or "-") + " | "
                + (f"{duet['split_iterations']} ({', '.join(f'{k}: {v}' for k, v in duet['pairs'].items())})"
                   if duet else "-") + " |")
    compare = report.get("compare")
    if compare:
        lines += ["", f"Against the GPU run `{compare['path']}` ({compare['device']}), same "
                  f"workload: simulated / measured.", "",
                  "| mode | QPS | req/s | TTFT p50 ms | TBT p99 ms | goodput @"
                  f"{slos[0]} ms (mean TPOT) |", "|" + " --- |" * 6]
        for row in compare["rows"]:
            lines.append(f"| {row['mode']} | {row['qps']:g} | " + " | ".join(
                f"{row[k][0]:.2f} / {row[k][1]:.2f}" if k != "ttft_p50" and k != "tbt_p99"
                else f"{row[k][0]:.0f} / {row[k][1]:.0f}" if k == "ttft_p50"
                else f"{row[k][0]:.1f} / {row[k][1]:.1f}"
                for k in ("req_s", "ttft_p50", "tbt_p99", "goodput")) + " |")
    return "\n".join(lines) + "\n"


def compare_with(report: dict[str, Any], path: str) -> dict[str, Any]:
    """Simulated against measured, for the modes and QPS both have."""
    measured = json.loads(Path(path).read_text())
    slo = f"{report['args']['tbt_slos_ms'][0]:g}"
    rows = []
    for mode, res in report["modes"].items():
        real = measured["modes"].get(mode)
        if not real or "points" not in real:
            continue
        by_qps = {p["qps"]: p for p in real["points"]}
        for p in res["points"]:
            m = by_qps.get(p["qps"])
            if m is None:
                continue
            rows.append({"mode": mode, "qps": p["qps"],
                         "req_s": (p["request_throughput"], m["request_throughput"]),
                         "ttft_p50": (p["ttft_ms"]["p50"] or 0, m["ttft_ms"]["p50"] or 0),
                         "tbt_p99": (p["tbt_ms"]["p99"] or 0, m["tbt_ms"]["p99"] or 0),
                         "goodput": (p["goodput"][slo]["tpot"], m["goodput"][slo]["tpot"])})
    device = next((r.get("device") for r in measured["modes"].values() if r.get("device")), "?")
    return {"path": path, "device": device, "rows": rows}


def bucket_factors(text: str) -> tuple[tuple[int, float], ...]:
    pairs = [item.split(":") for item in text.split(",") if item]
    return tuple((int(tokens), float(factor)) for tokens, factor in pairs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", default=str(REPO / "models/configs/llama-3-8b"))
    p.add_argument("--profile", default=str(REPO / "duetjax/perf/profiles/nvidia-h100-80gb-hbm3.json"))
    add_serving_args(p)
    p.set_defaults(dataset="mooncake", qps=[3.5], num_requests=300, drain_timeout_s=30.0,
                   modes="aggregated@512,aggregated@1024,slo,duet", duet_pairs="80/20,70/30")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--kv-cache-tokens", type=int, default=309344,
                   help="the KV pool (default: an H100's default sizing for Llama-3-8B)")
    p.add_argument("--mixed-factor", type=float, default=1.0,
                   help="an aggregated step takes this times its prediction")
    p.add_argument("--bucket-factors", type=bucket_factors, default=(),
                   help="TOKENS:FACTOR,...: a mixed step padded to TOKENS takes FACTOR x its prediction")
    p.add_argument("--prefill-factor", type=float, default=1.0,
                   help="a split's chunk takes this times its prediction on the S_p worker")
    p.add_argument("--decode-factor", type=float, default=1.0,
                   help="a decode step takes this times its prediction on the S_d worker")
    p.add_argument("--step-overhead-ms", type=float, default=0.0,
                   help="added to every aggregated step")
    p.add_argument("--dispatch-overhead-ms", type=float, default=0.0,
                   help="added to every worker dispatch")
    p.add_argument("--compare", default=None, help="a bench_duet results.json of the same workload")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None)
    args = check_serving_args(p, p.parse_args(argv))
    # (what bench_duet's engine_kwargs reads and this simulation has no use for)
    for name in ("scan_unroll", "compilation_cache_dir", "device_profile",
                 "kv_cache_memory_fraction", "compile_threads", "engine_tbt_slo_ms"):
        setattr(args, name, None)
    args.carry_stream, args.no_online_correction, args.static_policy = False, False, "forced"
    return args


def _relative(value: Any) -> Any:
    """A path inside the repository as a relative one (reports name no local folders)."""
    if isinstance(value, str) and value.startswith(str(REPO) + os.sep):
        return os.path.relpath(value, REPO)
    return value


def summary(paths: Sequence[str]) -> str:
    """One line per simulated sweep (``--out`` JSON files holding duet and aggregated modes):
    at each rate, duet's goodput and the best aggregated engine's (by the SLO duet protected)
    under vLLM's definition and the P99-gap one, and duet's pooled P99 TBT."""
    lines = ["| sweep | QPS: duet goodput / best aggregated (mode), mean TPOT; P99 gap; "
             "duet P99 TBT ms |", "| --- | --- |"]
    for path in paths:
        report = json.loads(Path(path).read_text())
        slo = f"{report['args']['tbt_slos_ms'][0]:g}"
        modes = report["modes"]
        if "duet" not in modes:
            continue
        cells = []
        for i, point in enumerate(modes["duet"]["points"]):
            parts = []
            for criterion in ("tpot", "p99_tbt"):
                mode, best = max(((m, r["points"][i]["goodput"][slo][criterion])
                                  for m, r in modes.items() if m != "duet"), key=lambda x: x[1])
                parts.append(f"{point['goodput'][slo][criterion]:.2f}/{best:.2f} "
                             f"({mode.replace('aggregated@', '')})")
            cells.append(f"**{point['qps']:g}**: {parts[0]}; {parts[1]}; "
                         f"{point['tbt_ms']['p99'] or 0:.0f}")
        lines.append(f"| {Path(path).stem} | " + " · ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summary":  # serve_sim.py summary A.json B.json ...
        print(summary(argv[1:]), end="")
        return 0
    args = parse_args(argv)
    model_config = ModelConfig.from_hf(json.loads((Path(args.model_config) / "config.json").read_text()))
    profile = DeviceProfile.from_json(args.profile)
    scale_out = args.output_scale if args.output_scale is not None else args.scale
    lengths = sample_lengths(args.dataset, args.num_requests, args.scale, scale_out,
                             args.max_model_len, args.seed)
    report: dict[str, Any] = {
        "model": Path(args.model_config).name, "profile": profile.gpu_name,
        "profile_file": _relative(args.profile),
        "date": datetime.date.today().isoformat(),
        "command": "python tools/serve_sim.py " + " ".join(argv),
        "args": {k: _relative(v) for k, v in vars(args).items()},
        "engine_tbt_slo_ms": args.tbt_slos_ms[0],
        "modes": {}}
    for mode in args.mode_list:
        report["modes"][mode] = simulate_mode(args, mode, model_config, profile, lengths)
    if args.compare:
        report["compare"] = compare_with(report, args.compare)
    text = markdown(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    if args.table:
        Path(args.table).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
