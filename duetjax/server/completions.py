"""``POST /v1/completions``: prompts in (text, texts, token ids), text completions out;
``response_format`` and vLLM's ``structured_outputs`` constrain the text (structured.py).
``echo`` returns the prompt ahead of the completion, with ``logprobs`` its tokens' logprobs
too (the engine's prompt logprobs), and with ``max_tokens: 0`` the prompt only (what
log-likelihood evaluations send; as vLLM does, the engine generates one token, not returned)."""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request

from ..sampling_params import SamplingParams
from .errors import APIError, bad_request, from_engine_error
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, UsageInfo)
from .serving import (SSE_DONE, Choice, Prompt, Serving, holdback_for, new_id,
                      now, sampled_and_top, sse)
from .structured import requested_structured_outputs


class Completions:
    def __init__(self, serving: Serving):
        self.serving = serving

    async def prompts(self, request: CompletionRequest) -> list[Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif raw and isinstance(raw[0], int):
            raw = [raw]
        prompts = []
        for item in raw:
            if isinstance(item, str):
                if not item:
                    raise bad_request("the prompt is empty; send some text", param="prompt")
                prompts.append(Prompt(await self.serving.tokenize(item), item))
            else:
                self.serving.check_token_ids(item, "prompt")
                text = None
                if request.echo:
                    text = self.serving.require_tokenizer("echo").decode(item)
                prompts.append(Prompt(list(item), text))
        return prompts

    async def create(self, request: CompletionRequest, http: Request):
        serving = self.serving
        arrival = now()
        serving.check_model(request.model)
        if (message := request.unsupported()) is not None:
            raise bad_request(message)
        constraint = requested_structured_outputs(request)
        prompts = await self.prompts(request)
        requested = request.max_tokens
        model_max_tokens = serving.engine.sampling_defaults.max_tokens
        if "max_tokens" not in request.model_fields_set and model_max_tokens is not None:
            requested = None  # left out: the model's max_new_tokens rather than OpenAI's 16
        max_tokens = [serving.max_tokens_for(p, requested, "max_tokens") for p in prompts]
        if len(set(max_tokens)) > 1:  # max_tokens=None with prompts of different lengths
            raise bad_request("max_tokens is required when prompts differ in length",
                              param="max_tokens")
        params = serving.sampling_params(request, max(max_tokens[0], 1), request.logprobs,
                                         constraint, request.engine_prompt_logprobs)
        request_id = new_id("cmpl")
        choices = await serving.start(prompts, params, request.n, request_id, constraint)
        return await serving.respond(
            choices, http, arrival, request.stream,
            lambda: self.stream(request, request_id, choices, arrival, params),
            lambda: self.response(request, request_id, choices))

    def response(self, request: CompletionRequest, request_id: str,
                 choices: list[Choice]) -> CompletionResponse:
        serving = self.serving
        return CompletionResponse(
            id=request_id, model=serving.model_name,
            choices=[self.choice(request, c, c.last.outputs[0].text, finished=True,
                                 with_prompt_logprobs=True) for c in choices],
            usage=self.usage(request, choices))

    def usage(self, request: CompletionRequest, choices: list[Choice]) -> UsageInfo:
        usage = self.serving.usage(choices)
        if not request.generates:  # (the token the engine generated is not returned)
            usage = UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=0,
                              total_tokens=usage.prompt_tokens)
        return usage

    def choice(self, request: CompletionRequest, choice: Choice, text: str, finished: bool,
               with_prompt_logprobs: bool = False) -> CompletionChoice:
        """A choice with the new ``text`` (and the prompt ahead of it, the first time, with
        echo). ``with_prompt_logprobs``: vLLM's ``prompt_logprobs`` too, when asked for."""
        output = choice.last
        completion = output.outputs[0]
        echo = request.echo and not choice.started
        choice.started = True
        if not request.generates:
            text = ""
        logprobs = None
        if request.logprobs is not None:
            logprobs = CompletionLogprobs()
            if echo:
                self.add_logprobs(logprobs, choice, output.prompt_logprobs,
                                  output.prompt_token_ids, request.logprobs)
                choice.text_offset = len(choice.prompt.text or "")  # (the completion's start)
            entries = self.serving.new_logprobs(choice)
            if request.generates:
                token_ids = completion.token_ids
                self.add_logprobs(logprobs, choice, entries,
                                  token_ids[len(token_ids) - len(entries):], request.logprobs)
        if echo:
            text = (choice.prompt.text or "") + text
        prompt_logprobs = None
        if with_prompt_logprobs and request.prompt_logprobs is not None:
            prompt_logprobs = self.serving.prompt_logprobs(output, request.engine_prompt_logprobs,
                                                           request.prompt_logprobs)
        return CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason if finished else None,
                                stop_reason=completion.stop_reason if finished else None,
                                prompt_logprobs=prompt_logprobs)

    def add_logprobs(self, result: CompletionLogprobs, choice: Choice,
                     entries: list[dict[int, float] | None], token_ids: list[int],
                     top_n: int) -> None:
        """Appends the legacy format of ``entries`` (one per token of ``token_ids``; None for
        a prompt's first token, which has none): for each token its text, logprob, the top
        ``top_n`` alternatives (plus the token itself) and its character offset in the text."""
        offset = choice.text_offset
        for entry, token in zip(entries, token_ids):
            text = self.serving.token_text(token)
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            logprob, top = sampled_and_top(entry, token, max(top_n, 1), self.serving.token_text)
            result.token_logprobs.append(logprob)
            tops = {t: lp for t, _, lp in top[:top_n]}
            tops.setdefault(text, logprob)
            result.top_logprobs.append(tops)
        choice.text_offset = offset

    async def stream(self, request: CompletionRequest, request_id: str, choices: list[Choice],
                     arrival: float, params: SamplingParams) -> AsyncIterator[str]:
        serving = self.serving
        holdback = holdback_for(params)
        created = int(arrival)
        try:
            async for choice in serving.outputs(choices):
                finished = choice.last.finished
                delta = serving.text_delta(choice, holdback) if request.generates else ""
                has_logprobs = request.logprobs is not None and request.generates and (
                    len(choice.last.outputs[0].logprobs or []) > choice.sent_tokens)
                if not (delta or finished or has_logprobs or (request.echo and not choice.started)):
                    continue
                body = CompletionResponse(id=request_id, created=created, model=serving.model_name,
                                          choices=[self.choice(request, choice, delta, finished)],
                                          usage=serving.chunk_usage(request, choices))
                yield sse(body)
            if request.stream_options and request.stream_options.include_usage:
                yield sse(CompletionResponse(id=request_id, created=created,
                                             model=serving.model_name, choices=[],
                                             usage=self.usage(request, choices)))
        except APIError as error:
            yield sse({"error": {"message": error.message, "type": error.type, "code": error.code}})
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            api_error = from_engine_error(error)
            yield sse({"error": {"message": api_error.message, "type": api_error.type,
                                 "code": api_error.code}})
        finally:
            serving.finish(choices, arrival)
        yield SSE_DONE
