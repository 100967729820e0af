"""``POST /v1/chat/completions``: messages through the model's chat template."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import Request

from ..sampling_params import SamplingParams
from .errors import APIError, bad_request, from_engine_error
from .protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatResponseMessage,
                       ChatStreamChoice, ChatTokenLogprob, DeltaMessage, TopLogprob)
from .serving import (SSE_DONE, Choice, Prompt, Serving, holdback_for, new_id,
                      now, sampled_and_top, sse)


class ChatCompletions:
    def __init__(self, serving: Serving):
        self.serving = serving

    async def prompt(self, request: ChatCompletionRequest) -> Prompt:
        return await self.render(request.messages, request.add_generation_prompt,
                                 request.chat_template_kwargs)

    async def render(self, chat: list[ChatMessage], add_generation_prompt: bool,
                     chat_template_kwargs: dict[str, Any] | None,
                     add_special_tokens: bool = False) -> Prompt:
        """The prompt the chat template makes of ``chat`` (also what /tokenize counts)."""
        tokenizer = self.serving.require_tokenizer("chat")
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request(f"the model '{self.serving.model_name}' has no chat template; use "
                              "/v1/completions with a plain prompt")
        messages = []
        for i, message in enumerate(chat):
            try:
                content = message.text()
            except ValueError as error:
                raise bad_request(str(error), param=f"messages.{i}.content") from None
            messages.append({**(message.model_extra or {}), "role": message.role,
                             "content": content})
        try:
            text = await asyncio.to_thread(
                tokenizer.apply_chat_template, messages,
                add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
        except Exception as error:  # noqa: BLE001 - template errors describe the bad input
            raise bad_request(f"the chat template rejected the messages: {error}",
                              param="messages") from None
        ids = await self.serving.tokenize(text, add_special_tokens=add_special_tokens)
        return Prompt(ids, text)

    async def create(self, request: ChatCompletionRequest, http: Request):
        serving = self.serving
        arrival = now()
        serving.check_model(request.model)
        if (message := request.unsupported()) is not None:
            raise bad_request(message)
        prompt = await self.prompt(request)
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        max_tokens = serving.max_tokens_for(prompt, request.max_new_tokens, field)
        top_n = (request.top_logprobs or 0) if request.logprobs else None
        params = serving.sampling_params(request, max_tokens, top_n)
        request_id = new_id("chatcmpl")
        choices = await serving.start([prompt], params, request.n, request_id)
        return await serving.respond(
            choices, http, arrival, request.stream,
            lambda: self.stream(request, request_id, choices, arrival, params),
            lambda: self.response(request, request_id, choices))

    def response(self, request: ChatCompletionRequest, request_id: str,
                 choices: list[Choice]) -> ChatCompletionResponse:
        serving = self.serving
        return ChatCompletionResponse(
            id=request_id, model=serving.model_name, usage=serving.usage(choices),
            choices=[ChatChoice(index=c.index,
                                message=ChatResponseMessage(content=c.last.outputs[0].text),
                                logprobs=self.logprobs(request, c),
                                finish_reason=c.last.outputs[0].finish_reason,
                                stop_reason=c.last.outputs[0].stop_reason)
                     for c in choices])

    def logprobs(self, request: ChatCompletionRequest, choice: Choice) -> ChatLogprobs | None:
        if not request.logprobs:
            return None
        entries = self.serving.new_logprobs(choice)
        token_ids = choice.last.outputs[0].token_ids
        start = len(token_ids) - len(entries)
        content = []
        for entry, token in zip(entries, token_ids[start:]):
            logprob, top = sampled_and_top(entry, token, request.top_logprobs or 0,
                                           self.serving.token_text)
            text = self.serving.token_text(token)
            content.append(ChatTokenLogprob(
                token=text, logprob=logprob, bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                              for t, _, lp in top]))
        return ChatLogprobs(content=content)

    async def stream(self, request: ChatCompletionRequest, request_id: str,
                     choices: list[Choice], arrival: float,
                     params: SamplingParams) -> AsyncIterator[str]:
        serving = self.serving
        holdback = holdback_for(params)
        created = int(arrival)

        def chunk(choice_list: list[ChatStreamChoice]) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created,
                                           model=serving.model_name, choices=choice_list))

        try:
            for choice in choices:  # the role first, as OpenAI does
                choice.started = True
                yield chunk([ChatStreamChoice(index=choice.index,
                                              delta=DeltaMessage(role="assistant", content=""))])
            async for choice in serving.outputs(choices):
                completion = choice.last.outputs[0]
                finished = choice.last.finished
                delta = serving.text_delta(choice, holdback)
                has_logprobs = request.logprobs and len(completion.logprobs or []) > choice.sent_tokens
                if not (delta or finished or has_logprobs):
                    continue
                yield chunk([ChatStreamChoice(
                    index=choice.index, delta=DeltaMessage(content=delta or None),
                    logprobs=self.logprobs(request, choice),
                    finish_reason=completion.finish_reason if finished else None,
                    stop_reason=completion.stop_reason if finished else None)])
            if request.stream_options and request.stream_options.include_usage:
                yield sse(ChatCompletionChunk(id=request_id, created=created,
                                              model=serving.model_name, choices=[],
                                              usage=serving.usage(choices)))
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            api_error = error if isinstance(error, APIError) else from_engine_error(error)
            yield sse({"error": {"message": api_error.message, "type": api_error.type,
                                 "code": api_error.code}})
        finally:
            serving.finish(choices, arrival)
        yield SSE_DONE
