"""``POST /v1/chat/completions``: messages through the model's chat template; with a tool-call
parser, the calls the model writes come back as ``tool_calls`` (see tool_calls.py); with a
reasoning parser, the model's thinking comes back as ``reasoning_content`` (reasoning.py), and
tool calls are looked for in the rest. ``response_format``, ``structured_outputs`` and
tool_choice "required" or a named function constrain the output (structured.py)."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import Request

from ..sampling_params import SamplingParams
from .errors import APIError, bad_request, from_engine_error
from .protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatResponseMessage,
                       ChatStreamChoice, ChatTokenLogprob, DeltaMessage, TopLogprob)
from .reasoning import ReasoningParser, ReasoningStream, extract_reasoning
from .serving import (SSE_DONE, Choice, Prompt, Serving, holdback_for, new_id,
                      now, sampled_and_top, sse, visible_text)
from .structured import asks_for_structured_output, chat_constraint
from .tool_calls import ToolCallConfig, ToolPlan, finished_calls, plan_tools, template_tool_calls


class ChatCompletions:
    def __init__(self, serving: Serving, tool_config: ToolCallConfig = ToolCallConfig(),
                 reasoning_parser: ReasoningParser | None = None):
        self.serving = serving
        self.tool_config = tool_config
        self.reasoning_parser = reasoning_parser

    async def prompt(self, request: ChatCompletionRequest, tools: ToolPlan) -> Prompt:
        return await self.render(request.messages, request.add_generation_prompt,
                                 request.chat_template_kwargs, tools=tools.template_tools)

    async def render(self, chat: list[ChatMessage], add_generation_prompt: bool,
                     chat_template_kwargs: dict[str, Any] | None,
                     add_special_tokens: bool = False,
                     tools: list[dict[str, Any]] | None = None) -> Prompt:
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
            entry = {**(message.model_extra or {}), "role": message.role, "content": content}
            if message.tool_calls is not None:
                entry["tool_calls"] = template_tool_calls(message, i)
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            messages.append(entry)
        kwargs = {**(chat_template_kwargs or {}), "tokenize": False}  # (text: tokenized below)
        if tools is not None:
            kwargs["tools"] = tools
        try:
            text = await asyncio.to_thread(
                tokenizer.apply_chat_template, messages,
                add_generation_prompt=add_generation_prompt, **kwargs)
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
        tools = plan_tools(request, self.tool_config)
        constraint = chat_constraint(request, tools.forced)
        prompt = await self.prompt(request, tools)
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        max_tokens = serving.max_tokens_for(prompt, request.max_new_tokens, field)
        top_n = (request.top_logprobs or 0) if request.logprobs else None
        params = serving.sampling_params(request, max_tokens, top_n, constraint,
                                         request.prompt_logprobs)
        request_id = new_id("chatcmpl")
        choices = await serving.start([prompt], params, request.n, request_id, constraint)
        return await serving.respond(
            choices, http, arrival, request.stream,
            lambda: self.stream(request, request_id, choices, arrival, params, tools),
            lambda: self.response(request, request_id, choices, tools))

    def reasoning_for(self, request: ChatCompletionRequest,
                      tools: ToolPlan) -> ReasoningParser | None:
        """The reasoning parser, unless the output is constrained: then all of it is the
        constrained answer (no <think> block; deepseek_r1's parser would call it all reasoning).
        vLLM constrains only what follows the reasoning; duetjax constrains the whole output."""
        if tools.forced is not None or asks_for_structured_output(request):
            return None
        return self.reasoning_parser

    def response(self, request: ChatCompletionRequest, request_id: str,
                 choices: list[Choice], tools: ToolPlan = ToolPlan()) -> ChatCompletionResponse:
        serving = self.serving
        reasoning_parser = self.reasoning_for(request, tools)
        answers = []
        for c in choices:
            completion = c.last.outputs[0]
            reasoning, content, calls, called = None, completion.text, [], False
            if reasoning_parser is not None:
                reasoning, content = extract_reasoning(content, reasoning_parser)
            if (call_stream := tools.call_stream()) is not None:
                content, calls = finished_calls(call_stream, content)
                called = call_stream.ends_in_tool_calls
            if reasoning is not None and not content:
                content = None  # all thinking (e.g. cut off), as vLLM answers
            message = ChatResponseMessage(content=content, reasoning_content=reasoning,
                                          tool_calls=calls or None)
            answers.append(ChatChoice(
                index=c.index, message=message,
                logprobs=self.logprobs(request, c),
                finish_reason=finish_reason(completion.finish_reason, called),
                stop_reason=completion.stop_reason))
        prompt_logprobs = None
        if request.prompt_logprobs is not None:  # (one prompt: the first choice's)
            prompt_logprobs = serving.prompt_logprobs(choices[0].last, request.prompt_logprobs,
                                                      request.prompt_logprobs)
        return ChatCompletionResponse(id=request_id, model=serving.model_name,
                                      usage=serving.usage(choices), choices=answers,
                                      prompt_logprobs=prompt_logprobs)

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
                     choices: list[Choice], arrival: float, params: SamplingParams,
                     tools: ToolPlan = ToolPlan()) -> AsyncIterator[str]:
        serving = self.serving
        holdback = holdback_for(params)
        created = int(arrival)
        tool_streams = {c.index: stream for c in choices
                        if (stream := tools.call_stream()) is not None}
        reasoning_parser = self.reasoning_for(request, tools)
        reasoning_streams = ({c.index: ReasoningStream(reasoning_parser) for c in choices}
                             if reasoning_parser is not None else {})

        def chunk(choice_list: list[ChatStreamChoice]) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created,
                                           model=serving.model_name, choices=choice_list,
                                           usage=serving.chunk_usage(request, choices)))

        try:
            for choice in choices:  # the role first, as OpenAI does
                choice.started = True
                yield chunk([ChatStreamChoice(index=choice.index,
                                              delta=DeltaMessage(role="assistant", content=""))])
            async for choice in serving.outputs(choices):
                completion = choice.last.outputs[0]
                finished = choice.last.finished
                tool_stream = tool_streams.get(choice.index)
                reasoning_stream = reasoning_streams.get(choice.index)
                new_calls, reasoning = [], ""
                if tool_stream is None and reasoning_stream is None:
                    delta = serving.text_delta(choice, holdback)
                else:
                    text = visible_text(choice.last, holdback)
                    if reasoning_stream is not None:
                        reasoning, text = reasoning_stream.step(text, finished)
                    if tool_stream is not None:
                        delta, new_calls = tool_stream.step(text, finished)
                    else:
                        assert reasoning_stream is not None
                        delta = reasoning_stream.content_delta(text)
                has_logprobs = request.logprobs and len(completion.logprobs or []) > choice.sent_tokens
                if not (delta or reasoning or new_calls or finished or has_logprobs):
                    continue
                called = tool_stream is not None and tool_stream.ends_in_tool_calls
                reason = finish_reason(completion.finish_reason, called) if finished else None
                yield chunk([ChatStreamChoice(
                    index=choice.index,
                    delta=DeltaMessage(content=delta or None, reasoning_content=reasoning or None,
                                       tool_calls=new_calls or None),
                    logprobs=self.logprobs(request, choice), finish_reason=reason,
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


def finish_reason(reason: str | None, called: bool) -> str | None:
    """"tool_calls" when the model ended its turn after calling tools (not for a named
    tool_choice, which vLLM answers with "stop"); a cut-off ("length") stays as it is, so the
    client knows the calls may be incomplete."""
    return "tool_calls" if called and reason == "stop" else reason
