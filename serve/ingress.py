"""The OpenAI-compatible HTTP ingress (FastAPI), as a plain class.

``Ingress.build_asgi_app`` returns the FastAPI app; ``serve/app.py`` wraps the class with Ray
Serve (``serve.ingress()`` + ``__serve_build_asgi_app__``). The LLM replica is reached through an
``LLMClient`` — a Ray ``DeploymentHandle`` in production, the ``LLMServer`` itself in tests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cluster.errors import AuthenticationError, InvalidRequestError, OverloadedError, RagtuneError
from serve.auth import Authenticator, Principal
from serve.config import ServeConfig
from serve.errors import create_error_response, to_ragtune_error
from serve.llm import GenerationRequest
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest, created, new_id
from serve.rag import RetrieverClient, add_retrieval_routes, rag_query, retrieve_context
from serve.registry import AdapterRegistry, open_registry

__all__ = ["HandleClient", "Ingress", "LLMClient", "LocalClient"]

logger = logging.getLogger(__name__)


class LLMClient(Protocol):
    """How the ingress talks to an LLM replica."""

    def stream(self, req: GenerationRequest) -> AsyncIterator[dict]: ...

    async def load_adapter(self, key: str) -> None: ...


class HandleClient:
    """Through a Ray Serve handle; ``multiplexed_model_id`` routes to replicas holding the adapter."""

    def __init__(self, handle: Any):
        self._handle = handle

    def stream(self, req: GenerationRequest) -> AsyncIterator[dict]:
        return self._handle.options(stream=True, multiplexed_model_id=req.adapter or "").generate.remote(req)

    async def load_adapter(self, key: str) -> None:
        await self._handle.options(multiplexed_model_id=key).get_adapter.remote(key)


class LocalClient:
    """In-process (unit tests, single-process tools): calls the server object directly."""

    def __init__(self, server: Any):
        self._server = server

    def stream(self, req: GenerationRequest) -> AsyncIterator[dict]:
        return self._server.generate(req)

    async def load_adapter(self, key: str) -> None:
        await self._server.get_adapter(key)


def _handle(_request: Request, exc: Exception) -> JSONResponse:
    return create_error_response(exc)


def _is_handle(obj: Any) -> bool:
    from ray.serve.handle import DeploymentHandle

    return isinstance(obj, DeploymentHandle)


class _PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with a 413 (counts streamed bodies too)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"Request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, scope, receive, send):
        err = InvalidRequestError(f"Request body exceeds the limit of {self.limit} bytes.", code="body_too_large")
        response = JSONResponse(err.to_dict(), status_code=413)
        await response(scope, receive, send)


class Ingress:
    """OpenAI API over one LLM deployment and the adapter registry."""

    def __init__(self, cfg: ServeConfig, model_path: str, llm: Any, retriever: Any = None):
        self.cfg = cfg
        self.base = cfg.engine.base_name
        self.auth = Authenticator(cfg.auth)
        self.metrics = Metrics()
        self.registry: AdapterRegistry = open_registry(
            cfg.adapters.store_uri, base_model=self.base, base_model_path=model_path,
            max_lora_rank=cfg.engine.max_lora_rank,
        )
        self.llm: LLMClient = HandleClient(llm) if _is_handle(llm) else llm
        self.retriever = RetrieverClient(retriever, remote=_is_handle(retriever)) if retriever is not None else None
        self._inflight = 0

    # ---- app -----------------------------------------------------------------------------
    def build_asgi_app(self) -> FastAPI:
        """The FastAPI app with every route and error handler."""
        app = FastAPI(title="ragtune", docs_url=None, redoc_url=None)
        # Typed and client errors are answered without a traceback in the logs; only unknown
        # exceptions reach the catch-all (Starlette re-raises those so they get logged).
        for kind in (RagtuneError, RequestValidationError, HTTPException, json.JSONDecodeError, Exception):
            app.add_exception_handler(kind, _handle)
        self._routes(app)
        if self.retriever is not None:
            add_retrieval_routes(app, self.retriever, self._tenant)
        app.add_middleware(_BodyLimit, limit=self.cfg.limits.max_body_bytes)
        return app

    def _routes(self, app: FastAPI) -> None:
        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok", "model": self.base}

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            self._admin(request)
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            return {"object": "list", "data": self._models(self._principal(request))}

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Response:
            return await self._generate("chat", body, self._principal(request))

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            return await self._generate("completion", body, self._principal(request))

        self._adapter_routes(app)

    def _adapter_routes(self, app: FastAPI) -> None:
        @app.get("/v1/adapters")
        async def list_adapters(request: Request) -> dict:
            return {"object": "list", "data": self.registry.list(self._principal(request).scope)}

        @app.post("/v1/adapters/{name}/load")
        async def load(name: str, request: Request) -> dict:
            ref = self.registry.resolve(name, self._principal(request).scope)
            await self.llm.load_adapter(ref.key)
            return {"loaded": ref.key}

        @app.post("/v1/adapters/{name}/promote")
        async def promote(name: str, body: _PromoteBody, request: Request) -> dict:
            ref = self.registry.promote(name, body.version, self._principal(request).scope)
            logger.info("adapter %s promoted to v%d", name, ref.version)
            return {"name": name, "promoted": ref.version}

        @app.post("/v1/adapters/{name}/rollback")
        async def rollback(name: str, request: Request) -> dict:
            ref = self.registry.rollback(name, self._principal(request).scope)
            logger.info("adapter %s rolled back to v%d", name, ref.version)
            return {"name": name, "promoted": ref.version}

    # ---- auth ----------------------------------------------------------------------------
    def _principal(self, request: Request) -> Principal:
        return self.auth.authenticate(request.headers.get("authorization"))

    def _tenant(self, request: Request) -> str:
        """The tenant that owns collections written by this caller ("local" in open mode)."""
        return self._principal(request).owner

    def _admin(self, request: Request) -> Principal:
        principal = self._principal(request)
        if not principal.admin:
            raise AuthenticationError("This endpoint needs an admin API key.", code="admin_required")
        return principal

    # ---- models --------------------------------------------------------------------------
    def _models(self, principal: Principal) -> list[dict]:
        now = created()
        data = [{"id": self.base, "object": "model", "created": now, "owned_by": "ragtune", "parent": None,
                 "max_model_len": self.cfg.engine.max_model_len}]
        for adapter in self.registry.list(principal.scope):
            data.append({"id": adapter["name"], "object": "model", "created": now,
                         "owned_by": adapter["owner"] or "shared", "parent": self.base,
                         "promoted_version": adapter["promoted"], "versions": sorted(map(int, adapter["versions"]))})
        return data

    # ---- generation ----------------------------------------------------------------------
    def _request(self, kind: str, body: ChatCompletionRequest | CompletionRequest, principal: Principal) -> GenerationRequest:
        limits = self.cfg.limits
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
            raise InvalidRequestError(f"max_tokens={body.max_tokens} exceeds this server's limit of {limits.max_tokens}", param="max_tokens")
        if body.n > limits.max_n:
            raise InvalidRequestError(f"n={body.n} exceeds this server's limit of {limits.max_n}", param="n")
        if body.rag is not None and self.retriever is None:
            raise InvalidRequestError("retrieval is not enabled on this server", param="rag")
        adapter = None if body.model == self.base else self.registry.resolve(body.model, principal.scope).key
        return GenerationRequest(
            request_id=new_id("chatcmpl" if kind == "chat" else "cmpl"),
            sampling=body.sampling(body.max_tokens),
            stream=body.stream,
            messages=[{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
            if kind == "chat" else None,
            prompt=body.prompt if kind == "completion" else None,
            adapter=adapter,
            default_max_tokens=limits.default_max_tokens,
        )

    async def _generate(self, kind: str, body, principal: Principal) -> Response:
        t0 = time.perf_counter()  # TTFT/e2e are measured from arrival, retrieval included
        if self._inflight >= self.cfg.limits.max_concurrent_requests:
            self._count_failure(kind, 429)
            raise OverloadedError("Too many requests in flight; retry later.", retry_after=self.cfg.limits.retry_after_s)
        try:
            req = self._request(kind, body, principal)
            sources = await self._retrieve(body, req, principal)
        except BaseException as exc:
            self._count_failure(kind, to_ragtune_error(exc).status)
            raise
        run = _Run(self, kind, body, req, body.model.partition("@")[0], sources, t0)
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            await run.start()
        except BaseException as exc:
            run.finish(to_ragtune_error(exc, req.request_id).status)
            raise
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream")
        return JSONResponse(await run.collect())

    async def _retrieve(self, body, req: GenerationRequest, principal: Principal) -> list[dict] | None:
        """RAG: fetch chunks for the request and hand their text to the LLM (it fits them)."""
        if body.rag is None:
            return None
        query = rag_query(req.messages, req.prompt)
        sources = await retrieve_context(self.retriever, body.rag, query, principal.owner)
        req.context_chunks = [s["text"] for s in sources]
        return sources

    def _count_failure(self, endpoint: str, status: int) -> None:
        # Unresolved model names are client input: never a label (unbounded cardinality).
        self.metrics.requests.labels(endpoint, "(unresolved)", str(status)).inc()
        self.metrics.errors.labels(endpoint, str(status)).inc()

    def _done(self) -> None:
        self._inflight -= 1
        self.metrics.inflight.dec()


class _Run:
    """One generation request from the first engine item to the last byte sent."""

    def __init__(self, ingress: Ingress, kind: str, body, req: GenerationRequest, label: str,
                 sources: list[dict] | None, t0: float):
        self.ingress, self.kind, self.body, self.req, self.label = ingress, kind, body, req, label
        self.sources = sources
        self.rag: dict | None = None
        self.t0 = t0
        self.last: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._finished = False

    async def start(self) -> None:
        self.stream = self.ingress.llm.stream(self.req)
        first = await self.stream.__anext__()  # validation errors surface here, before any byte
        if "error" in first:
            raise first["error"]
        self.prompt_tokens = first["prompt_tokens"]
        if self.sources is not None:
            used = first["context_chunks_used"]
            self.rag = {"chunks_retrieved": len(self.sources), "chunks_used": used,
                        "chunks_dropped": len(self.sources) - used}
            self.sources = self.sources[:used]  # only what the model actually saw
        logger.info("request %s model=%s prompt_tokens=%d", self.req.request_id, self.label, self.prompt_tokens)

    def _observe(self, choices: list[dict]) -> None:
        if not any(c["tokens"] for c in choices):
            return
        now, m = time.perf_counter(), self.ingress.metrics
        (m.itl if self.last is not None else m.ttft).labels(self.label).observe(now - (self.last or self.t0))
        self.last = now
        self.completion_tokens += sum(c["tokens"] for c in choices)

    def finish(self, status: int) -> None:
        if self._finished:
            return
        self._finished = True
        m, endpoint = self.ingress.metrics, self.kind
        m.requests.labels(endpoint, self.label, str(status)).inc()
        if status >= 400:
            m.errors.labels(endpoint, str(status)).inc()
        else:
            m.e2e.labels(self.label).observe(time.perf_counter() - self.t0)
            m.prompt_tokens.labels(self.label).inc(self.prompt_tokens)
            m.completion_tokens.labels(self.label).inc(self.completion_tokens)
        self.ingress._done()

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def collect(self) -> dict:
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str | None] = {}
        try:
            async for item in self.stream:
                self._observe(item["choices"])
                for c in item["choices"]:
                    texts.setdefault(c["index"], []).append(c["text"])
                    reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
        except BaseException as exc:
            self.finish(to_ragtune_error(exc, self.req.request_id).status)
            raise
        self.finish(200)
        choices = [self._choice(i, "".join(texts[i]), reasons.get(i)) for i in sorted(texts)]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        out = {"id": self.req.request_id, "object": obj, "created": created(), "model": self.body.model,
               "choices": choices, "usage": self.usage()}
        return out | self._rag_fields()

    def _rag_fields(self) -> dict:
        return {"sources": self.sources, "rag": self.rag} if self.sources is not None else {}

    def _choice(self, index: int, text: str, reason: str | None) -> dict:
        if self.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def _chunk(self, choices: list[dict], usage: dict | None = None, extra: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        payload = {"id": self.req.request_id, "object": obj, "created": created(), "model": self.body.model,
                   "choices": choices, **(extra or {})}
        if self.body.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def _delta(self, c: dict, first: bool) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": c["text"]} if first else {"content": c["text"]}
            return {"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": c["finish_reason"]}
        return {"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}

    async def sse(self) -> AsyncIterator[str]:
        started: set[int] = set()
        status = 200
        try:
            async for item in self.stream:
                self._observe(item["choices"])
                deltas = [self._delta(c, c["index"] not in started) for c in item["choices"]]
                extra = self._rag_fields() if not started else {}  # sources ride on the first chunk
                started.update(c["index"] for c in item["choices"])
                if deltas:
                    yield self._chunk(deltas, extra=extra)
            if self.body.include_usage:
                yield self._chunk([], self.usage())
        except Exception as exc:  # mid-stream: the status line is gone, so report in-band
            err = to_ragtune_error(exc, self.req.request_id)
            status = err.status
            yield f"data: {json.dumps(err.to_dict())}\n\n"
        finally:
            self.finish(status)
        yield "data: [DONE]\n\n"
