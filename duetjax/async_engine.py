"""``AsyncEngine``: the synchronous ``Engine`` behind an asyncio interface.

The Engine is single-threaded and not thread-safe, so one background thread owns it: it takes
commands (add, abort) from a locked inbox, runs ``Engine.step()`` while there is work, and
sleeps on a condition variable when there is none (no busy polling). Outputs go back to the
caller's event loop with ``loop.call_soon_threadsafe``. Admission is bounded: past
``max_num_seqs + max_queued_requests`` requests in flight, ``add_request`` raises
``QueueFullError`` at once instead of letting the queue (and memory) grow without limit.

A request the Engine fails alone (finish reason "error": something in the work done for it
raised) fails only its stream, with ``RequestFailedError``; the thread serves on. An exception
out of ``Engine.step`` itself (a device failure) stops the thread: every stream then fails with
``EngineDeadError`` and ``failure`` says why.

Nothing here knows about HTTP, so notebooks and tools can use it directly::

    engine = AsyncEngine(Engine())
    async for output in engine.generate("Hello", SamplingParams(max_tokens=8)):
        print(output.outputs[0].text)
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from .engine import Engine, Prompt
from .engine_stats import EngineStats
from .outputs import RequestOutput
from .sampling_defaults import SamplingDefaults
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests in flight; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDrainingError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an error; every request fails until a restart."""


class RequestFailedError(RuntimeError):
    """The engine failed this request alone (an error in the work done for it); the engine
    and every other request go on."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (shutdown past its drain timeout) before it finished."""


class RequestStream:
    """The outputs of one request, as an async iterator on the caller's event loop.

    Every ``RequestOutput`` holds the full text and tokens so far, so a slow consumer only
    needs the newest one: the stream keeps just that (memory stays O(1) per request however
    far the consumer lags) and the last one it yields has ``finished`` set.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._done = False
        self._wakeup = asyncio.Event()
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False

    @property
    def failed(self) -> bool:
        """The request failed in the engine (``RequestFailedError``): not an abort."""
        return isinstance(self._error, RequestFailedError)

    # Called from the thread that serves the engine: they hand over to the stream's loop.
    def deliver(self, output: RequestOutput) -> None:
        """The request's newest output."""
        self._call(self._put, output)

    def fail(self, error: BaseException) -> None:
        """Ends the stream with ``error`` (the consumer's next step raises it)."""
        self._call(self._fail, error)

    def resolve(self, error: BaseException | None) -> None:
        """Answers ``accepted``: the request was queued (None) or refused (``error``)."""
        self._call(_resolve, self.accepted, error)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody reads this stream any more
            pass

    # Called on the event loop.
    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        self._wakeup.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wakeup.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                output, self._latest = self._latest, None
                if output.finished:
                    self._done = self.finished = True
                return output
            if self._done:
                raise StopAsyncIteration
            if self._error is not None:
                self._done = True
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()


class ServingEngine:
    """What the HTTP server (``server.create_app``) serves: ``AsyncEngine`` (one Engine on a
    thread) or ``data_parallel.DataParallelEngine`` (engine replicas in processes). Both have
    ``add_request``, ``abort``, ``begin_drain``, ``shutdown``, ``close`` and the properties
    the server reads; ``generate`` is built on the first two. The model's facts come from
    ``_model``: the Engine itself, or what a replica reported of its own (``ReplicaInfo``)."""

    _model: Any

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None when the checkpoint ships none). Its ``encode`` and
        ``apply_chat_template`` are safe to call from other threads."""
        return self._model.tokenizer

    @property
    def model_path(self) -> Path:
        """Where the model was loaded from (a directory or a GGUF file)."""
        return self._model.model_path

    @property
    def max_model_len(self) -> int:
        return self._model.max_model_len

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The model's default sampling (its generation config's settings)."""
        return self._model.sampling_defaults

    @property
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size)."""
        return self._model.vocab_size

    async def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (full text so far) until it finishes; aborts the
        request (freeing its KV pages) if the caller stops iterating early."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(stream.request_id)


class AsyncEngine(ServingEngine):
    """Runs an ``Engine`` on its own thread and serves requests to asyncio code.

    max_queued_requests: requests allowed to wait beyond the ``max_num_seqs`` that can run at
    once; one more raises ``QueueFullError``.
    """

    def __init__(self, engine: Engine, max_queued_requests: int = 256):
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.engine = self._model = engine
        self.max_queued_requests = max_queued_requests
        self.capacity = engine.config.max_num_seqs + max_queued_requests
        """Most requests in flight (running + waiting)."""
        self._cv = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._num_in_flight = 0  # guarded by _cv
        self._draining = False
        self._stopping = False
        self._error: BaseException | None = None
        self.stats: EngineStats = engine.stats()
        """The engine's state after its last step, published by the engine thread so other
        threads (e.g. a metrics scrape) never touch the Engine itself."""
        self._thread = threading.Thread(target=self._run, name="duetjax-engine", daemon=True)
        self._thread.start()

    # ---- what the engine is -----------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def is_healthy(self) -> bool:
        """The engine thread is alive and has not failed."""
        return self._error is None and self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving (None while it is healthy)."""
        if self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        return None

    # ---- requests ---------------------------------------------------------------------------

    async def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Queues a request and returns its output stream once the engine accepted it.

        Raises QueueFullError (no room), EngineDrainingError (shutting down), EngineDeadError,
        or the Engine's own ValueError / TypeError for a bad prompt or parameters, all before
        anything was generated, so a server can still answer with an error status.
        """
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        stream = RequestStream(request_id, asyncio.get_running_loop())
        params = params or self.sampling_defaults.params()
        with self._cv:
            self._check_admission()
            self._num_in_flight += 1
            self._inbox.append(lambda: self._add(stream, prompt, params))
            self._cv.notify()
        try:
            await stream.accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # queued behind the add, so it always finds the request
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV pages; safe from any thread, unknown ids ignored."""
        with self._cv:
            self._inbox.append(lambda: self._abort(request_id, None))
            self._cv.notify()

    def _check_admission(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error!r}")
        if self._draining or self._stopping:
            raise EngineDrainingError("the server is shutting down and takes no new requests")
        if self._num_in_flight >= self.capacity:
            raise QueueFullError(
                f"{self._num_in_flight} requests are in flight, the most this server queues "
                f"(max_num_seqs {self.engine.config.max_num_seqs} + max_queued_requests "
                f"{self.max_queued_requests}); retry later")

    # ---- shutdown ---------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuses new requests from now on; requests in flight go on. Safe from a signal
        handler (it only sets a flag)."""
        self._draining = True

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuses new requests, lets those in flight finish for up to ``drain_timeout``
        seconds, aborts the rest (their streams raise RequestAbortedError), and stops the
        engine thread."""
        self.begin_drain()
        deadline = time.monotonic() + drain_timeout
        while self._num_in_flight and time.monotonic() < deadline and self.is_healthy:
            await asyncio.sleep(0.05)
        if self._num_in_flight:
            log.warning("aborting %d requests still running after the %.1fs drain timeout",
                        self._num_in_flight, drain_timeout)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stops the engine thread now, aborting whatever is in flight (blocking)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._stopping or engine.has_unfinished_requests()):
                        self._cv.wait()
                    commands, self._inbox = self._inbox, []
                    stopping = self._stopping
                for command in commands:
                    command()
                if stopping:
                    break
                if engine.has_unfinished_requests():
                    for output in engine.step():
                        self._deliver(output)
                self.stats = engine.stats()
        except BaseException as error:  # noqa: BLE001 - any failure must reach the callers
            log.exception("the engine thread failed")
            self._error = error
            failure: BaseException = EngineDeadError(f"the engine failed: {error!r}")
        else:
            failure = RequestAbortedError("the request was aborted because the server shut down")
        with self._cv:
            self._draining = True
            commands, self._inbox = self._inbox, []
        for command in commands:  # answer adds that raced with the shutdown
            command()
        for request_id in list(self._streams):
            self._abort(request_id, failure)
        self.stats = engine.stats()

    def _add(self, stream: RequestStream, prompt: Prompt, params: SamplingParams) -> None:
        if self._stopping or self._error is not None:
            self._release()
            stream.resolve(EngineDrainingError("the server is shutting down and takes no new "
                                               "requests"))
            return
        try:
            self.engine.add_request(prompt, params, stream.request_id)
        except Exception as error:  # ValueError / TypeError name what to fix
            self._release()
            stream.resolve(error)
            return
        self._streams[stream.request_id] = stream
        stream.resolve(None)

    def _abort(self, request_id: str, error: BaseException | None) -> None:
        self.engine.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._release()
            if error is not None:
                stream.fail(error)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
            self._release()
        deliver_output(stream, output)

    def _release(self) -> None:
        with self._cv:
            self._num_in_flight -= 1


def deliver_output(stream: RequestStream, output: RequestOutput) -> None:
    """Hands ``output`` to its stream from the engine's thread; one the engine failed alone
    (finish reason "error") fails the stream with ``RequestFailedError``."""
    if output.error is not None:
        stream.fail(RequestFailedError(f"the request failed in the engine: {output.error}"))
    else:
        stream.deliver(output)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
