"""One generation answer on its way out: vLLM's output plus ``sources``, timed for the metrics.

vLLM produces the response objects and SSE strings; :class:`Reply` only adds ``sources``/``rag``
(on the response, or on the first streamed chunk), measures TTFT/ITL/e2e per model label and
counts tokens from vLLM's own ``usage``. Streams always ask vLLM for the final usage chunk
(:class:`StreamTap`) and drop it again when the client did not ask for it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve.errors import to_ragtune_error
from serve.metrics import Metrics

__all__ = ["Reply", "StreamTap"]

logger = logging.getLogger(__name__)

_USAGE_CHUNK = '"choices":[]'  # vLLM's final usage-only chunk (compact JSON)


class StreamTap:
    """Forces ``stream_options.include_usage`` on a streaming request; remembers whether to hide it."""

    def __init__(self, hide_usage: bool):
        self.hide_usage = hide_usage

    @classmethod
    def prepare(cls, req: Any) -> StreamTap:
        if not getattr(req, "stream", False) or not hasattr(req, "stream_options"):  # Responses: no options
            return cls(hide_usage=False)
        options = req.stream_options
        if options is not None and options.include_usage:
            return cls(hide_usage=False)
        from vllm.entrypoints.generate.base.protocol import StreamOptions

        continuous = bool(options and options.continuous_usage_stats)
        req.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=continuous)
        return cls(hide_usage=True)


def _status(answer: Any) -> int:
    if answer is None:
        return 200
    if isinstance(answer, int):
        return answer
    if isinstance(answer, BaseException):
        return to_ragtune_error(answer).status
    error = getattr(answer, "error", None)
    return int(getattr(error, "code", 500)) if error is not None else 200


class Reply:
    """Metrics and ``sources`` for one request, from the replica's first item to the last byte."""

    def __init__(self, metrics: Metrics, kind: str, label: str, t0: float, sources: list[dict] | None,
                 done: Callable[[], None]):
        self.metrics, self.kind, self.label, self.t0 = metrics, kind, label, t0
        self.sources = sources
        self.rag: dict | None = None
        self._done = done
        self._last: float | None = None
        self._usage: dict | None = None
        self._finished = False

    def context_used(self, used: int) -> None:
        if self.sources is None:
            return
        self.rag = {"chunks_retrieved": len(self.sources), "chunks_used": used,
                    "chunks_dropped": len(self.sources) - used}
        self.sources = self.sources[:used]  # only what the model actually saw

    def _extra(self) -> dict:
        return {"sources": self.sources, "rag": self.rag} if self.sources is not None else {}

    def finish(self, answer: Any = None) -> None:
        """Record the outcome once (``answer``: None = success, an error response or exception)."""
        if self._finished:
            return
        self._finished = True
        status = _status(answer)
        m = self.metrics
        m.requests.labels(self.kind, self.label, str(status)).inc()
        if status >= 400:
            m.errors.labels(self.kind, str(status)).inc()
        else:
            m.e2e.labels(self.label).observe(time.perf_counter() - self.t0)
            if self._usage:  # chat/completions name them prompt/completion, Responses input/output
                u = self._usage
                m.prompt_tokens.labels(self.label).inc(u.get("prompt_tokens") or u.get("input_tokens") or 0)
                m.completion_tokens.labels(self.label).inc(u.get("completion_tokens") or u.get("output_tokens") or 0)
        self._done()

    async def collect(self, stream: AsyncIterator[Any]) -> dict:
        """The non-streaming answer: vLLM's response object plus ``sources``."""
        answer = await stream.__anext__()
        if isinstance(answer, BaseException):
            raise answer
        body = answer.model_dump(mode="json", by_alias=True)
        if "error" in body and "choices" not in body:
            self.finish(answer)
            return body
        self._usage = body.get("usage")
        self.finish()
        return body | self._extra()

    def _observe(self) -> None:
        # Non-streaming requests never reach here: their TTFT is unknown, not their total latency.
        now = time.perf_counter()
        histogram = self.metrics.itl if self._last is not None else self.metrics.ttft
        histogram.labels(self.label).observe(now - (self._last or self.t0))
        self._last = now

    def _first(self, chunk: str) -> str:
        payload = json.loads(chunk.removeprefix("data: "))
        return f"data: {json.dumps(payload | self._extra())}\n\n"

    async def sse(self, stream: AsyncIterator[str], tap: StreamTap) -> AsyncIterator[str]:
        """vLLM's SSE strings, with ``sources`` on the first chunk and the forced usage chunk hidden."""
        answer: Any = None
        first = True
        try:
            async for chunk in stream:
                if not chunk.startswith("data: {"):
                    if chunk.startswith("event: "):  # Responses API events
                        self._observe()
                    yield chunk
                    continue
                if _USAGE_CHUNK in chunk:
                    self._usage = json.loads(chunk[6:]).get("usage")
                    if tap.hide_usage:
                        continue
                elif chunk.startswith('data: {"error"'):
                    answer = int(json.loads(chunk[6:])["error"].get("code") or 500)
                else:
                    self._observe()
                if first and self.sources is not None:
                    chunk = self._first(chunk)
                first = False
                yield chunk
        except Exception as exc:  # mid-stream: the status line is gone, so report in-band
            err = to_ragtune_error(exc)
            answer = err
            yield f"data: {json.dumps(err.to_dict())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.finish(answer)
