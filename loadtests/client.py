"""One streamed request, timed: the HTTP backends and the SSE reader.

Timestamps are ``time.perf_counter()`` readings taken when a network read returns, so several
events that arrive in one read share a timestamp (their gap is 0, as the client really saw it).
Errors never raise out of :func:`send_one`: each becomes the record's ``error`` kind (``http``
with its ``status``, ``connect_error``, ``disconnected``, ``timeout``, ``not_streaming``,
``stream_error``, ``incomplete_stream``, ``cancelled``, ``client_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["Backend", "RequestRecord", "open_backend", "send_one"]

_MAX_ERROR_BODY = 2048

try:  # ~3x faster JSON parsing per SSE event when orjson is installed; same results
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads


@dataclass(slots=True)
class RequestRecord:
    """Every timing of one request. Times are seconds; ``start`` is relative to the run start."""

    id: int
    step: int
    model: str
    rag: bool
    start: float = 0.0
    status: int | None = None
    error: str | None = None
    message: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    content_chunks: int = 0
    prompt_tokens: int | None = None
    output_tokens: int | None = None

    @property
    def ok(self) -> bool:
        """The request completed: HTTP 200, a stream, ``[DONE]``, no error event."""
        return self.error is None

    @property
    def error_key(self) -> str | None:
        """The key errors are counted under: the HTTP status (``"503"``) or the error kind."""
        if self.error is None:
            return None
        return str(self.status) if self.error == "http" and self.status else self.error


class _HttpxResponse:
    def __init__(self, response):
        self._r = response
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "")

    def chunks(self) -> AsyncIterator[bytes]:
        return self._r.stream.__aiter__()  # raw bytes straight off the transport

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self._r.stream])


class _HttpxBackend:
    """httpx (or its API twin httpx2) as a free-list of single-connection transports.

    Two measured fixes (loadtests/README.md): one shared pool costs O(connections) per request
    event (httpcore scans it), so at 64 in flight a single client managed ~300-400 streamed
    requests/s on one core — one transport per connection, handed out LIFO, removes the scan;
    and calling the transport directly skips the client's per-request cookie/auth/redirect
    work (~25% less CPU per request). Each transport keeps its HTTP/1.1 keep-alive connection.
    No client-side timeout (asyncio enforces one) and no proxies from the environment.
    """

    def __init__(self, module_name: str, headers: dict[str, str], max_connections: int):
        self.mod = importlib.import_module(module_name)
        self.headers = headers
        self.ssl = ssl.create_default_context()  # one context for all transports: cheap transports
        self.idle: list = []
        self.all: list = []

    def _transport(self):
        if self.idle:
            return self.idle.pop()
        limits = self.mod.Limits(max_connections=1, max_keepalive_connections=1)
        transport = self.mod.AsyncHTTPTransport(verify=self.ssl, limits=limits)
        self.all.append(transport)
        return transport

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: bytes):
        transport = self._transport()
        try:
            request = self.mod.Request("POST", url, content=body, headers=self.headers)
            response = await transport.handle_async_request(request)
            try:
                yield _HttpxResponse(response)
            finally:
                await response.aclose()
        finally:
            self.idle.append(transport)

    def classify(self, exc: BaseException) -> str:
        if isinstance(exc, self.mod.ConnectError | self.mod.ConnectTimeout):
            return "connect_error"
        if isinstance(exc, self.mod.RemoteProtocolError | self.mod.ReadError | self.mod.WriteError):
            return "disconnected"
        return "client_error"

    async def aclose(self) -> None:
        for transport in self.all:
            await transport.aclose()


class _AiohttpResponse:
    def __init__(self, response):
        self._r = response
        self.status = response.status
        self.content_type = response.headers.get("content-type", "")

    def chunks(self) -> AsyncIterator[bytes]:
        return self._r.content.iter_any()

    async def body(self) -> bytes:
        return await self._r.read()


class _AiohttpBackend:
    """aiohttp: the lightest per request of the three (see loadtests/README.md)."""

    def __init__(self, headers: dict[str, str], max_connections: int):
        import aiohttp

        self.mod = aiohttp
        connector = aiohttp.TCPConnector(limit=max_connections)
        self.client = aiohttp.ClientSession(headers=headers, connector=connector, auto_decompress=False,
                                            timeout=aiohttp.ClientTimeout(total=None), trust_env=False)

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: bytes):
        async with self.client.post(url, data=body) as response:
            yield _AiohttpResponse(response)

    def classify(self, exc: BaseException) -> str:
        if isinstance(exc, self.mod.ClientConnectorError):
            return "connect_error"
        if isinstance(exc, self.mod.ClientPayloadError | self.mod.ServerDisconnectedError
                      | self.mod.ClientOSError):
            return "disconnected"
        return "client_error"

    async def aclose(self) -> None:
        await self.client.close()


Backend = _HttpxBackend | _AiohttpBackend


def open_backend(kind: str, api_key: str | None, max_connections: int) -> Backend:
    """An HTTP client for ``kind`` (``httpx``, ``httpx2`` or ``aiohttp``); call inside the event loop.

    Args:
        kind: Client library.
        api_key: Sent as ``Authorization: Bearer …`` when set.
        max_connections: Connection-pool size; keep-alive connections are reused up to it.
    """
    # identity: the SSE bytes are read raw, so they must not arrive compressed.
    headers = {"content-type": "application/json", "accept": "text/event-stream",
               "accept-encoding": "identity"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if kind == "aiohttp":
        return _AiohttpBackend(headers, max_connections)
    return _HttpxBackend(kind, headers, max_connections)


class _SseReader:
    """Splits SSE bytes into ``data:`` payloads and fills a record from them."""

    def __init__(self, rec: RequestRecord, t0: float, chat: bool):
        self.rec, self.t0, self.chat = rec, t0, chat
        self.buf = b""
        self.last: float | None = None
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        if b"\r" in self.buf:
            self.buf = self.buf.replace(b"\r\n", b"\n")
        while not self.done:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return
            event, self.buf = self.buf[:end], self.buf[end + 2:]
            if event.startswith(b"data: ") and b"\n" not in event:
                payload = event[6:]  # the common one-line event
            else:
                payload = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n")
                                     if line.startswith(b"data:"))
            if payload:
                self._event(payload, now)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            self.rec.e2e = now - self.t0
            return
        obj = _loads(payload)
        if not isinstance(obj, dict):
            raise _StreamError(f"SSE payload is not a JSON object: {payload[:80]!r}")
        if obj.get("error"):
            err = obj["error"]
            raise _StreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        if obj.get("usage"):
            self.rec.prompt_tokens = obj["usage"].get("prompt_tokens")
            self.rec.output_tokens = obj["usage"].get("completion_tokens")
        if self._has_content(obj.get("choices") or ()):
            self._content(now)

    def _has_content(self, choices) -> bool:
        for choice in choices:
            if self.chat:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                    return True
            elif choice.get("text"):
                return True
        return False

    def _content(self, now: float) -> None:
        rec = self.rec
        if self.last is None:
            rec.ttft = now - self.t0
        else:
            rec.itl.append(now - self.last)
        self.last = now
        rec.content_chunks += 1


class _StreamError(Exception):
    """An ``{"error": …}`` event inside an otherwise successful stream."""


def _fail(rec: RequestRecord, kind: str, message: str | None = None) -> None:
    rec.error = kind
    rec.message = message[:300] if message else None


async def _read_stream(backend: Backend, url: str, body: bytes, rec: RequestRecord, chat: bool) -> None:
    t0 = time.perf_counter()
    async with backend.post(url, body) as response:
        rec.status = response.status
        if response.status != 200:
            _fail(rec, "http", (await response.body())[:_MAX_ERROR_BODY].decode("utf-8", "replace"))
            return
        if "text/event-stream" not in response.content_type:
            _fail(rec, "not_streaming", f"content-type {response.content_type!r}, not text/event-stream")
            await response.body()
            return
        reader = _SseReader(rec, t0, chat)
        # Read to the end even after [DONE]: leaving bytes unread would close the keep-alive connection.
        async for data in response.chunks():
            if not reader.done:
                reader.feed(data, time.perf_counter())
    if not reader.done:
        _fail(rec, "incomplete_stream", "the stream ended without data: [DONE]")


async def send_one(backend: Backend, url: str, body: bytes, rec: RequestRecord, *,
                   chat: bool, timeout_s: float) -> RequestRecord:
    """Send one streaming request and fill ``rec`` with its timings, tokens and error (if any).

    Args:
        backend: From :func:`open_backend`.
        url: Full endpoint URL.
        body: The JSON request body (``stream: true``).
        rec: The record to fill; returned for convenience.
        chat: Chat chunks (``delta.content``) rather than completion chunks (``text``).
        timeout_s: Limit for the whole request, seconds.

    Returns:
        ``rec``. A task cancelled mid-request records ``cancelled`` and re-raises.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await _read_stream(backend, url, body, rec, chat)
    except TimeoutError:
        _fail(rec, "timeout", f"no complete response within {timeout_s} s")
    except _StreamError as exc:
        _fail(rec, "stream_error", str(exc))
    except ValueError as exc:  # a data: payload that is not JSON
        _fail(rec, "stream_error", f"bad SSE payload: {exc}")
    except asyncio.CancelledError:
        _fail(rec, "cancelled", "still in flight when the step's drain time ran out")
        raise
    except Exception as exc:  # every client library error becomes a counted kind, never a crash
        _fail(rec, backend.classify(exc), f"{type(exc).__name__}: {exc}")
    return rec
