"""DuetServe's split iterations: the prefill chunks run on one worker process while another
decodes everyone else, streaming tokens (``duet.py`` decides when, and on which pair).

A split iteration runs across several ``Engine.step`` calls: ``start`` launches its chunk (and
the decode stream's first dispatch), then ``advance`` streams decodes until the chunk ends.
The workers' steps are ``RemoteInFlight``s, read by the same ``OutputProcessor`` as the local
pipeline's. A worker that dies loses only its step: its requests are recomputed.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import time
from typing import Any

from ..config import EngineConfig
from ..core.executor import LocalExecutor, fail_requests_without_inputs
from ..core.output_processor import OutputProcessor
from ..core.scheduler import SchedulerOutput, split_batch
from ..loop_stats import LoopStats
from ..outputs import RequestOutput
from .split_mode import Duet, final_dispatch_steps
from .worker_client import RemoteInFlight, WorkerClient, WorkerDied

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SplitIteration:
    """A split iteration in progress (its prefill chunk runs across ``Engine.step`` calls)."""

    decision: Any
    pair: tuple[Any, Any]
    """(prefill worker, decode worker)."""
    launched_at: float
    stream_k: int
    """Decode steps per decode-worker dispatch while the chunk runs."""
    stream_step_seconds: float = 0.0
    """Predicted time of one of those decode steps."""
    prefill: Any = None
    """The chunk's RemoteInFlight (None: no chunk, or its worker died)."""
    request_ids: set[str] = dataclasses.field(default_factory=set)
    """Requests in the chunk: the decode stream leaves them alone."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    """Worker-side seconds: the chunk, and the decode dispatches that finished meanwhile."""
    decode_steps: int = 0
    """Decode steps those dispatches ran."""
    decode_dispatches: int = 0
    prefill_tokens: int = 0
    """Tokens of the chunks."""
    decode_batch: int = 0
    """Requests of the first decode dispatch."""

class SplitExecutor:
    """Runs split iterations on ``duet``'s worker pairs, beside the engine's local pipeline
    (``local``), which it drains before another process continues its requests."""

    def __init__(self, duet: Duet, outputs: OutputProcessor, local: LocalExecutor,
                 config: EngineConfig, stats: LoopStats):
        self.duet = duet
        self.outputs = outputs
        self.scheduler = outputs.scheduler
        self.local = local
        self.config = config
        self.stats = stats
        self.iteration: SplitIteration | None = None
        """The split iteration whose prefill chunk is running, if any."""
        self.stream: RemoteInFlight | None = None
        """The decode stream's dispatch running on a decode worker, if any. It may outlive its
        split iteration: the next split's chunk launches without waiting for it."""
        self.deferred_aborts: list[str] = []
        """Aborted requests whose pages a worker step still writes (freed once it ends)."""

    @property
    def busy(self) -> bool:
        """A worker step runs (a split iteration's chunk, or a decode dispatch)."""
        return self.iteration is not None or self.stream is not None

    def decide(self) -> tuple[Any, tuple[WorkerClient, WorkerClient] | None]:
        """The controller's decision for the next iteration (None: nothing to judge) and, when
        it splits, its worker pair."""
        prefill, decode = self.scheduler.preview()
        # (nothing to split; or a constrained request waits or runs, or a request with
        # prompt logprobs waits or prefills: workers take no token masks and compute no
        # prompt logprobs, so iterations stay aggregated meanwhile)
        if (prefill and decode and not self.scheduler.num_constrained
                and not self.scheduler.num_prompt_logprobs):
            return self.duet.decide(prefill, decode, self.scheduler.queue_to_pace(time.time()))
        return None, None

    def leave_stream(self, pair: tuple[WorkerClient, WorkerClient] | None) -> list[RequestOutput]:
        """Before an iteration on ``pair`` (None: aggregated): a decode dispatch running on
        another decode worker is read first (its tokens must be on the host)."""
        if self.stream is None or (pair is not None and self.stream.client is pair[1]):
            return []
        before = time.perf_counter()
        outputs = self._finish_stream()
        self.duet.stats.switch_seconds.append(time.perf_counter() - before)
        return outputs

    def start(self, decision, pair) -> list[RequestOutput]:
        """Starts a DuetServe split iteration: the prefill chunks go to the S_p worker, whose
        step then runs across ``step`` calls, while the S_d worker decodes everyone else, a few
        steps per dispatch, streaming tokens (``advance``). The aggregated pipeline is
        drained first (its in-flight tokens must be on the host before another process
        continues those requests); a decode dispatch carried over from the previous split
        iteration (``duet_carry_stream``) keeps running, and the stream goes on after it. A
        worker that dies loses only its step: its requests are recomputed."""
        started = time.perf_counter()
        outputs: list[RequestOutput] = []
        waited = 0.0
        in_flight = self.local.take_in_flight()
        if in_flight is not None:
            drained, waited = self.outputs.process(in_flight)
            outputs += drained
            self.duet.stats.switch_seconds.append(time.perf_counter() - started)
        # Every decode dispatch of the split, the first too, runs the stream's k: the tokens
        # of a dispatch reach the client together, so k bounds the gaps it sees.
        stream_k = self.duet.stream_steps(decision)
        carried = self.stream
        # With a decode dispatch still running, only the chunks are scheduled now (and nothing
        # is preempted: a victim's pages could still be written); the decodes follow it.
        batch = self.scheduler.schedule(stream_k, split=True, chunks_only=carried is not None)
        self.local.admit(batch)  # (slot tables before a worker's step reads them)
        prefill_part, decode_part = split_batch(batch)
        split = SplitIteration(
            decision, pair, launched_at=time.perf_counter(), stream_k=stream_k,
            stream_step_seconds=self.duet.stream_step_seconds(decision, stream_k),
            prefill_tokens=prefill_part.num_tokens,
            decode_batch=len((carried.batch if carried else decode_part).scheduled))
        if prefill_part.scheduled:
            split.prefill = self._launch_on(pair[0], prefill_part)
            if split.prefill is not None:
                split.request_ids = {item.request.request_id for item in prefill_part.scheduled}
        self.iteration = split
        self.stats.record(time.perf_counter() - started - waited, 0.0, waited, 0)
        if carried is None:
            outputs += self._stream_decodes(decode_part)
        return outputs

    def advance(self) -> list[RequestOutput]:
        """One ``step`` while a split's prefill chunk runs: the decode stream's next dispatch
        (``_stream_decodes``), or the results of whichever of the chunk and the stream's
        dispatch ends first. The split iteration ends with its chunk when ``duet_carry_stream``
        (the stream's dispatch then running carries over), else with a dispatch sized to end
        just after the chunk."""
        split = self.iteration
        carry = self.config.duet_carry_stream
        if split.prefill is not None and not split.prefill.done():
            if self.stream is None:
                steps = split.stream_k
                if not carry:
                    remaining = (split.decision.t_prefill or 0.0) - (time.perf_counter() - split.launched_at)
                    steps = final_dispatch_steps(remaining, split.stream_step_seconds, steps)
                part = self.scheduler.schedule_decodes(steps, split.request_ids)
                if part.scheduled:
                    outputs = self._stream_decodes(part)
                    if self.stream is None:  # (it ran to the end already, or was not launched)
                        return outputs
            if self.stream is not None:
                if self._wait_for_either(split.prefill, self.stream) is self.stream:
                    return self._finish_stream()
        outputs: list[RequestOutput] = []
        before = time.perf_counter()
        if split.prefill is not None:
            try:
                outputs, _ = self.outputs.process(split.prefill)
                split.prefill_seconds = split.prefill.worker_seconds or 0.0
            except WorkerDied as e:
                self.duet.worker_failed(split.pair[0], e)
                self._requeue(split.prefill.batch)
        self.stats.record(0.0, 0.0, time.perf_counter() - before, 0)
        if self.stream is not None:
            if carry and split.prefill is not None:
                self.duet.stats.carried_dispatches += 1
            else:  # (without a chunk, nothing else would ever wait for it)
                outputs += self._finish_stream()
        self.iteration = None
        self.duet.record_split(split.decision, time.perf_counter() - split.launched_at,
                               (split.prefill_seconds, split.decode_seconds), split.decode_steps,
                               split.stream_k, split.decode_dispatches, split.prefill_tokens,
                               split.decode_batch)
        self._run_deferred_aborts()
        return outputs

    @staticmethod
    def _wait_for_either(chunk: RemoteInFlight, stream: RemoteInFlight) -> RemoteInFlight:
        """Blocks until the chunk's or the stream dispatch's reply is in (or its worker is
        gone); returns which, the chunk when both."""
        while True:
            if chunk.done():
                return chunk
            if stream.done():
                return stream
            conns = [c for c in (chunk.client.conn, stream.client.conn) if c is not None]
            multiprocessing.connection.wait(conns, timeout=0.1)

    def _stream_decodes(self, part: SchedulerOutput) -> list[RequestOutput]:
        """Launches a decode-stream dispatch. Without ``duet_carry_stream`` it also waits for
        it, as the split path every committed GPU figure measured did; with it, the dispatch
        runs beside the chunk (``advance`` waits for either)."""
        self._launch_stream(part)
        if self.stream is None or self.config.duet_carry_stream:
            return []
        return self._finish_stream()

    def _launch_stream(self, part: SchedulerOutput) -> None:
        """Sends a decode dispatch to the split's S_d worker (its results: ``_finish_stream``)."""
        if not part.scheduled:
            return
        started = time.perf_counter()
        launched = self._launch_on(self.iteration.pair[1], part)
        if launched is None:
            return
        self.stream = launched
        self.duet.stats.stream_dispatches += 1
        self.stats.record(time.perf_counter() - started, 0.0, 0.0, part.num_steps)

    def _launch_on(self, worker: WorkerClient, part: SchedulerOutput) -> RemoteInFlight | None:
        """Sends ``part`` to ``worker`` and reserves its outputs; its results come back as an
        ``InFlight``, as the local runner's do. None: not launched, because the worker is gone
        (it restarts, and the requests go back to the queue), or because some of its requests'
        inputs cannot be built (those fail alone; the others, not committed, are scheduled
        again, as in ``LocalExecutor.launch``)."""
        try:
            launched = worker.dispatch(part, use_previous=False)
        except WorkerDied as e:
            self.duet.worker_failed(worker, e)
            self._requeue(part)
            return None
        except Exception as error:
            if not fail_requests_without_inputs(part, self.outputs, worker.step_inputs):
                raise  # not one request's doing: the engine fails
            log.warning("a step of worker %s was not launched: %r (its requests are scheduled "
                        "again)", worker.name, error)
            return None
        self.outputs.reserve(part, launched)
        self.scheduler.commit(part)
        return launched

    def _finish_stream(self) -> list[RequestOutput]:
        """The decode stream's dispatch in flight: waits for it and applies its tokens; its
        worker time counts in the split iteration running now, if any."""
        stream, self.stream = self.stream, None
        started = time.perf_counter()
        try:
            outputs, waited = self.outputs.process(stream)
        except WorkerDied as e:
            self.duet.worker_failed(stream.client, e)
            self._requeue(stream.batch)
            outputs, waited = [], time.perf_counter() - started
        else:
            split = self.iteration
            if split is not None:
                split.decode_seconds += stream.worker_seconds or 0.0
                split.decode_steps += stream.batch.num_steps
                split.decode_dispatches += 1
        self.stats.record(time.perf_counter() - started - waited, 0.0, waited, 0)
        self._run_deferred_aborts()
        return outputs

    def _requeue(self, batch: SchedulerOutput) -> None:
        """Sends the requests of a lost step back to the queue: their tokens still on the device
        are dropped and their KV is recomputed, so the output stays complete and unduplicated."""
        for item in batch.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.output_token_ids = request.resolved_output_ids
            self.scheduler.requeue(request)
            self.duet.stats.requeued_requests += 1

    def defer_abort(self, request_id: str) -> bool:
        """Whether a worker's running step (the chunk or the decode stream) writes the
        request's KV pages: its abort then waits until that step ends."""
        if self.holds(request_id):
            self.deferred_aborts.append(request_id)
            return True
        return False

    def holds(self, request_id: str) -> bool:
        """Whether a duet worker's running step (the chunk or the decode stream) holds it."""
        if self.iteration is not None and request_id in self.iteration.request_ids:
            return True
        return self.stream is not None and any(
            item.request.request_id == request_id for item in self.stream.batch.scheduled)

    def _run_deferred_aborts(self) -> None:
        waiting, self.deferred_aborts = self.deferred_aborts, []
        for request_id in waiting:
            if not self.defer_abort(request_id):  # (another worker step may hold it)
                self.outputs.abort(request_id)
