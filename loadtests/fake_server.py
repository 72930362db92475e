"""A fake OpenAI-compatible streaming server: the test target and the overhead-measurement target.

A raw asyncio HTTP/1.1 server (keep-alive, chunked SSE), not FastAPI: it has to out-run the load
generator on one core, so it does no framework work per request. With zero delays it writes a
whole response in one ``write`` call.

Behaviour is injected through :class:`FakeServerConfig`: time to first token, per-token delay,
output length, error statuses, a mid-stream abort, a non-streaming mode and a missing ``usage``.

In-process (tests)::

    with FakeServer(FakeServerConfig(ttft_s=0.05)) as server:
        run(server.url)

As its own process (overhead measurement; prints ``READY <url>`` once listening)::

    .venv/bin/python -m loadtests.fake_server --port 0 --output-tokens 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["FakeServer", "FakeServerConfig", "FakeStats", "main"]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class FakeServerConfig:
    """What the fake server does with every request.

    Attributes:
        ttft_s: Delay before the first content token, seconds (after the empty role chunk).
        itl_s: Delay between consecutive content tokens, seconds.
        output_tokens: Tokens per response; ``None`` means the request's ``max_tokens`` (else 16).
        rag_extra_ttft_s: Added to ``ttft_s`` when the request carries a ``rag`` field.
        error_every: Every N-th request (1-based counter) fails with ``error_status``; 0 = never.
        error_status: HTTP status of injected errors.
        abort_after_tokens: Close the connection after this many tokens (no ``[DONE]``).
        stream: ``False`` answers with a plain JSON completion even when ``stream=true``.
        include_usage: ``False`` omits the final usage chunk.
        model_errors: Model name → HTTP status, e.g. ``{"missing": 404}``.
        max_concurrent: Streams served at once (more wait for a slot before their TTFT starts), so
            throughput saturates like a real server's: a knee. ``None`` = unlimited.
    """

    ttft_s: float = 0.0
    itl_s: float = 0.0
    output_tokens: int | None = None
    rag_extra_ttft_s: float = 0.0
    error_every: int = 0
    error_status: int = 503
    abort_after_tokens: int | None = None
    stream: bool = True
    include_usage: bool = True
    model_errors: dict[str, int] = field(default_factory=dict)
    max_concurrent: int | None = None


@dataclass
class FakeStats:
    """What the server saw: connections, requests (in total, at once, per model, with ``rag``), errors."""

    requests: int = 0
    connections: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_model: Counter = field(default_factory=Counter)
    rag: int = 0
    errors: Counter = field(default_factory=Counter)
    bodies: list = field(default_factory=list)
    keep_bodies: bool = False


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: dict | str) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return _chunk(b"data: " + payload.encode() + b"\n\n")


def _head(status: int, ctype: str, length: int | None = None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    reason = _REASONS.get(status, "Error")
    return f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\n{framing}\r\n\r\n".encode()


def _json_response(status: int, obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return _head(status, "application/json", len(body)) + body


def _error(status: int, message: str) -> bytes:
    return _json_response(status, {"error": {"message": message, "type": "fake_error",
                                             "param": None, "code": status}})


class _Responder:
    """Builds the SSE events of one completion (chat or text) for one request body."""

    def __init__(self, body: dict, chat: bool, n_tokens: int):
        self.chat, self.n, self.model = chat, n_tokens, body.get("model", "fake")
        prompt = body.get("prompt") if not chat else " ".join(
            str(m.get("content", "")) for m in body.get("messages", []))
        self.prompt_tokens = max(1, len(str(prompt or "").split()))
        self.kind = "chat.completion.chunk" if chat else "text_completion"

    def _base(self, choices: list) -> dict:
        return {"id": "fake-1", "object": self.kind, "created": 0, "model": self.model,
                "choices": choices}

    def role(self) -> bytes:
        return _event(self._base([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}])) if self.chat else b""

    def token(self, i: int) -> bytes:
        finish = "length" if i == self.n - 1 else None
        choice = ({"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": f"tok{i} ", "finish_reason": finish})
        return _event(self._base([choice]))

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.n,
                "total_tokens": self.prompt_tokens + self.n}

    def tail(self, include_usage: bool) -> bytes:
        usage = _event(dict(self._base([]), usage=self.usage())) if include_usage else b""
        return usage + _event("[DONE]") + b"0\r\n\r\n"

    def whole(self) -> bytes:
        text = "".join(f"tok{i} " for i in range(self.n))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if self.chat else {"index": 0, "text": text, "finish_reason": "length"})
        return _json_response(200, dict(self._base([choice]), usage=self.usage()))


class _Protocol(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests and answers them in order."""

    def __init__(self, server: FakeServer):
        self.server, self.buf, self.transport = server, b"", None
        self.busy: asyncio.Task | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.stats.connections += 1

    def connection_lost(self, exc):
        if self.busy is not None:
            self.busy.cancel()

    def data_received(self, data: bytes):
        self.buf += data
        if self.busy is None:
            self._drain()

    def _drain(self):
        while self.busy is None:
            request = self._parse()
            if request is None:
                return
            self.busy = self.server.handle(self, *request)

    def _parse(self) -> tuple[str, str, bytes] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buf[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buf) < end + 4 + length:
            return None
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        method, path = head[0].split(" ")[:2]
        return method, path, body

    def done(self):
        self.busy = None
        if self.buf and not self.transport.is_closing():
            self._drain()


class FakeServer:
    """The fake server; runs on its own event loop in a daemon thread (or via :func:`serve`)."""

    def __init__(self, config: FakeServerConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or FakeServerConfig()
        self.stats = FakeStats()
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (append ``/v1/...``)."""
        return f"http://{self.host}:{self.port}"

    async def serve(self) -> None:
        """Start listening on the running loop; sets :attr:`port` (for port 0)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Protocol(self), self.host, self.port,
                                                      backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> FakeServer:
        """Start in a daemon thread with its own event loop; returns once listening."""
        ready = threading.Event()

        def run():
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start within 10 s")
        return self

    def stop(self) -> None:
        """Stop the thread started by :meth:`start`."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def handle(self, proto: _Protocol, method: str, path: str, raw: bytes) -> asyncio.Task | None:
        """Answer one request; returns a task when the answer is delayed, else ``None``."""
        if method == "GET" and path.rstrip("/") in ("/health", "/v1/models"):
            proto.transport.write(_json_response(200, {"object": "list", "data": [{"id": "fake"}]}))
            return None
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            proto.transport.write(_error(404, f"no route {method} {path}"))
            return None
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            proto.transport.write(_error(400, "body is not JSON"))
            return None
        status = self._count(body)
        if status is not None:
            proto.transport.write(_error(status, f"injected error {status}"))
            return None
        responder = _Responder(body, path.endswith("chat/completions"), self._n_tokens(body))
        if not self.config.stream or not body.get("stream"):
            proto.transport.write(responder.whole())
            return None
        ttft = self.config.ttft_s + (self.config.rag_extra_ttft_s if body.get("rag") else 0.0)
        if not (ttft or self.config.itl_s or self.config.max_concurrent or self.config.abort_after_tokens):
            proto.transport.write(self._whole_stream(responder, body))
            return None
        return asyncio.ensure_future(self._stream(proto, responder, body, ttft))

    def _count(self, body: dict) -> int | None:
        stats, cfg = self.stats, self.config
        stats.requests += 1
        stats.by_model[body.get("model")] += 1
        stats.rag += bool(body.get("rag"))
        if stats.keep_bodies:
            stats.bodies.append(body)
        status = cfg.model_errors.get(body.get("model"))
        if status is None and cfg.error_every and stats.requests % cfg.error_every == 0:
            status = cfg.error_status
        if status is not None:
            stats.errors[status] += 1
        return status

    def _n_tokens(self, body: dict) -> int:
        if self.config.output_tokens is not None:
            return self.config.output_tokens
        return int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)

    def _whole_stream(self, r: _Responder, body: dict) -> bytes:
        parts = [_head(200, "text/event-stream"), r.role()]
        parts += [r.token(i) for i in range(r.n)]
        parts.append(r.tail(self._wants_usage(body)))
        return b"".join(parts)

    def _wants_usage(self, body: dict) -> bool:
        return self.config.include_usage and bool((body.get("stream_options") or {}).get("include_usage"))

    async def _stream(self, proto: _Protocol, r: _Responder, body: dict, ttft: float) -> None:
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            proto.transport.write(_head(200, "text/event-stream") + r.role())
            if self._slots is None and self.config.max_concurrent:
                self._slots = asyncio.Semaphore(self.config.max_concurrent)
            async with self._slots or contextlib.nullcontext():
                complete = await self._tokens(proto, r, body, ttft)
        except asyncio.CancelledError:
            return
        finally:
            stats.in_flight -= 1
        if complete:
            proto.done()

    async def _tokens(self, proto: _Protocol, r: _Responder, body: dict, ttft: float) -> bool:
        """Stream the tokens; ``False`` when the configured abort closed the connection."""
        await asyncio.sleep(ttft)
        for i in range(r.n):
            if i == self.config.abort_after_tokens:
                proto.transport.close()
                return False
            if i:
                await asyncio.sleep(self.config.itl_s)
            proto.transport.write(r.token(i))
        proto.transport.write(r.tail(self._wants_usage(body)))
        return True


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # a faster loop when present; the server works without it
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fake OpenAI-compatible streaming server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--output-tokens", type=int, default=None)
    p.add_argument("--error-every", type=int, default=0)
    p.add_argument("--error-status", type=int, default=503)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the fake server in the foreground until killed; prints ``READY <url>`` once listening."""
    args = _parse_args(argv)
    config = FakeServerConfig(ttft_s=args.ttft_ms / 1000, itl_s=args.itl_ms / 1000,
                              output_tokens=args.output_tokens, error_every=args.error_every,
                              error_status=args.error_status)
    server = FakeServer(config, args.host, args.port)
    loop = _new_loop()
    loop.run_until_complete(server.serve())
    print(f"READY {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_forever()


if __name__ == "__main__":
    main()
