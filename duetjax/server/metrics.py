"""Prometheus metrics for ``GET /metrics``, named like vLLM's where a counterpart exists.

Latencies come from the engine's own timestamps (``RequestMetrics``), measured from the moment
the server received the request. Engine state (running / waiting requests, KV usage, prefix
cache hit rate, preemptions, mode and SM split) is read from the snapshot the engine thread
publishes, at scrape time, so scraping never touches the Engine. Every HTTP response is
counted by route and status, error answers included (``app._CountRequests``).
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily,
                                   Metric)
from prometheus_client.registry import Collector

from ..async_engine import ServingEngine
from ..data_parallel.router import RouterSnapshot
from ..gc_pauses import gc_pauses
from ..outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)

PREFIX = "duetjax"


class _EngineCollector(Collector):
    def __init__(self, engine: ServingEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.stats
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            family.add_metric([self.model_name], value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests queued in the engine, not yet running.",
                    stats.num_waiting)
        yield gauge("num_requests_in_flight", "Requests admitted by the server and not finished.",
                    self.engine.num_in_flight)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache pages in use (0..1).",
                    stats.kv_cache_usage)
        yield gauge("kv_cache_free_pages", "KV cache pages free (cached prefixes included).",
                    stats.num_free_pages)
        yield gauge("kv_cache_pages", "KV cache pages in the pool.", stats.num_pages)
        yield gauge("prefix_cache_hit_rate",
                    "Prompt tokens served from the prefix cache / prompt tokens looked up.",
                    stats.prefix_cache_hit_rate)
        yield gauge("engine_steps", "Engine scheduling iterations so far.", stats.num_steps)
        yield gauge("token_budget", "Token budget of the last iteration with prefill work "
                    "(chosen per iteration to fit --tbt-slo-ms when it is set).", stats.token_budget)
        yield gauge("mixed_step_correction", "Measured / predicted time of the mixed steps whose "
                    "token budget the roofline chose, as its online correction has learned it.",
                    stats.mixed_step_correction)
        preemptions = CounterMetricFamily(
            f"{PREFIX}_preemptions", "Requests sent back to the queue for lack of KV pages (they "
            "are recomputed later).", labels=labels)
        preemptions.add_metric([self.model_name], stats.num_preemptions)
        yield preemptions
        pauses = gc_pauses()
        yield gauge("gc_pause_seconds_total",
                    "Time this process spent in Python's garbage collector.", pauses.seconds)
        yield gauge("gc_longest_pause_seconds", "The longest single garbage collection.",
                    pauses.longest_seconds)
        mode = InfoMetricFamily(f"{PREFIX}_mode", "Execution mode of the engine.",
                                labels=labels)
        mode.add_metric([self.model_name], {"mode": stats.mode})
        yield mode
        split = GaugeMetricFamily(f"{PREFIX}_sm_share",
                                  "Share of the GPU's SMs each phase ran on in the last step.",
                                  labels=labels + ["phase"])
        split.add_metric([self.model_name, "prefill"], stats.sm_share[0])
        split.add_metric([self.model_name, "decode"], stats.sm_share[1])
        yield split
        yield gauge("duet_split_iterations", "Iterations run split on a prefill/decode worker pair.",
                    stats.split_iterations)
        yield gauge("duet_decode_steps", "Decode steps per split iteration in the last decision (k).",
                    stats.decode_steps)
        yield gauge("duet_predicted_iteration_ms", "Roofline time of the last split iteration.",
                    stats.predicted_ms)
        yield gauge("duet_measured_iteration_ms", "Measured time of the last split iteration.",
                    stats.measured_ms)
        yield gauge("duet_worker_failures", "Duet worker processes lost (and restarted).",
                    stats.worker_failures)
        routing = getattr(self.engine, "routing", None)  # (a DataParallelEngine's replicas)
        if routing is not None:
            yield from self._replicas(routing)

    def _replicas(self, routing: RouterSnapshot) -> Iterable[Metric]:
        labels = ["model_name", "replica"]
        in_flight = GaugeMetricFamily(f"{PREFIX}_replica_num_requests_in_flight",
                                      "Requests routed to each replica and not finished.",
                                      labels=labels)
        up = GaugeMetricFamily(f"{PREFIX}_replica_up",
                               "1 while the replica's process serves, 0 once it died.",
                               labels=labels)
        for replica, (requests, alive) in enumerate(zip(routing.num_requests, routing.alive)):
            in_flight.add_metric([self.model_name, str(replica)], requests)
            up.add_metric([self.model_name, str(replica)], float(alive))
        yield in_flight
        yield up
        decisions = CounterMetricFamily(
            f"{PREFIX}_routing_decisions", "Requests routed to the replica that served the "
            "longest prefix of their prompt (cache) or to the least loaded one (load).",
            labels=["model_name", "reason"])
        for reason, count in routing.decisions.items():
            decisions.add_metric([self.model_name, reason], count)
        yield decisions


class ServerMetrics:
    """The server's metric registry (one per app, so several apps can live in one process)."""

    def __init__(self, engine: ServingEngine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status.",
                                     ["route", "status"], registry=reg)
        self.request_success = Counter(f"{PREFIX}_request_success",
                                       "Generation requests finished, by finish reason.",
                                       labels + ["finished_reason"], registry=reg)
        self.requests_rejected = Counter(f"{PREFIX}_requests_rejected",
                                         "Requests refused before generation, by reason.",
                                         labels + ["reason"], registry=reg)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=reg)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.",
                                         labels, registry=reg)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from request arrival to its first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request.", labels,
                             buckets=LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                             "Time from request arrival to its last token.", labels,
                             buckets=E2E_BUCKETS, registry=reg)
        reg.register(_EngineCollector(engine, model_name))

    def observe(self, output: RequestOutput | None, arrival_time: float,
                failed: bool = False) -> None:
        """Records a request that finished, failed or was aborted: ``output`` is the last one it
        got (None: none yet), ``arrival_time`` when the server received it (time.time())."""
        name = self.model_name
        if output is None:
            self.request_success.labels(name, "error" if failed else "abort").inc()
            return
        m = output.metrics
        completion = output.outputs[0]
        reason = "error" if failed else completion.finish_reason or "abort"
        self.request_success.labels(name, reason).inc()
        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(name).inc(len(completion.token_ids))
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, m.first_token_time - arrival_time))
        itl = self.itl.labels(name)
        for before, after in zip(m.token_times, m.token_times[1:]):
            itl.observe(after - before)
        end = m.finished_time or (m.token_times[-1] if m.token_times else None)
        if end is not None:
            self.e2e.labels(name).observe(max(0.0, end - arrival_time))

    def reject(self, reason: str) -> None:
        self.requests_rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
