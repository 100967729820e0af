"""Serving benchmark of the duetjax ``Engine`` in-process (no HTTP): aggregated vs static split vs
DuetServe.

    python tools/bench_duet.py --model none --load-format dummy \\
        --model-config models/configs/llama-3-8b --dataset azure-conversation --scale 0.5 \\
        --qps 1,2,4,8 --num-requests 100 --modes aggregated,static,duet \\
        --out benchmarks/results/duet-XYZ

For each mode a Poisson-arrival workload is driven straight through ``Engine.add_request`` /
``Engine.step`` (no HTTP, no tokenizer), for every QPS point of the sweep, and the results go to
``--out``: ``results.json`` (everything but per-request data), ``results.md`` (tables), with
``--save-requests`` ``requests.json`` (every request's lengths, arrival and token times) and,
when matplotlib imports, ``tbt_p99_vs_qps.png``, ``goodput_vs_qps.png`` and
``ttft_p99_vs_qps.png``. Sweeps of one workload run apart (runs that each hold some of the
modes) merge into one report: ``python tools/bench_duet.py merge OUT A/results.json
B/results.json`` (their ``requests.json`` too). The exit status is 1 when a mode failed or the output check found a
mismatch (everything measured is written first).

Modes
  aggregated  ``mode='aggregated'``: one mixed batch on the whole GPU, every iteration, at the
              fixed token budget ``--max-num-batched-tokens``.
  aggregated@N  the same at a fixed budget of N tokens (Sarathi-Serve's knob: a smaller budget
              shortens the mixed step, so tighter TBT SLOs hold at some cost in prefill rate).
  slo         SLO-aware aggregated (``tbt_slo_ms`` set in aggregated mode): each iteration's
              budget is the largest, up to ``--max-num-batched-tokens``, whose mixed step the
              roofline predicts within the engine's SLO (``duetjax/perf/token_budget.py``).
  duet        ``mode='duet'``: DuetServe's adaptive controller (roofline + hysteresis) over the
              engine's ``duet_pairs`` (``--duet-pairs`` overrides them).
  static      a fixed 50/50 SM partition: ``mode='duet'`` with ``duet_pairs=((50, 50),)`` and,
              by default (``--static-policy forced``), ``duet_policy='static'``: the engine's
              ``optimizer.StaticController``, which splits EVERY iteration that holds both prefill
              and decode work (whatever the roofline says about the aggregated step or the SLO);
              its look-ahead k maximises the same objective as DuetServe's optimizer at the 50/50
              pair, (k*decodes + prefill tokens) / max(k*t_d, t_p), without the SLO filter, i.e.
              decode keeps stepping while the prefill chunk runs. ``--static-policy restricted``
              keeps the adaptive controller and only restricts it to the 50/50 pair (it then
              splits only when the aggregated step is predicted to miss the SLO).
Each mode runs in its own child process (``--in-process`` runs them in this one, CPU only on a
GPU machine): duet mode must start the MPS daemon and turn XLA preallocation off before JAX
touches the GPU, which an earlier aggregated engine in the same process would already have done.

Workload: lengths from ``bench_serve.SYNTHETIC`` (lognormal around the published centres),
multiplied by ``--scale`` (outputs by ``--output-scale``, default ``--scale``), clipped so that
prompt < max_model_len and prompt + output <= max_model_len; prompts are random token ids in
[100, vocab) from a seeded generator, fresh ids for every QPS point (so the prefix cache never
hits across points), the same lengths at every point and in every mode; arrivals are a Poisson
process at the point's QPS. ``--duration-cap-s`` stops issuing arrivals later than that many
seconds into the point; requests still running ``--drain-timeout-s`` after the cap are aborted
(counted as ``aborted``, never good). A warm-up (``--warmup-requests`` requests of the same
distribution, after the duet workers are ready) runs first and is discarded; one engine serves
all QPS points of a mode.

Metrics (all from the engine's wall-clock stamps, ``RequestOutput.metrics``):
- TTFT = first token time - the request's *scheduled* Poisson arrival time (so time the driver
  spent inside ``step`` before it could add the request counts as queueing, as it would for a
  server); ``add_lag`` reports that driver lateness separately.
- TBT (raw) = differences of consecutive ``token_times`` of a request, all requests' gaps pooled.
  The engine stamps every token of one dispatch with the same time (the host sees them at
  once), so a k-step decode or a split iteration delivers k tokens in a burst: raw gaps are 0
  within a burst and the whole iteration before it. That is what a streaming client sees.
- TBT (amortised) = the same gaps with each burst of m tokens after a gap G counted as m gaps
  of G/m: per-token generation time, the view of a per-step SLO.
- TPOT = (last token time - first token time) / (tokens - 1) per request (vLLM's).
- Throughput = completed requests (output tokens, prompt + output tokens) / point duration,
  duration = first scheduled arrival to the last completion (or to the abort).
- Goodput at a TBT SLO s = completed requests per second with TTFT <= ``--ttft-slo-ms`` (default
  2000 ms: a chat-style interactive bound; the TBT criteria below are what this benchmark is
  about) AND, four criteria reported side by side: ``tpot`` mean TPOT <= s (vLLM's goodput);
  ``p99_tbt`` the request's P99 raw gap <= s; ``max_tbt`` every raw gap <= s (strict, burst-sensitive); ``max_tbt_amortised`` every
  amortised gap <= s. Requests with one token have no gaps and meet the TBT criteria.
  SLOs: ``--tbt-slos-ms`` (default 50 and a tighter 25); the first is also the SLO the duet
  controller protects (``EngineConfig.tbt_slo_ms``) unless ``--engine-tbt-slo-ms`` is given.
- Split-mode statistics per point (``DuetStats`` deltas): split / aggregated iterations (the
  latter counts only mixed iterations the controller judged), mode switches (between judged
  iterations: pure prefill or pure decode iterations in between do not count), worker failures,
  requeued requests, split k, switch (pipeline drain) time, and the roofline error over split
  iterations, |predicted - measured| / measured (median, p95) and its signed mean.

``--check-outputs`` runs a fixed set of greedy requests (prompts longer and shorter than the
token budget, so prefill chunks meet decodes) through every mode and compares their token ids
with the first mode's; the result is in the JSON and the tables, and the exit status is 1 on a
mismatch. On a GPU in bf16 a mismatch can be numerics (another batch shape flips a near-tie in
the argmax, likelier with random weights) as well as a bug: the first diverging position is
recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_serve import SYNTHETIC, _lognormal  # noqa: E402

MODES = ("aggregated", "slo", "static", "duet")
"""Mode kinds; ``aggregated@N`` is aggregated at a fixed budget of N tokens."""


def mode_kind(mode: str) -> tuple[str, int | None]:
    """('aggregated', N) for 'aggregated@N'; (mode, None) otherwise. ValueError when unknown."""
    kind, _, budget = mode.partition("@")
    if kind not in MODES or (budget and (kind != "aggregated" or not budget.isdigit())):
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)} or aggregated@N")
    return kind, int(budget) if budget else None


def is_aggregated(mode: str) -> bool:
    """An aggregated variant (fixed or SLO-aware budget): the baselines duet must beat."""
    return mode_kind(mode)[0] in ("aggregated", "slo")
STATIC_SHARES = (50, 50)


def log(*args: Any) -> None:
    print(*args, flush=True)


# ---- metric math (pure; no engine) -----------------------------------------------------------

def tbt_gaps(token_times: Sequence[float]) -> list[float]:
    """Raw time between consecutive tokens, seconds (0 inside a burst of one dispatch)."""
    return [b - a for a, b in zip(token_times, token_times[1:])]


def amortised_gaps(token_times: Sequence[float]) -> list[float]:
    """Gaps with each burst of m equal stamps after a gap G counted as m gaps of G / m.

    Tokens sharing the first token's stamp came with it (no gap to spread): they count as 0.
    The result has as many entries as ``tbt_gaps``."""
    gaps: list[float] = []
    i, n = 1, len(token_times)
    while i < n and token_times[i] == token_times[0]:
        gaps.append(0.0)
        i += 1
    while i < n:
        j = i
        while j + 1 < n and token_times[j + 1] == token_times[i]:
            j += 1
        m = j - i + 1
        gaps += [(token_times[i] - token_times[i - 1]) / m] * m
        i = j + 1
    return gaps


def tpot(token_times: Sequence[float]) -> float | None:
    """Mean time per output token after the first, seconds; None with fewer than 2 tokens."""
    if len(token_times) < 2:
        return None
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1)


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | int | None]:
    """p50, p99, mean and max in milliseconds (numpy's linear percentiles), and the count."""
    v = np.asarray(list(values_s), dtype=float)
    if v.size == 0:
        return {"n": 0, "p50": None, "p99": None, "mean": None, "max": None}
    return {"n": int(v.size), "p50": float(1e3 * np.percentile(v, 50)),
            "p99": float(1e3 * np.percentile(v, 99)), "mean": float(1e3 * v.mean()),
            "max": float(1e3 * v.max())}


@dataclasses.dataclass
class RequestRecord:
    """One request of a point, as the driver saw it (times are time.time() seconds)."""

    prompt_len: int
    max_tokens: int
    arrival: float
    """Scheduled Poisson arrival."""
    added: float
    """When add_request ran (>= arrival: the driver may have been inside step)."""
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished: float | None = None
    output_len: int = 0
    aborted: bool = False

    @property
    def completed(self) -> bool:
        return not self.aborted and self.finished is not None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None


def request_meets(record: RequestRecord, criterion: str, tbt_slo_s: float, ttft_slo_s: float) -> bool:
    """Whether a request counts towards goodput under ``criterion`` ('tpot', 'p99_tbt',
    'max_tbt', 'max_tbt_amortised') at TBT SLO ``tbt_slo_s`` and TTFT SLO ``ttft_slo_s``."""
    if not record.completed or record.ttft is None or record.ttft > ttft_slo_s:
        return False
    if criterion == "tpot":
        t = tpot(record.token_times)
        return t is None or t <= tbt_slo_s
    if criterion == "p99_tbt":
        gaps = tbt_gaps(record.token_times)
        return not gaps or float(np.percentile(gaps, 99)) <= tbt_slo_s
    gaps = (tbt_gaps if criterion == "max_tbt" else amortised_gaps)(record.token_times)
    return not gaps or max(gaps) <= tbt_slo_s


GOODPUT_CRITERIA = ("tpot", "p99_tbt", "max_tbt", "max_tbt_amortised")
"""vLLM's (mean TPOT), the request's P99 raw token gap, every raw gap, every amortised gap."""


def summarize(records: Sequence[RequestRecord], duration_s: float, tbt_slos_ms: Sequence[float],
              ttft_slo_ms: float) -> dict[str, Any]:
    """The metrics of one point (see the module docstring for the definitions)."""
    done = [r for r in records if r.completed]
    duration_s = max(duration_s, 1e-9)
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    raw = [g for r in done for g in tbt_gaps(r.token_times)]
    amortised = [g for r in done for g in amortised_gaps(r.token_times)]
    tpots = [t for t in (tpot(r.token_times) for r in done) if t is not None]
    goodput: dict[str, dict[str, float]] = {}
    attainment: dict[str, dict[str, float]] = {}
    for slo in tbt_slos_ms:
        key = f"{slo:g}"
        goodput[key], attainment[key] = {}, {}
        for criterion in GOODPUT_CRITERIA:
            good = sum(request_meets(r, criterion, slo / 1e3, ttft_slo_ms / 1e3) for r in records)
            goodput[key][criterion] = good / duration_s
            attainment[key][criterion] = good / len(records) if records else 0.0
    return {
        "issued": len(records), "completed": len(done),
        "aborted": sum(r.aborted for r in records),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_token_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "mean_prompt_len": float(np.mean([r.prompt_len for r in done])) if done else None,
        "mean_output_len": float(np.mean([r.output_len for r in done])) if done else None,
        "ttft_ms": distribution_ms(r.ttft for r in done if r.ttft is not None),
        "tbt_ms": distribution_ms(raw),
        "tbt_amortised_ms": distribution_ms(amortised),
        "tpot_ms": distribution_ms(tpots),
        "e2e_ms": distribution_ms(r.finished - r.arrival for r in done),
        "add_lag_ms": distribution_ms(r.added - r.arrival for r in records),
        "ttft_slo_ms": ttft_slo_ms,
        "goodput": goodput,
        "slo_attainment": attainment,
    }


def roofline_error(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """|predicted - measured| / measured over split iterations: median, p95, and signed mean."""
    pairs = [(p, m) for p, m in zip(predicted, measured) if m > 0]
    if not pairs:
        return {"n": 0, "median": None, "p95": None, "signed_mean": None}
    rel = np.array([(p - m) / m for p, m in pairs])
    return {"n": len(pairs), "median": float(np.median(np.abs(rel))),
            "p95": float(np.percentile(np.abs(rel), 95)), "signed_mean": float(rel.mean())}


# ---- workload -------------------------------------------------------------------------------

@dataclasses.dataclass
class WorkItem:
    prompt_ids: list[int]
    max_tokens: int
    arrival: float
    """Seconds after the point's start."""


def sample_lengths(dataset: str, n: int, scale: float, output_scale: float, max_model_len: int,
                   seed: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths: the dataset's lognormals with centres times the scales, clipped
    so prompt < max_model_len and prompt + output <= max_model_len (every token is served)."""
    centre_in, sigma_in, centre_out, sigma_out, kind = SYNTHETIC[dataset]
    rng = np.random.default_rng(seed)
    ins = _lognormal(rng, centre_in * scale, sigma_in, kind, n, max_model_len - 1)
    outs = _lognormal(rng, centre_out * output_scale, sigma_out, kind, n, max_model_len)
    return [(int(i), int(min(o, max_model_len - i))) for i, o in zip(ins, outs)]


def random_prompt(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    low = min(100, vocab_size // 2)
    return rng.integers(low, vocab_size, size=n).tolist()


def make_point(lengths: Sequence[tuple[int, int]], vocab_size: int, qps: float, seed: int,
               point: int) -> list[WorkItem]:
    """One QPS point: fresh prompt ids for ``point``, Poisson arrivals at ``qps``."""
    ids = np.random.default_rng([seed, point, 1])
    gaps = np.random.default_rng([seed, point, 2]).exponential(1.0 / qps, size=len(lengths))
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request arrives at the start
    return [WorkItem(random_prompt(ids, p, vocab_size), o, float(a))
            for (p, o), a in zip(lengths, arrivals)]


def digest(items: Sequence[WorkItem]) -> str:
    """Names a point's workload (lengths, arrivals and prompt ids), to check modes saw the same."""
    h = hashlib.sha1()
    for item in items:
        h.update(json.dumps([item.max_tokens, round(item.arrival, 9), item.prompt_ids]).encode())
    return h.hexdigest()[:16]


# ---- driving the engine ---------------------------------------------------------------------

def drive(engine: Any, items: Sequence[WorkItem], duration_cap_s: float | None = None,
          drain_timeout_s: float = 120.0) -> tuple[list[RequestRecord], float]:
    """Runs one point: adds each request when its arrival time has come, steps the engine while
    it has work, else sleeps until the next arrival. Arrivals later than ``duration_cap_s`` are
    not issued; what still runs ``drain_timeout_s`` after the cap (or after the last arrival,
    whichever is earlier) is aborted. Returns the records (issued requests only) and the point's
    duration (start to the last completion, or to the abort)."""
    from duetjax import SamplingParams

    items = sorted(items, key=lambda w: w.arrival)
    cap = math.inf if duration_cap_s is None else duration_cap_s
    start = time.time()
    records: dict[str, RequestRecord] = {}
    i, n = 0, len(items)
    aborted_at = None
    while True:
        now = time.time()
        while i < n and items[i].arrival <= min(now - start, cap):
            item = items[i]
            params = SamplingParams(max_tokens=item.max_tokens, ignore_eos=True, temperature=0.0)
            rid = engine.add_request({"prompt_token_ids": item.prompt_ids}, params)
            records[rid] = RequestRecord(len(item.prompt_ids), item.max_tokens,
                                         start + item.arrival, time.time())
            i += 1
        issuing_done = i >= n or items[i].arrival > cap
        if engine.has_unfinished_requests():
            for output in engine.step():
                record = records.get(output.request_id)
                if record is not None and output.finished:
                    record.token_times = list(output.metrics.token_times)
                    record.finished = output.metrics.finished_time
                    record.output_len = len(output.outputs[0].token_ids)
            last = min(cap, items[i - 1].arrival if i else 0.0)
            if issuing_done and time.time() - start > last + drain_timeout_s:
                aborted_at = time.time()
                for rid, record in records.items():
                    if record.finished is None:
                        engine.abort(rid)
                        record.aborted = True
                while engine.has_unfinished_requests():  # settle the pipeline
                    engine.step()
                break
        elif issuing_done:
            break
        else:
            time.sleep(max(0.0, start + items[i].arrival - time.time()))
    ends = [r.finished for r in records.values() if r.finished is not None]
    end = aborted_at if aborted_at is not None else (max(ends) if ends else time.time())
    return list(records.values()), end - start


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per-request raw data: times in seconds after the point's first arrival (arrival, add)
    or after the request's own arrival (tokens, finish)."""
    t0 = min((r.arrival for r in records), default=0.0)
    return [{"prompt_len": r.prompt_len, "max_tokens": r.max_tokens, "output_len": r.output_len,
             "aborted": r.aborted, "arrival": round(r.arrival - t0, 6),
             "added": round(r.added - t0, 6),
             "finished": None if r.finished is None else round(r.finished - r.arrival, 6),
             "token_times": [round(t - r.arrival, 6) for t in r.token_times]} for r in records]


def _stats_snapshot(engine: Any) -> dict[str, Any]:
    from duetjax.gc_pauses import gc_pauses

    pauses = gc_pauses()
    stats = engine.stats()
    snap = {"stats": stats, "gc": pauses.snapshot()}
    history = engine.split_history()
    if history is not None:
        snap["duet_lists"] = {name: len(getattr(history, name)) for name in SPLIT_RECORDS}
        snap["duet_decisions"] = dict(history.decisions)
    pauses.longest_seconds = 0.0  # (the longest pause from here on: ``loop_delta``)
    return snap


SPLIT_RECORDS = ("split_k", "split_stream_k", "split_shares", "predicted_seconds", "measured_seconds",
                 "switch_seconds", "predicted_prefill_seconds", "prefill_worker_seconds",
                 "predicted_decode_step_seconds", "decode_worker_seconds", "decode_worker_steps",
                 "decode_worker_dispatches", "split_prefill_tokens", "split_decode_batch")
"""``DuetStats`` lists kept per QPS point (one entry per split iteration; switches apart)."""

DUET_COUNTERS = ("split_iterations", "aggregated_iterations", "mode_switches", "worker_failures",
                 "requeued_requests", "stream_dispatches", "carried_dispatches")
"""``EngineStats`` counters of duet mode kept per QPS point."""


def duet_delta(engine: Any, before: dict[str, Any] | None) -> dict[str, Any] | None:
    """DuetStats accumulated since ``before`` (a ``_stats_snapshot``; None: since the start)."""
    history = engine.split_history()
    if history is None:
        return None
    now = engine.stats()
    out = {name: getattr(now, name) - (getattr(before["stats"], name) if before else 0)
           for name in DUET_COUNTERS}
    lists = {name: list(getattr(history, name))[(before["duet_lists"][name] if before else 0):]
             for name in SPLIT_RECORDS}
    then = before["duet_decisions"] if before else {}
    out["decisions"] = {why: n - then.get(why, 0) for why, n in sorted(history.decisions.items())
                        if n > then.get(why, 0)}
    ks = lists["split_k"]
    out["split_k_mean"] = float(np.mean(ks)) if ks else None
    out["split_k_histogram"] = {str(k): ks.count(k) for k in sorted(set(ks))}
    out["split_ms"] = distribution_ms(lists["measured_seconds"])
    out["switch_ms"] = distribution_ms(lists["switch_seconds"])
    # Where a split iteration's time goes: each worker's own time on its step (launch to
    # results on its host) against the engine's dispatch-to-results time.
    out["prefill_worker_ms"] = distribution_ms(lists["prefill_worker_seconds"])
    out["decode_worker_ms"] = distribution_ms(lists["decode_worker_seconds"])
    out["decode_worker_ms_per_step"] = distribution_ms(
        [t / n for t, n in zip(lists["decode_worker_seconds"], lists["decode_worker_steps"]) if n])
    out["roofline_error"] = roofline_error(lists["predicted_seconds"], lists["measured_seconds"])
    out["records"] = lists  # per split iteration, to fit the split-mode roofline offline
    return out


def loop_delta(engine: Any, before: dict[str, Any]) -> dict[str, Any]:
    now, then = engine.stats(), before["stats"]
    d = dataclasses.asdict(now.loop.since(then.loop))
    d["host_ms_per_step"] = 1e3 * d["host_seconds"] / max(d["steps"], 1)
    d["compile_seconds_during"] = now.compile_seconds - then.compile_seconds
    from duetjax.gc_pauses import gc_pauses

    pauses = gc_pauses()
    gc_now = pauses.snapshot()
    d["gc"] = {k: gc_now[k] - before["gc"][k] for k in ("collections", "full_collections", "seconds")}
    d["gc"]["longest_seconds"] = gc_now["longest_seconds"]  # (since the snapshot: reset there)
    if now.token_budget_choices:  # the SLO-aware budget: how often each size was chosen
        d["budgets"] = {size: n - then.token_budget_choices.get(size, 0)
                        for size, n in sorted(now.token_budget_choices.items())
                        if n > then.token_budget_choices.get(size, 0)}
    if now.mixed_step_observations:  # what the budgets' online correction ended the point at
        d["mixed_step_correction"] = now.mixed_step_correction
        d["mixed_step_observations"] = now.mixed_step_observations - then.mixed_step_observations
        d["mixed_step_errors"] = list(now.mixed_step_errors)  # (p50, p90, p99, last 1,000 steps)
    return d


CHECK_SEED = 7919


def check_requests(vocab_size: int, max_model_len: int, budget: int) -> tuple[list[list[int]], list[int]]:
    """The fixed greedy set: prompts shorter and longer than the step's token budget (so chunked
    prefill meets running decodes), outputs long enough to decode through several splits."""
    rng = np.random.default_rng(CHECK_SEED)
    fractions = (0.3, 1.6, 0.6, 2.5, 0.2, 1.1, 0.45, 0.8)
    outputs = (24, 12, 32, 8, 28, 16, 20, 30)
    prompts, lens = [], []
    for f, m in zip(fractions, outputs):
        p = int(min(max(4, round(f * budget)), max_model_len // 2))
        prompts.append(random_prompt(rng, p, vocab_size))
        lens.append(int(min(m, max_model_len - p)))
    return prompts, lens


def run_check(engine: Any) -> dict[str, Any]:
    from duetjax import SamplingParams

    prompts, lens = check_requests(engine.vocab_size, engine.max_model_len,
                                   engine.config.max_num_batched_tokens)
    before = _stats_snapshot(engine)
    outs = engine.generate([{"prompt_token_ids": p} for p in prompts],
                           [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0)
                            for m in lens], use_tqdm=False)
    delta = duet_delta(engine, before)
    return {"prompt_lens": [len(p) for p in prompts], "max_tokens": lens,
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "split_iterations": delta["split_iterations"] if delta else 0}


def compare_checks(checks: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Token ids of every mode against the first mode that has them."""
    have = {m: c for m, c in checks.items() if c}
    if len(have) < 2:
        return {"compared": list(have), "identical": None, "note": "fewer than two modes to compare"}
    reference_mode, reference = next(iter(have.items()))
    mismatches = []
    for mode, check in have.items():
        for index, (a, b) in enumerate(zip(reference["token_ids"], check["token_ids"])):
            if a != b:
                first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                mismatches.append({"mode": mode, "request": index, "first_diverging_token": first,
                                   "lengths": [len(a), len(b)]})
    return {"reference": reference_mode, "compared": list(have), "identical": not mismatches,
            "requests": len(reference["token_ids"]),
            "mismatches": mismatches,
            "split_iterations": {m: c["split_iterations"] for m, c in have.items()}}


# ---- one mode -------------------------------------------------------------------------------

def engine_kwargs(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    kind, budget = mode_kind(mode)
    kw: dict[str, Any] = dict(max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=budget or args.max_num_batched_tokens,
                              max_decode_steps=args.max_decode_steps, decode_steps=args.decode_steps,
                              seed=args.seed)
    if kind != "aggregated":  # (a fixed budget has no SLO to meet)
        kw["tbt_slo_ms"] = engine_slo_ms(args)
    for name in ("max_model_len", "kv_cache_tokens", "scan_unroll", "compilation_cache_dir",
                 "device_profile", "kv_cache_memory_fraction", "compile_threads",
                 "slo_min_prefill_tokens", "slo_ttft_ms"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if kind in ("duet", "static"):
        kw["duet_carry_stream"] = args.carry_stream
    if kind in ("aggregated", "slo"):
        kw["mode"] = "aggregated"
        if kind == "slo":
            kw["duet_online_correction"] = not args.no_online_correction
    elif kind == "duet":
        kw["mode"] = "duet"
        kw["duet_online_correction"] = not args.no_online_correction
        if args.duet_pairs:
            kw["duet_pairs"] = parse_pairs(args.duet_pairs)
    elif kind == "static":
        kw["mode"] = "duet"
        kw["duet_pairs"] = (STATIC_SHARES,)
        kw["duet_policy"] = "static" if args.static_policy == "forced" else "adaptive"
    return kw


def model_path(args: argparse.Namespace) -> str | None:
    model = None if str(args.model).lower() in ("none", "") else args.model
    if args.model_config:
        if model is not None:
            raise SystemExit("--model-config gives the model; pass --model none with it")
        return args.model_config
    return model


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Builds the engine of ``mode``, warms it up, runs the sweep (and the output check)."""
    from duetjax import Engine, SamplingParams

    kw = engine_kwargs(args, mode)
    log(f"[{mode}] engine: {kw}")
    started = time.perf_counter()
    engine = Engine(model_path(args), load_format=args.load_format, dtype=args.dtype,
                    show_progress=False, **kw)
    try:
        import jax

        result: dict[str, Any] = {"mode": mode, "device": jax.devices()[0].device_kind,
                                  "backend": jax.default_backend(), "jax": jax.__version__}
        result["engine_mode"] = engine.mode
        result["startup_s"] = time.perf_counter() - started
        result["engine_config"] = {k: v for k, v in dataclasses.asdict(engine.config).items()}
        result["max_model_len"] = engine.max_model_len
        stats = engine.stats()
        result["kv_capacity_tokens"] = stats.num_pages * stats.page_size
        if mode == "static":
            result["static_policy"] = args.static_policy
        if engine.mode == "duet":
            before = time.perf_counter()
            result["workers"] = engine.wait_for_workers(args.worker_timeout_s)
            result["workers_ready_s"] = time.perf_counter() - before
        log(f"[{mode}] ready in {result['startup_s']:.1f} s"
            + (f" + workers {result['workers_ready_s']:.1f} s" if engine.mode == "duet" else "")
            + f"; max_model_len {engine.max_model_len}, KV {result['kv_capacity_tokens']} tokens")

        vocab = engine.vocab_size
        lengths = sample_lengths(args.dataset, args.num_requests, args.scale,
                                 args.output_scale if args.output_scale is not None else args.scale,
                                 engine.max_model_len, args.seed)
        if args.warmup_requests > 0:
            before = time.perf_counter()
            snap = _stats_snapshot(engine)
            warm = sample_lengths(args.dataset, args.warmup_requests, args.scale,
                                  args.output_scale if args.output_scale is not None else args.scale,
                                  engine.max_model_len, args.seed + 1)
            rng = np.random.default_rng([args.seed, 999])
            engine.generate([{"prompt_token_ids": random_prompt(rng, p, vocab)} for p, _ in warm],
                            [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0)
                             for _, o in warm], use_tqdm=False)
            result["warmup"] = {"requests": args.warmup_requests,
                                "seconds": time.perf_counter() - before,
                                "compile_seconds_during": loop_delta(engine, snap)["compile_seconds_during"],
                                "duet": duet_delta(engine, snap)}
            log(f"[{mode}] warm-up: {args.warmup_requests} requests in {result['warmup']['seconds']:.1f} s")
        if args.gc_freeze:  # as ``duetjax.serve`` does once the engine is up
            from duetjax.gc_pauses import freeze_startup_heap

            freeze_startup_heap()
        result["gc_freeze"] = args.gc_freeze

        result["points"] = []
        for index, qps in enumerate(args.qps):
            items = make_point(lengths, vocab, qps, args.seed, index)
            snap = _stats_snapshot(engine)
            records, duration = drive(engine, items, args.duration_cap_s, args.drain_timeout_s)
            point = {"qps": qps, "workload": digest(items),
                     "offered_qps": (len(records) - 1) / max(records[-1].arrival - records[0].arrival, 1e-9)
                     if len(records) > 1 else None}
            point.update(summarize(records, duration, args.tbt_slos_ms, args.ttft_slo_ms))
            point["loop"] = loop_delta(engine, snap)
            if args.save_requests:
                point["requests"] = request_rows(records)
            point["duet"] = duet_delta(engine, snap)
            result["points"].append(point)
            log(point_line(mode, point, args.tbt_slos_ms))
        result["duet_totals"] = duet_delta(engine, None)
        if args.check_outputs:
            result["check"] = run_check(engine)
            log(f"[{mode}] output check: {len(result['check']['token_ids'])} requests, "
                f"{result['check']['split_iterations']} split iterations")
        return result
    finally:
        engine.close()


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def point_line(mode: str, p: dict[str, Any], slos: Sequence[float]) -> str:
    slo = f"{slos[0]:g}"
    splits = f", {p['duet']['split_iterations']} splits" if p.get("duet") else ""
    return (f"[{mode}] qps {p['qps']:g}: {p['completed']}/{p['issued']} done in {p['duration_s']:.1f} s, "
            f"{p['request_throughput']:.2f} req/s, {p['output_token_throughput']:.0f} out tok/s; "
            f"TTFT p50/p99 {_fmt(p['ttft_ms']['p50'])}/{_fmt(p['ttft_ms']['p99'])} ms; "
            f"TBT p50/p99 {_fmt(p['tbt_ms']['p50'])}/{_fmt(p['tbt_ms']['p99'])} ms "
            f"(amortised p99 {_fmt(p['tbt_amortised_ms']['p99'])}); goodput@{slo}ms tpot/maxTBT "
            f"{p['goodput'][slo]['tpot']:.2f}/{p['goodput'][slo]['max_tbt']:.2f} req/s{splits}"
            + (f"; budgets {p['loop']['budgets']}" if p.get("loop", {}).get("budgets") else "")
            + (f" (mixed-step correction {p['loop']['mixed_step_correction']:.3f} after "
               f"{p['loop']['mixed_step_observations']} steps; measured/predicted p50/p90/p99 "
               + "/".join(f"{e:.3f}" for e in p['loop'].get('mixed_step_errors', ())) + ")"
               if "mixed_step_correction" in p.get("loop", {}) else "")
            + (f"; GC {p['loop']['gc']['full_collections']} full, longest "
               f"{1e3 * p['loop']['gc']['longest_seconds']:.1f} ms" if "gc" in p.get("loop", {}) else ""))


# ---- report ---------------------------------------------------------------------------------

def markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    slos = [f"{s:g}" for s in a["tbt_slos_ms"]]
    lines = [f"# DuetServe evaluation: {report['model']} on {report.get('device', '?')} ({report['date']})",
             "", f"Command: `{report['command']}`", "",
             f"Workload: {a['dataset']} lengths x{a['scale']:g} (outputs x"
             f"{a['output_scale'] if a['output_scale'] is not None else a['scale']:g}), "
             f"{a['num_requests']} requests per point, Poisson arrivals, seed {a['seed']}"
             + (f", arrivals capped at {a['duration_cap_s']:g} s" if a["duration_cap_s"] else "")
             + f". TTFT SLO {a['ttft_slo_ms']:g} ms; TBT SLOs {', '.join(slos)} ms; the duet "
             f"controller protects {report['engine_tbt_slo_ms']:g} ms.", "",
             "Goodput (req/s) per TBT SLO as `tpot / p99_tbt / max_tbt / max_tbt_amortised`: TTFT "
             "within its SLO and, respectively, mean TPOT (vLLM's goodput), the request's P99 raw "
             "token gap, every raw token gap, every amortised gap within the TBT SLO. TBT raw: gaps between token arrivals at the host (a k-token "
             "burst shows as one gap and k-1 zeros); amortised: each burst's gap spread over its "
             "tokens.", ""]
    lines += best_aggregated_table(report, slos)
    if "static" in report["modes"]:
        policy = report["modes"]["static"].get("static_policy") or a["static_policy"]
        lines += [("static = a fixed 50/50 SM split of every iteration that holds both prefill "
                   "and decode (`duet_policy='static'`, k by the optimizer's "
                   "objective without the SLO filter)." if policy == "forced" else
                   "static = DuetServe's adaptive controller restricted to the 50/50 pair (it "
                   "splits only when the aggregated step is predicted to miss the SLO)."), ""]
    head = ("| mode | QPS | offered | done | req/s | out tok/s | TTFT p50 | TTFT p99 | TBT p50 | "
            "TBT p99 | TBT mean | TBT p99 amort. | TPOT mean | "
            + " | ".join(f"goodput @{s} ms" for s in slos) + " | splits |")
    lines += [head, "|" + " --- |" * (14 + len(slos))]
    for mode, res in report["modes"].items():
        if "error" in res:
            lines.append(f"| {mode} | failed: {res['error']} |")
            continue
        for p in res["points"]:
            good = " | ".join("/".join(f"{p['goodput'][s][c]:.2f}" for c in GOODPUT_CRITERIA)
                              for s in slos)
            splits = p["duet"]["split_iterations"] if p.get("duet") else "-"
            lines.append(
                f"| {mode} | {p['qps']:g} | {_fmt(p['offered_qps'], 2)} | {p['completed']}/{p['issued']} | "
                f"{p['request_throughput']:.2f} | {p['output_token_throughput']:.0f} | "
                f"{_fmt(p['ttft_ms']['p50'])} | {_fmt(p['ttft_ms']['p99'])} | "
                f"{_fmt(p['tbt_ms']['p50'])} | {_fmt(p['tbt_ms']['p99'])} | {_fmt(p['tbt_ms']['mean'])} | "
                f"{_fmt(p['tbt_amortised_ms']['p99'])} | {_fmt(p['tpot_ms']['mean'])} | {good} | {splits} |")
    lines.append("")
    duet_rows = [(m, r, p) for m, r in report["modes"].items() if "error" not in r
                 for p in r["points"] if p.get("duet")]
    if duet_rows:
        lines += ["Split mode per point (roofline error = |predicted - measured| / measured over "
                  "split iterations; aggregated iterations counts only mixed iterations the "
                  "controller judged):", "",
                  "| mode | QPS | split it. | aggregated it. | switches | k mean | split ms p50 | "
                  "prefill worker ms p50 | decode worker ms/step p50 | "
                  "switch ms mean | roofline err. median | p95 | signed mean | worker failures | "
                  "requeued | decided by |",
                  "|" + " --- |" * 16]
        for mode, _, p in duet_rows:
            d = p["duet"]
            e = d["roofline_error"]
            pct = (lambda x: "-" if x is None else f"{100 * x:.1f} %")
            lines.append(f"| {mode} | {p['qps']:g} | {d['split_iterations']} | {d['aggregated_iterations']} | "
                         f"{d['mode_switches']} | {_fmt(d['split_k_mean'], 2)} | {_fmt(d['split_ms']['p50'], 2)} | "
                         f"{_fmt(d.get('prefill_worker_ms', {}).get('p50'), 2)} | "
                         f"{_fmt(d.get('decode_worker_ms_per_step', {}).get('p50'), 2)} | "
                         f"{_fmt(d['switch_ms']['mean'], 2)} | {pct(e['median'])} | {pct(e['p95'])} | "
                         f"{pct(e['signed_mean'])} | {d['worker_failures']} | {d['requeued_requests']} | "
                         + (", ".join(f"{why}: {n}" for why, n in d.get("decisions", {}).items())
                            or "-") + " |")
        lines.append("")
    lines += ["Engines:", ""]
    for mode, res in report["modes"].items():
        if "error" in res:
            continue
        c = res["engine_config"]
        lines.append(f"- {mode}: engine mode {res['engine_mode']}, max_num_seqs {c['max_num_seqs']}, "
                     f"max_num_batched_tokens {c['max_num_batched_tokens']}, max_model_len "
                     f"{res['max_model_len']}, KV {res['kv_capacity_tokens']} tokens, decode_steps "
                     f"{c['decode_steps']}, max_decode_steps {c['max_decode_steps']}"
                     + (f", pairs {c['duet_pairs']}, workers ready in {res['workers_ready_s']:.1f} s"
                        if res.get("workers") else "")
                     + f"; start-up {res['startup_s']:.1f} s")
    lines.append("")
    check = report.get("check_outputs")
    if check:
        if check.get("identical") is None:
            lines.append(f"Output check: {check.get('note')}.")
        else:
            lines.append(f"Output check ({check['requests']} greedy requests; split iterations "
                         f"during it per mode: {check['split_iterations']}): "
                         + ("identical token ids in every mode." if check["identical"] else
                            f"MISMATCH against {check['reference']}: {check['mismatches']}"))
        lines.append("")
    return "\n".join(lines)


def best_aggregated(report: dict[str, Any], slo: str, criterion: str,
                    index: int) -> tuple[str | None, float | None]:
    """(mode, goodput) of the best aggregated variant at point ``index`` for that SLO and
    criterion: the baseline each other mode is compared with."""
    best = (None, None)
    for mode, res in report["modes"].items():
        if "error" in res or not is_aggregated(mode) or index >= len(res["points"]):
            continue
        good = res["points"][index]["goodput"][slo][criterion]
        if best[1] is None or good > best[1]:
            best = (mode, good)
    return best


def best_aggregated_table(report: dict[str, Any], slos: Sequence[str]) -> list[str]:
    """Each non-aggregated mode's goodput over the best aggregated variant's, per point, SLO
    and criterion (empty without both kinds)."""
    others = [m for m, r in report["modes"].items() if "error" not in r and not is_aggregated(m)]
    if not others or not any(is_aggregated(m) and "error" not in r
                             for m, r in report["modes"].items()):
        return []
    lines = ["Against the best aggregated variant at each point (goodput req/s, mode in "
             "brackets; ratio = mode / best aggregated). `TBT p99 ok`: the mode's pooled P99 token "
             "gap is within the SLO.", "",
             "| QPS | SLO ms | criterion | best aggregated | "
             + " | ".join(f"{m} | ratio | TBT p99 ok" for m in others) + " |",
             "|" + " --- |" * (4 + 3 * len(others))]
    qps = [p["qps"] for p in next(r for m, r in report["modes"].items()
                                  if "error" not in r and is_aggregated(m))["points"]]
    for index, q in enumerate(qps):
        for slo in slos:
            for criterion in ("tpot", "p99_tbt", "max_tbt"):
                mode, best = best_aggregated(report, slo, criterion, index)
                cells = []
                for m in others:
                    points = report["modes"][m]["points"]
                    if index >= len(points):
                        cells.append("- | - | -")
                        continue
                    p = points[index]
                    good = p["goodput"][slo][criterion]
                    ratio = f"{good / best:.2f}" if best else "-"
                    ok = p["tbt_ms"]["p99"] is not None and p["tbt_ms"]["p99"] <= float(slo)
                    cells.append(f"{good:.2f} | {ratio} | {'yes' if ok else 'no'}")
                lines.append(f"| {q:g} | {slo} | {criterion} | {best:.2f} ({mode}) | "
                             + " | ".join(cells) + " |")
    return lines + [""]


def plot(report: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    slos = [f"{s:g}" for s in report["args"]["tbt_slos_ms"]]
    modes = {m: r for m, r in report["modes"].items() if "error" not in r and r.get("points")}
    written = []

    def series(res: dict, key: Any) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for p in res["points"]:
            y = key(p)
            if y is not None:
                xs.append(p["qps"])
                ys.append(y)
        return xs, ys

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, res in modes.items():
        line, = ax.plot(*series(res, lambda p: p["tbt_ms"]["p99"]), "o-", label=f"{mode} (raw)")
        ax.plot(*series(res, lambda p: p["tbt_amortised_ms"]["p99"]), "x--", color=line.get_color(),
                label=f"{mode} (amortised)")
    for s in slos:
        ax.axhline(float(s), color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="QPS", ylabel="TBT p99 (ms)", title="TBT p99 vs QPS")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tbt_p99_vs_qps.png", dpi=120)
    plt.close(fig)
    written.append("tbt_p99_vs_qps.png")

    shown = (("tpot", "mean TPOT"), ("p99_tbt", "request P99 gap"), ("max_tbt", "every gap"))
    fig, axes = plt.subplots(len(slos), len(shown), figsize=(5 * len(shown), 4 * len(slos)),
                             squeeze=False)
    for row, s in zip(axes, slos):
        for ax, (criterion, words) in zip(row, shown):
            for mode, res in modes.items():
                ax.plot(*series(res, lambda p: p["goodput"][s][criterion]),
                        "o-" if is_aggregated(mode) else "s--", label=mode)
            ax.set(xlabel="QPS", ylabel="goodput (req/s)", title=f"goodput by {words}, TBT SLO {s} ms")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "goodput_vs_qps.png", dpi=120)
    plt.close(fig)
    written.append("goodput_vs_qps.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, res in modes.items():
        ax.plot(*series(res, lambda p: p["ttft_ms"]["p99"]), "o-", label=mode)
    ax.axhline(report["args"]["ttft_slo_ms"], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="QPS", ylabel="TTFT p99 (ms)", title="TTFT p99 vs QPS", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ttft_p99_vs_qps.png", dpi=120)
    plt.close(fig)
    written.append("ttft_p99_vs_qps.png")
    return written


# ---- command line ---------------------------------------------------------------------------

def parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """'80/20,50/50' -> ((80, 20), (50, 50))."""
    return tuple(tuple(int(x) for x in item.split("/")) for item in text.split(","))  # type: ignore[misc]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def engine_slo_ms(args: argparse.Namespace) -> float:
    return args.engine_tbt_slo_ms if args.engine_tbt_slo_ms is not None else args.tbt_slos_ms[0]


def add_serving_args(p: argparse.ArgumentParser) -> None:
    """The workload, metric and engine options a GPU run and its simulation
    (``serve_sim.py``) share, so that the same arguments mean the same point."""
    p.add_argument("--dataset", default="azure-conversation", choices=tuple(SYNTHETIC))
    p.add_argument("--scale", type=float, default=1.0, help="multiplies prompt (and output) lengths")
    p.add_argument("--output-scale", type=float, default=None, help="output lengths (default --scale)")
    p.add_argument("--qps", type=floats, default=[1.0, 2.0, 4.0, 8.0], help="comma-separated sweep")
    p.add_argument("--num-requests", type=int, default=100, help="requests per QPS point")
    p.add_argument("--drain-timeout-s", type=float, default=120.0,
                   help="abort what still runs this long after the cap (or after the last arrival)")
    p.add_argument("--modes", default="aggregated,static,duet",
                   help="comma-separated: aggregated, aggregated@N (fixed budget N), slo, static, duet")
    p.add_argument("--tbt-slos-ms", type=floats, default=[50.0, 25.0],
                   help="TBT SLOs for goodput; the first is the duet controller's unless "
                        "--engine-tbt-slo-ms")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-decode-steps", type=int, default=8)
    p.add_argument("--slo-min-prefill-tokens", type=int, default=None,
                   help="EngineConfig.slo_min_prefill_tokens (None: the engine's default)")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="EngineConfig.slo_ttft_ms: the slo and duet engines' budget keeps the "
                        "queue's pace for this time to first token (None: the engine's default)")
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--duet-pairs", default=None, help="duet mode's pairs, e.g. 80/20,70/30,60/40,50/50")


def check_serving_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        try:
            mode_kind(m)
        except ValueError as e:
            p.error(str(e))
    if not args.qps or any(q <= 0 for q in args.qps):
        p.error("--qps needs positive rates")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="none",
                   help="checkpoint directory / GGUF, a shipped config name with --load-format "
                        "dummy (llama-3-8b), or 'none' (the embedded SmolLM2, or --model-config)")
    p.add_argument("--model-config", default=None,
                   help="directory holding a config.json (models/configs/NAME): random weights "
                        "of its shapes with --load-format dummy")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    add_serving_args(p)
    p.add_argument("--duration-cap-s", type=float, default=None,
                   help="issue no arrival later than this into a point")
    p.add_argument("--static-policy", choices=("forced", "restricted"), default="forced")
    p.add_argument("--engine-tbt-slo-ms", type=float, default=None)
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--check-outputs", action="store_true")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="fix the KV pool (duet modes otherwise get a smaller one: they reserve "
                        "memory for the workers)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None)
    p.add_argument("--scan-unroll", type=int, default=None)
    p.add_argument("--device-profile", default=None)
    p.add_argument("--no-online-correction", action="store_true",
                   help="duet mode without the online roofline correction (EngineConfig."
                        "duet_online_correction), to measure what the correction does")
    p.add_argument("--carry-stream", action="store_true",
                   help="split iterations end with their chunk (EngineConfig.duet_carry_stream)")
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--compile-threads", type=int, default=None,
                   help="EngineConfig.compile_threads (the engine's and its workers' start-up)")
    p.add_argument("--worker-timeout-s", type=float, default=1800.0)
    p.add_argument("--in-process", action="store_true",
                   help="run every mode in this process (CPU runs and tests; on a GPU a duet or "
                        "static engine must be the first engine of its process)")
    p.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                   help="exempt the start-up heap from garbage collection once the engine is "
                        "up, as the server does (gc_pauses.freeze_startup_heap)")
    p.add_argument("--save-requests", action="store_true",
                   help="also write requests.json: every request's lengths, arrival and token times")
    p.add_argument("--out", required=True)
    p.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return check_serving_args(p, p.parse_args(argv))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def run_child(argv: list[str], mode: str, out: Path) -> dict[str, Any]:
    path = out / f"mode-{mode}.json"
    if path.exists():
        path.unlink()
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child-mode", mode,
           "--child-out", str(path)]
    rc = subprocess.run(cmd).returncode
    if rc != 0 or not path.exists():
        return {"mode": mode, "error": f"child process exited with status {rc}"}
    result = json.loads(path.read_text())
    path.unlink()  # merged into results.json
    return result


def same_workload(modes: dict[str, Any]) -> bool:
    """Every mode that ran saw the same workload at every point (the points' digests)."""
    digests = {tuple(p["workload"] for p in r.get("points", [])) for r in modes.values()
               if "error" not in r}
    return len(digests) <= 1


def merge(paths: list[str], out: Path) -> dict[str, Any]:
    """One report from sweeps of the same workload run apart (each run holding some of the
    modes): the modes of each, in order; the first report's header and args,
    with the modes' commands kept per report."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(reports[0], modes={}, merged_from=[r["command"] for r in reports])
    for r in reports:
        if r["args"]["qps"] != reports[0]["args"]["qps"]:
            raise SystemExit(f"cannot merge sweeps of different QPS points: {paths}")
        merged["modes"].update(r["modes"])
    requests = {}
    for p in paths:
        if (Path(p).parent / "requests.json").exists():
            requests.update(json.loads((Path(p).parent / "requests.json").read_text()))
    merged["args"] = dict(merged["args"], modes=",".join(merged["modes"]))
    merged["same_workload"] = same_workload(merged["modes"])
    out.mkdir(parents=True, exist_ok=True)
    if requests:
        (out / "requests.json").write_text(json.dumps(requests))
    merged["plots"] = plot(merged, out)
    save(merged, out)
    return merged


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":  # bench_duet.py merge OUT_DIR A/results.json B/results.json
        print(markdown(merge(argv[2:], Path(argv[1]))))
        return 0
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child_mode:
        result = _jsonable(run_mode(args, args.child_mode))
        Path(args.child_out).write_text(json.dumps(result, indent=1))
        return 0
    report: dict[str, Any] = {
        "model": args.model_config or args.model, "load_format": args.load_format,
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "tools/bench_duet.py", *argv]),
        "args": {k: v for k, v in vars(args).items() if k not in ("child_mode", "child_out")},
        "engine_tbt_slo_ms": engine_slo_ms(args), "modes": {}}
    requests: dict[str, Any] = {}
    for mode in args.mode_list:
        if args.in_process:
            try:
                result = _jsonable(run_mode(args, mode))
            except Exception as e:  # keep the other modes' results
                log(f"[{mode}] failed: {type(e).__name__}: {e}")
                result = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
        else:
            result = run_child(argv, mode, out)
        rows = {f"{p['qps']:g}": p.pop("requests") for p in result.get("points", []) if "requests" in p}
        if rows:
            requests[mode] = rows
            (out / "requests.json").write_text(json.dumps(requests))
        report["modes"][mode] = result
        if not report.get("device"):
            report["device"] = result.get("device")
        save(report, out)  # a sweep cut short keeps what it measured
    report["same_workload"] = same_workload(report["modes"])
    status = 0
    if args.check_outputs:
        report["check_outputs"] = compare_checks({m: r.get("check") for m, r in report["modes"].items()})
        if report["check_outputs"].get("identical") is False:
            log(f"OUTPUT CHECK FAILED: {report['check_outputs']['mismatches']}")
            status = 1
    if any("error" in r for r in report["modes"].values()):
        status = 1
    report["plots"] = plot(report, out)
    save(report, out)
    print(markdown(report))
    return status


def save(report: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(_jsonable(report), indent=1))
    (out / "results.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
