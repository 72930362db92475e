"""Fakes for unit tests, implementing the same interface as the real parts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, UsageInfo
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse
from vllm.exceptions import VLLMClientError, VLLMValidationError

from cluster.errors import RagtuneError
from serve.llm import AdapterLoadError
from serve.protocol import Prelude, Route

__all__ = ["FakeReplica"]

# Output tokens when a request sets no max_tokens (vLLM would fill the window; tests want short answers).
_DEFAULT_MAX_TOKENS = 8


def _words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):  # content parts
        return sum(len(p["text"].split()) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


class FakeReplica:
    """The methods of ``serve.llm.LLMServer`` the ingress calls, answering with vLLM's own classes.

    Choice ``i`` of every answer is ``max_tokens`` tokens " w0", " w1", … — prefixed with the
    adapter key the route carried (" alpha@1:w0") — so tests can see which adapter ran. A
    "token" of the prompt is a whitespace-separated word (messages, prompt and retrieved context).

    Args:
        base: The base model name (vLLM's ``model`` in answers for the base).
        max_model_len: A prompt of more words than this is refused as vLLM refuses it.
        delay_s: Sleep before each generated token (holds a stream open).
        error: Answer every generation with this instead (a vLLM ``ErrorResponse`` or a ``RagtuneError``).
        context_fits: Retrieved chunks that "fit the window" (None: all of them).
        fail_after: Raise ``RuntimeError`` after this many streamed chunks (a replica dying mid-stream).
    """

    def __init__(self, *, base: str = "tiny-llama", max_model_len: int = 256, delay_s: float = 0.0,
                 error: ErrorResponse | RagtuneError | None = None, context_fits: int | None = None,
                 fail_after: int | None = None):
        self.base, self.max_model_len, self.delay_s = base, max_model_len, delay_s
        self.error, self.context_fits, self.fail_after = error, context_fits, fail_after
        self.requests: list[Any] = []  # the vLLM request objects as the ingress passed them
        self.routes: list[Route] = []
        self.loaded: list[str] = []  # registry keys get_adapter was asked for

    # ---- the LLMServer interface -----------------------------------------------------------
    async def get_adapter(self, key: str) -> str:
        """Like ``LLMServer.load_adapter``: names starting with ``broken`` fail to load."""
        if key.startswith("broken@"):
            raise AdapterLoadError(f"adapter {key} failed to load (corrupt or incompatible files); "
                                   "the server log has the reason", code="adapter_load_failed")
        self.loaded.append(key)
        return key

    async def chat(self, request: Any, route: Route) -> AsyncIterator[Any]:
        """``/v1/chat/completions``: a ``Prelude`` (or an error), then vLLM's answer."""
        prompt = sum(_words(m.get("content")) for m in request.messages if isinstance(m, dict))
        async for item in self._run(request, route, prompt, chat=True):
            yield item

    async def completions(self, request: Any, route: Route) -> AsyncIterator[Any]:
        """``/v1/completions``, same stream shape as :meth:`chat`."""
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        prompt = sum(_words(p) if isinstance(p, str) else len(p) for p in prompts)
        async for item in self._run(request, route, prompt, chat=False):
            yield item

    async def tokenize(self, request: Any, route: Route) -> TokenizeResponse:
        self._record(request, route)
        messages = getattr(request, "messages", None)
        count = sum(_words(m.get("content")) for m in messages) if messages is not None else _words(request.prompt)
        return TokenizeResponse(count=count, max_model_len=self.max_model_len, tokens=list(range(count)))

    async def detokenize(self, request: Any, route: Route) -> DetokenizeResponse:
        self._record(request, route)
        return DetokenizeResponse(prompt="".join(f" t{t}" for t in request.tokens))

    def engine_metrics(self) -> bytes:
        return b"# HELP vllm:num_requests_running Fake engine gauge.\n# TYPE vllm:num_requests_running gauge\n" \
               b'vllm:num_requests_running{model_name="fake"} 0.0\n'

    async def engine_health(self) -> None:
        """A fake engine is always up (``healthy = False`` makes it fail, as a dead engine core does)."""
        if not getattr(self, "healthy", True):
            raise RuntimeError("engine core is dead")

    # ---- internals -----------------------------------------------------------------------
    def _record(self, request: Any, route: Route) -> None:
        self.requests.append(request)
        self.routes.append(route)
        request.model = route.adapter or self.base  # as LLMServer._bind does

    async def _run(self, request: Any, route: Route, prompt_words: int, chat: bool) -> AsyncIterator[Any]:
        self._record(request, route)
        request.request_id = route.request_id
        if self.error is not None:
            yield self.error
            return
        try:
            if route.adapter is not None:
                await self.get_adapter(route.adapter)
        except RagtuneError as exc:  # yielded, as LLMServer does
            yield exc
            return
        used = len(route.context) if self.context_fits is None else min(self.context_fits, len(route.context))
        prompt_tokens = max(1, prompt_words + sum(len(c.split()) for c in route.context[:used]))
        try:
            max_tokens = self._max_tokens(request, prompt_tokens)
            params = request.to_sampling_params(max_tokens, {})  # vLLM's own checks (min_tokens, n, …)
        except (ValueError, VLLMClientError) as exc:
            yield create_error_response(exc)
            return
        yield Prelude(context_used=used)
        run = _Run(self, request, route, params.n, params.max_tokens, prompt_tokens, chat)
        if request.stream:
            async for chunk in run.sse():
                yield chunk
        else:
            yield await run.response()

    def _max_tokens(self, request: Any, prompt_tokens: int) -> int:
        """vLLM's rule: a prompt over the window is an error; max_tokens is capped to what is left."""
        if prompt_tokens > self.max_model_len:
            raise VLLMValidationError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"contains {prompt_tokens} input tokens, which exceeds this limit even without any output "
                "tokens. Please reduce the length of the input prompt.",
                parameter="input_tokens", value=prompt_tokens,
            )
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        return min(asked or _DEFAULT_MAX_TOKENS, self.max_model_len - prompt_tokens)


class _Run:
    """One generation: the tokens, then vLLM's response object or its SSE strings."""

    def __init__(self, fake: FakeReplica, request: Any, route: Route, n: int, max_tokens: int,
                 prompt_tokens: int, chat: bool):
        self.fake, self.request, self.chat = fake, request, chat
        self.n, self.max_tokens, self.prompt_tokens = n, max_tokens, prompt_tokens
        self.prefix = f"{route.adapter}:" if route.adapter else ""
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{route.request_id}"
        self.model = request.model
        self.created = int(time.time())

    def _token(self, step: int) -> str:
        return f" {self.prefix}w{step}"

    def _usage(self, completion_tokens: int) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=self.prompt_tokens + completion_tokens)

    async def response(self) -> ChatCompletionResponse | CompletionResponse:
        await asyncio.sleep(self.fake.delay_s * self.max_tokens)
        text = "".join(self._token(s) for s in range(self.max_tokens))
        usage = self._usage(self.n * self.max_tokens)
        if self.chat:
            choices = [ChatCompletionResponseChoice(index=i, message=ChatMessage(role="assistant", content=text),
                                                    finish_reason="length") for i in range(self.n)]
            return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                          usage=usage)
        choices = [CompletionResponseChoice(index=i, text=text, finish_reason="length") for i in range(self.n)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _chunk(self, index: int, text: str | None, finish: str | None, done: int):
        """One streamed chunk (``text=None``: the chat role chunk vLLM sends first)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            choice = ChatCompletionResponseStreamChoice(index=index, delta=delta, finish_reason=finish)
            chunk = ChatCompletionStreamResponse(id=self.id, object="chat.completion.chunk", created=self.created,
                                                 model=self.model, choices=[choice])
        else:
            choice = CompletionResponseStreamChoice(index=index, text=text, finish_reason=finish)
            chunk = CompletionStreamResponse(id=self.id, object="text_completion", created=self.created,
                                             model=self.model, choices=[choice])
        options = self.request.stream_options
        if options is not None and options.continuous_usage_stats:
            chunk.usage = self._usage(done)
        return chunk

    def _chunks(self):
        """``(chunk, is_token)``: vLLM's role chunks (chat), then one chunk per token and choice."""
        if self.chat:
            for i in range(self.n):
                yield self._chunk(i, None, None, 0), False
        for step in range(self.max_tokens):
            for i in range(self.n):
                last = step == self.max_tokens - 1
                yield self._chunk(i, self._token(step), "length" if last else None, step + 1), True

    async def sse(self) -> AsyncIterator[str]:
        """SSE strings exactly as vLLM's stream generators write them."""
        for sent, (chunk, is_token) in enumerate(self._chunks()):
            if self.fake.fail_after is not None and sent >= self.fake.fail_after:
                raise RuntimeError("replica died mid-stream (/srv/secret/path)")
            if is_token:
                await asyncio.sleep(self.fake.delay_s)
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        options = self.request.stream_options
        if options is not None and options.include_usage:
            cls = ChatCompletionStreamResponse if self.chat else CompletionStreamResponse
            final = cls(id=self.id, created=self.created, model=self.model, choices=[],
                        usage=self._usage(self.n * self.max_tokens))
            yield f"data: {final.model_dump_json(exclude_unset=False, exclude_none=True)}\n\n"
        yield "data: [DONE]\n\n"
