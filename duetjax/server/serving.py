"""What both generation endpoints share: prompt checks, fan-out of ``n`` choices into engine
requests, merging their streams, streaming text safely, cleanup on disconnect, logprobs.

One HTTP request becomes ``len(prompts) * n`` engine requests (distinct ids; seeds seed+i when a
seed is given). Whatever way the HTTP request ends (finished, client gone, error), ``Fanout``'s
cleanup aborts the engine requests that are still running, which frees their KV pages.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..async_engine import RequestStream, ServingEngine
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .errors import APIError, bad_request, error_response, from_engine_error
from .metrics import ServerMetrics
from .protocol import PromptLogprob, PromptLogprobs, UsageInfo
from .structured import Constraint


@dataclasses.dataclass
class Prompt:
    """A prompt after tokenization."""

    token_ids: list[int]
    text: str | None = None

    def engine_input(self) -> dict[str, Any]:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


@dataclasses.dataclass
class Choice:
    """One engine request behind one choice of the response."""

    index: int
    prompt: Prompt
    stream: RequestStream
    last: RequestOutput | None = None
    sent_chars: int = 0
    """Characters of text already streamed."""
    sent_tokens: int = 0
    """Tokens whose logprobs were already streamed."""
    started: bool = False
    """A chunk (e.g. the role, or the echoed prompt) was already streamed."""
    text_offset: int = 0
    """Characters of token text covered by the logprobs already sent (legacy format)."""


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying JSON."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty")
"""Request fields that, left out (or null), take the model's default (else SamplingParams')."""


class Serving:
    """Turns validated requests into engine requests and engine outputs into choices."""

    def __init__(self, engine: ServingEngine, model_name: str, metrics: ServerMetrics):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics

    # ---- checks -------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{self.model_name}' (see GET /v1/models)",
                           param="model", code="model_not_found")

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer, and the model '{self.model_name}' ships "
                              "none; send the prompt as a list of token ids to /v1/completions")
        return self.tokenizer

    def check_token_ids(self, ids: Iterable[int], param: str) -> None:
        """A 400 naming ``param`` unless every id is in the model's vocabulary (checked before
        any use: decoding, echo, the device)."""
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{param} token id {bad} is outside the vocabulary [0, {vocab})",
                              param=param)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self.require_tokenizer("a text prompt")
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)

    def max_tokens_for(self, prompt: Prompt, requested: int | None, field: str) -> int:
        """The request's max_tokens, checked against the context window. None: the model's
        max_new_tokens (from its generation config) within what the context leaves, or, where
        the model sets none, all of it."""
        limit = self.engine.max_model_len
        prompt_len = len(prompt.token_ids)
        wanted = requested
        if wanted is None:
            room = max(limit - prompt_len, 0)
            model_default = self.engine.sampling_defaults.max_tokens
            wanted = room if model_default is None else min(model_default, room)
        if prompt_len + wanted > limit or prompt_len >= limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens, but the request needs "
                f"{prompt_len + max(wanted, 1)} ({prompt_len} in the prompt, {max(wanted, 1)} in "
                f"{field}); shorten the prompt or lower {field}", param=field)
        return wanted

    def sampling_params(self, request: Any, max_tokens: int, logprobs: int | None,
                        constraint: Constraint | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's sampling: the settings it sends, over the model's defaults (as vLLM's
        server with --generation-config auto); OpenAI's defaults (temperature 1, ...) apply
        only where neither says."""
        self.check_token_ids(request.stop_token_ids or (), "stop_token_ids")
        self.check_token_ids(request.token_logit_bias() or (), "logit_bias")
        sent = {name: getattr(request, name) for name in MODEL_DEFAULTED
                if getattr(request, name) is not None}
        try:
            return self.engine.sampling_defaults.params(
                **sent,
                logit_bias=request.token_logit_bias(),
                max_tokens=max_tokens,
                min_tokens=min(request.min_tokens, max_tokens),
                stop=[request.stop] if isinstance(request.stop, str) else (request.stop or ()),
                stop_token_ids=request.stop_token_ids or (),
                ignore_eos=request.ignore_eos,
                seed=request.seed,
                skip_special_tokens=request.skip_special_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                structured_outputs=None if constraint is None else constraint.params)
        except ValueError as error:
            raise bad_request(str(error)) from None

    # ---- running requests ---------------------------------------------------------------------

    async def start(self, prompts: list[Prompt], params: SamplingParams, n: int,
                    request_id: str, constraint: Constraint | None = None) -> list[Choice]:
        """Adds ``n`` engine requests per prompt; all or nothing (a failure aborts the rest).
        ``constraint``: the request's structured output, whose field an error that the engine
        raises about it (a schema, regex or grammar that does not compile) names as param."""
        choices: list[Choice] = []
        try:
            for p, prompt in enumerate(prompts):
                for i in range(n):
                    seeded = params if params.seed is None else dataclasses.replace(
                        params, seed=(params.seed + i) % 2**32)
                    stream = await self.engine.add_request(prompt.engine_input(), seeded,
                                                           f"{request_id}-{p}-{i}")
                    choices.append(Choice(index=p * n + i, prompt=prompt, stream=stream))
        except BaseException as error:
            self.finish(choices, None)
            if isinstance(error, Exception):
                api_error = from_engine_error(error)
                if (constraint is not None and api_error.status == 400
                        and "structured output" in api_error.message):
                    api_error.param = constraint.field
                self.metrics.reject({429: "queue_full", 503: "draining"}.get(
                    api_error.status, "invalid" if api_error.status < 500 else "error"))
                raise api_error from None
            raise
        return choices

    async def outputs(self, choices: list[Choice]) -> AsyncIterator[Choice]:
        """Yields a choice each time its engine request has new output (``choice.last``).

        Each stream keeps only its newest output, so a slow reader sees coalesced progress
        rather than an unbounded backlog.
        """
        if len(choices) == 1:
            choice = choices[0]
            async for output in choice.stream:
                choice.last = output
                yield choice
            return
        ready: dict[int, Choice] = {}
        failures: list[BaseException] = []
        remaining = len(choices)
        wakeup = asyncio.Event()

        async def pump(choice: Choice) -> None:
            nonlocal remaining
            try:
                async for output in choice.stream:
                    choice.last = output
                    ready[choice.index] = choice
                    wakeup.set()
            except Exception as error:  # noqa: BLE001 - handed to the reader
                failures.append(error)
            finally:
                remaining -= 1
                wakeup.set()

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            while True:
                while ready:
                    yield ready.pop(next(iter(ready)))
                if failures:
                    raise failures[0]
                if not remaining:
                    return
                wakeup.clear()
                await wakeup.wait()
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self, choices: list[Choice], request: Request) -> None:
        """Runs every choice to the end; raises ClientDisconnected if the client leaves first."""

        async def run() -> None:
            async for _ in self.outputs(choices):
                pass

        work = asyncio.create_task(run())
        watcher = asyncio.create_task(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
        if work not in done:
            raise ClientDisconnected
        error = work.exception()
        if error is not None:
            raise from_engine_error(error) from error

    async def respond(self, choices: list[Choice], http: Request, arrival: float, stream: bool,
                      chunks: Callable[[], AsyncIterator[str]], response: Callable[[], Any]) -> Any:
        """An SSE stream of ``chunks()``, or, once every choice has finished, ``response()``;
        a client that leaves first gets its requests aborted."""
        if stream:
            return StreamingResponse(chunks(), media_type="text/event-stream")
        try:
            await self.collect(choices, http)
        except ClientDisconnected:
            return error_response(APIError(499, "the client closed the connection"))
        finally:
            self.finish(choices, arrival)
        return response()

    def finish(self, choices: list[Choice], arrival_time: float | None) -> None:
        """Aborts what is still running (freeing its KV pages) and records metrics."""
        for choice in choices:
            if not choice.stream.finished:
                self.engine.abort(choice.stream.request_id)
            if arrival_time is not None:
                self.metrics.observe(choice.last, arrival_time, failed=choice.stream.failed)

    # ---- formatting helpers -------------------------------------------------------------------

    @staticmethod
    def text_delta(choice: Choice, holdback: int) -> str:
        """New text to stream. Until the request finishes, the last ``holdback`` characters
        (longest stop string - 1) stay back, since a stop string completed by a later token
        truncates the text before it and streamed text cannot be taken back."""
        assert choice.last is not None
        text = visible_text(choice.last, holdback)
        end = len(text)
        if end <= choice.sent_chars:
            return ""
        delta = text[choice.sent_chars:end]
        choice.sent_chars = end
        return delta

    def new_logprobs(self, choice: Choice) -> list[dict[int, float]]:
        """Logprob entries of the tokens generated since the last call."""
        output = choice.last
        assert output is not None
        entries = output.outputs[0].logprobs or []
        new = entries[choice.sent_tokens:]
        choice.sent_tokens = len(entries)
        return new

    def prompt_logprobs(self, output: RequestOutput, computed: int, top_n: int) -> PromptLogprobs:
        """vLLM's ``prompt_logprobs`` of ``output``, whose entries hold the ``computed`` most
        likely tokens at each position (and the prompt token): the prompt token's and the
        ``top_n`` most likely tokens' entries, ranked where the entries tell the rank."""
        result: PromptLogprobs = [None]
        for token, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
            # (an entry holds one token more than the top ``computed`` when the prompt token is
            # not among them: its rank is unknown then)
            ranks = {t: r for r, (t, _) in enumerate(ranked[:computed], 1)}
            kept = dict(ranked[:top_n])
            kept[token] = entry[token]
            result.append({t: PromptLogprob(logprob=lp, rank=ranks.get(t),
                                            decoded_token=self.token_text(t))
                           for t, lp in kept.items()})
        return result

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    @staticmethod
    def chunk_usage(request: Any, choices: list[Choice]) -> UsageInfo | None:
        """The usage so far, for every chunk of a stream that asks for vLLM's
        ``continuous_usage_stats`` (which, as in vLLM, goes with ``include_usage``); else
        None."""
        options = request.stream_options
        if options is not None and options.include_usage and options.continuous_usage_stats:
            return Serving.usage(choices)
        return None

    @staticmethod
    def usage(choices: list[Choice]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in {id(c.prompt): c.prompt for c in choices}.values())
        completion = sum(len(c.last.outputs[0].token_ids) for c in choices if c.last is not None)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion)


def visible_text(output: RequestOutput, holdback: int) -> str:
    """The text that may be streamed: all of it once finished, else without the last
    ``holdback`` characters (where a stop string may be starting)."""
    text = output.outputs[0].text
    return text if output.finished else text[:max(len(text) - holdback, 0)]


def holdback_for(params: SamplingParams) -> int:
    return max((len(s) for s in params.stop), default=1) - 1


def sampled_and_top(entry: dict[int, float], token_id: int, top_n: int,
                    text_of: Callable[[int], str]) -> tuple[float, list[tuple[str, int, float]]]:
    """The sampled token's logprob and the ``top_n`` most likely (text, id, logprob)."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
    return entry.get(token_id, float("-inf")), [(text_of(t), t, lp) for t, lp in ranked]


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def now() -> float:
    return time.time()
