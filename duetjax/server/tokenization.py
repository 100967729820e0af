"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's): what a client needs to count and
inspect tokens exactly as the server does, without generating."""
from __future__ import annotations

import asyncio

from .chat import ChatCompletions
from .errors import bad_request
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving import Serving


class Tokenization:
    def __init__(self, serving: Serving, chat: ChatCompletions):
        self.serving = serving
        self.chat = chat

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        serving = self.serving
        serving.check_model(request.model)
        if request.messages is not None:
            prompt = await self.chat.render(request.messages, request.add_generation_prompt,
                                            request.chat_template_kwargs,
                                            bool(request.add_special_tokens),
                                            tools=[t.template_dict() for t in request.tools]
                                            if request.tools else None)
            ids = prompt.token_ids
        else:
            add = request.add_special_tokens is not False
            ids = await serving.tokenize(request.prompt, add)
        strs = None
        if request.return_token_strs:
            strs = [serving.tokenizer.id_to_token(i) for i in ids]
        return TokenizeResponse(count=len(ids), max_model_len=serving.engine.max_model_len,
                                tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        serving = self.serving
        serving.check_model(request.model)
        tokenizer = serving.require_tokenizer("detokenize")
        vocab = tokenizer.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        text = await asyncio.to_thread(tokenizer.decode, request.tokens, skip_special_tokens=False)
        return DetokenizeResponse(prompt=text)
