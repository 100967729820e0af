"""Where a scheduled batch runs. Every executor launches a step and hands back an ``InFlight``
whose results are read later (``OutputProcessor.process``): ``LocalExecutor`` on this
process's ``ModelRunner``; in duet mode the worker processes too, whose ``WorkerClient.dispatch``
returns a ``RemoteInFlight`` (``split_executor.py``).

The local executor is pipelined: step N+1 is launched before step N's tokens are read (they
feed step N+1 on the device), so it keeps the one step in flight.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from ..config import EngineConfig
from ..structured_outputs import all_tokens_mask, fill_token_mask
from .model_runner import InFlight, ModelRunner
from .output_processor import OutputProcessor
from .prompt_logprobs import chunks_of
from .scheduler import SchedulerOutput
from .step_inputs import bucket_for, build_inputs

log = logging.getLogger(__name__)


class LocalExecutor:
    """Launches steps on this process's device, one in flight at a time."""

    def __init__(self, runner: ModelRunner, outputs: OutputProcessor, config: EngineConfig,
                 vocab_size: int, learner: Any = None):
        self.runner = runner
        self.outputs = outputs
        self.scheduler = outputs.scheduler
        self.config = config
        self.vocab_size = vocab_size
        self.learner = learner
        """What learns from the measured step times (``Duet`` or ``TokenBudget``; None: none)."""
        self.in_flight: InFlight | None = None
        """The launched step whose results are not read yet."""
        self._in_flight_predicted: float | None = None
        """The prediction for the step in flight (the controller's or the token budget's)."""
        self._last_results: float | None = None
        """When the previous step's results arrived, while the pipeline stays full."""

    def launch(self, batch: SchedulerOutput) -> InFlight | None:
        """Launches ``batch`` behind the step in flight (whose tokens it reads on the device).
        None: not launched, because nothing is left to run once the requests that failed
        alone are out, or because some of its requests' inputs cannot be built; those fail
        alone, and the others are scheduled again next step."""
        self.admit(batch)
        token_mask = self._token_mask(batch)
        if not batch.scheduled:
            return None
        prompt_chunks = (chunks_of(batch) if self.scheduler.num_prompt_logprobs
                         and batch.continues is None else None)
        try:
            launched = self.runner.dispatch(batch, self.in_flight, token_mask, prompt_chunks)
        except Exception as error:
            if not self._fail_requests_without_inputs(batch):
                raise  # not one request's doing: the engine fails
            log.warning("a step was not launched: %r (its requests are scheduled again)", error)
            return None
        launched.samples_constrained = token_mask is not None
        return launched

    def advance(self, launched: InFlight | None, predicted: float | None) -> None:
        """The step in flight was read: ``launched`` (predicted to take ``predicted`` seconds)
        is in flight now. With the pipeline full, the time since the previous step's results
        is the read step's iteration time, which teaches the roofline correction
        (``correction.py``) when it was predicted."""
        if self.learner is not None:
            now = time.perf_counter()
            if (self.in_flight is not None and self._last_results is not None
                    and self._in_flight_predicted):
                self.learner.observe_aggregated(self._in_flight_predicted, now - self._last_results,
                                                self.in_flight.batch.num_tokens)
            self._last_results = now if self.in_flight is not None and launched is not None else None
            self._in_flight_predicted = predicted
        self.in_flight = launched

    def take_in_flight(self) -> InFlight | None:
        """Empties the pipeline: the step in flight, for the caller to read."""
        in_flight, self.in_flight = self.in_flight, None
        self._last_results = self._in_flight_predicted = None
        return in_flight

    def holds_unfinished(self) -> bool:
        """The step in flight computes tokens of a request that has not ended."""
        return self.in_flight is not None and any(
            not item.request.is_finished for item in self.in_flight.batch.scheduled)

    def admit(self, batch: SchedulerOutput) -> None:
        """Before any step of the requests ``batch`` admitted: fails those whose input batch
        row could not be written (``unadmitted``) and writes the slot tables of those with a
        fresh penalty slot (``slots_to_fill``). A request whose tables cannot be written fails
        alone and leaves the batch."""
        for request, error in batch.unadmitted:
            self.outputs.fail(request, error)
        batch.unadmitted = []
        failed = False
        for request in batch.slots_to_fill:
            try:
                self.runner.fill_slot(request)
            except Exception as error:
                self.outputs.fail(request, error)
                failed = True
        if failed:
            _drop_finished(batch)

    def _token_mask(self, batch: SchedulerOutput) -> np.ndarray | None:
        """The allowed tokens of the batch's rows that sample a constrained token (None when
        there are none): each from its request's grammar state. A request whose grammar
        raises fails alone and leaves the batch."""
        if not self.scheduler.num_constrained:
            return None
        mask, failed = None, False
        for row, item in enumerate(batch.scheduled):
            request = item.request
            if request.matcher is not None and item.completes_sequence:
                if mask is None:
                    mask = all_tokens_mask(len(batch.scheduled), self.vocab_size)
                try:
                    fill_token_mask(request.matcher, mask, row)
                except Exception as error:
                    self.outputs.fail(request, error)
                    failed = True
        if failed:  # (the rows after it move up: the masks again, without it)
            _drop_finished(batch)
            return self._token_mask(batch)
        return mask

    def _fail_requests_without_inputs(self, batch: SchedulerOutput) -> bool:
        """After a dispatch of ``batch`` failed before launching: fails the requests whose step
        inputs cannot be built on their own, and says whether there were any."""
        in_flight = self.in_flight.batch.scheduled if self.in_flight is not None else None
        return fail_requests_without_inputs(batch, self.outputs, lambda alone: build_inputs(
            bucket_for(alone, self.config), alone, self.config.page_size,
            self.runner.max_pages_per_seq, in_flight=in_flight))


def fail_requests_without_inputs(batch: SchedulerOutput, outputs: OutputProcessor,
                                 inputs_of: Callable[[SchedulerOutput], Any]) -> bool:
    """After a dispatch of ``batch`` failed before launching: fails the requests whose step
    inputs (``inputs_of`` a batch of the request alone, as that dispatch builds them) cannot be
    built, and says whether there were any. The others were not committed: the scheduler
    schedules them again."""
    failed = False
    for item in batch.scheduled:
        alone = SchedulerOutput([item], [], batch.num_steps)
        try:
            inputs_of(alone)
        except Exception as error:
            outputs.fail(item.request, error)
            failed = True
    return failed


def _drop_finished(batch: SchedulerOutput) -> None:
    """Takes the requests that ended since ``batch`` was scheduled (they failed) out of it."""
    batch.scheduled = [item for item in batch.scheduled if not item.request.is_finished]
