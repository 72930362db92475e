"""The OpenAI-compatible HTTP ingress (FastAPI), as a plain class.

Requests are parsed into **vLLM's own request models** and answered by vLLM's serving layer on
an LLM replica (``serve/llm.py``); this layer adds only what vLLM lacks: API keys and tenants,
adapters by ``name@version`` from the registry, ``rag`` with ``sources``, limits and per-adapter
metrics. ``Ingress.build_asgi_app`` returns the FastAPI app; ``serve/app.py`` wraps the class
with Ray Serve. The replica is reached through an ``LLMClient`` — a Ray ``DeploymentHandle``
(split topology), or the ``LLMServer`` object itself (fused topology, tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from cluster.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RagtuneError,
)
from serve.auth import Authenticator, Principal
from serve.body import check_json_body, parse_json
from serve.clients import HandleClient, LLMClient, LocalClient
from serve.config import ServeConfig
from serve.context import rag_prompt
from serve.errors import create_error_response, to_ragtune_error, vllm_error_response
from serve.hosts import LoopbackHostGuard
from serve.metrics import Metrics
from serve.protocol import Prelude, RagOptions, Route, created, new_id
from serve.rag import RetrieverClient, add_retrieval_routes, retrieve_context
from serve.registry import AdapterRegistry, open_registry
from serve.streams import Reply, StreamTap

__all__ = ["HandleClient", "Ingress", "LLMClient", "LocalClient"]

logger = logging.getLogger(__name__)


def _handle(_request: Request, exc: Exception) -> JSONResponse:
    return create_error_response(exc)


_HEALTH_TIMEOUT_S = 5.0


async def _probe(check: Any) -> str:
    """``"ok"`` if the health call returns within ``_HEALTH_TIMEOUT_S``, else ``"unavailable"``."""
    try:
        await asyncio.wait_for(check, _HEALTH_TIMEOUT_S)
    except Exception as exc:  # any failure is "down"; the type is enough for the log
        logger.warning("health probe failed: %s", type(exc).__name__)
        return "unavailable"
    return "ok"


async def _disabled() -> str:
    return "disabled"


def _is_handle(obj: Any) -> bool:
    from ray.serve.handle import DeploymentHandle

    return isinstance(obj, DeploymentHandle)


def _protocol():
    """vLLM's request models (imported lazily: the ingress module stays importable without vLLM)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest

    return {"chat": ChatCompletionRequest, "completion": CompletionRequest, "responses": ResponsesRequest,
            "tokenize": TokenizeRequest, "detokenize": DetokenizeRequest}


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


def _validated(model: Any, data: Any, prefix: str = "") -> Any:
    """``model.model_validate(data)`` with a 400 that names the first bad field."""
    from vllm.exceptions import VLLMClientError

    try:
        if isinstance(model, type):
            return model.model_validate(data)
        from pydantic import TypeAdapter

        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function-"))
        param = f"{prefix}{loc}" if loc else prefix.rstrip(".") or None
        raise InvalidRequestError(f"{param or 'body'}: {first.get('msg')}", param=param) from None
    except VLLMClientError as exc:  # vLLM's own validators (not ValueErrors, so pydantic passes them on)
        raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequestError(str(exc)) from None


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
        # Ray's own errors (a full replica queue, a dead actor) are answered here too: left to the
        # catch-all they are re-raised, and Serve replaces the answer with a plain-text 503.
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        for kind in (RagtuneError, RequestValidationError, HTTPException, json.JSONDecodeError, RayServeException,
                     RayError, Exception):
            app.add_exception_handler(kind, _handle)
        self._routes(app)
        if self.retriever is not None:
            add_retrieval_routes(app, self.retriever, self._principal)
        app.add_middleware(_BodyLimit, limit=self.cfg.limits.max_body_bytes)
        app.add_middleware(LoopbackHostGuard, enabled=self.auth.open)  # outermost: open mode answers loopback only
        return app

    def _routes(self, app: FastAPI) -> None:
        @app.get("/health")
        async def health() -> JSONResponse:
            # Engine down → 503 (nothing can be served); store down → 200 "degraded" (plain
            # completions still work, RAG requests fail). No detail beyond up/down: unauthenticated.
            engine, store = await asyncio.gather(
                _probe(self.llm.engine_health()),
                _probe(self.retriever.call("check_health")) if self.retriever is not None else _disabled())
            status = "error" if engine != "ok" else "ok" if store in ("ok", "disabled") else "degraded"
            body = {"status": status, "model": self.base, "engine": engine, "store": store}
            return JSONResponse(body, status_code=503 if status == "error" else 200)

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            self._admin(request)
            engine = await self.llm.engine_metrics()
            return Response(self.metrics.render() + engine, media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            return {"object": "list", "data": self._models(self._principal(request))}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request) -> dict:
            for card in self._models(self._principal(request)):
                if card["id"] == model_id:
                    return card
            raise NotFoundError(f"The model `{model_id}` does not exist.", param="model", code="model_not_found")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._generate("chat", request)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._generate("completion", request)

        @app.post("/v1/responses")
        async def responses(request: Request) -> Response:
            return await self._generate("responses", request)

        @app.post("/tokenize")
        async def tokenize(request: Request) -> Response:
            return await self._tokenizer("tokenize", request)

        @app.post("/detokenize")
        async def detokenize(request: Request) -> Response:
            return await self._tokenizer("detokenize", request)

        self._adapter_routes(app)

    def _adapter_routes(self, app: FastAPI) -> None:
        @app.get("/v1/adapters")
        async def list_adapters(request: Request) -> dict:
            return {"object": "list", "data": self.registry.list(self._principal(request).scope)}

        # Management acts (load, promote, roll back): the owner or an admin; shared adapters admin
        # only (403); another tenant's adapter is a 404 (AdapterRegistry.managed).
        @app.post("/v1/adapters/{name}/load")
        async def load(name: str, request: Request) -> dict:
            ref = self.registry.managed(name, self._principal(request).scope)
            await self.llm.load_adapter(ref.key)
            return {"loaded": ref.key}

        @app.post("/v1/adapters/{name}/promote", dependencies=[Depends(check_json_body)])
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

    def _admin(self, request: Request) -> Principal:
        principal = self._principal(request)
        if not principal.admin:
            raise AuthenticationError("This endpoint needs an admin API key.", code="admin_required")
        return principal

    # ---- models --------------------------------------------------------------------------
    def _models(self, principal: Principal) -> list[dict]:
        now = created()
        data = [{"id": self.base, "object": "model", "created": now, "owned_by": "ragtune", "root": self.base,
                 "parent": None, "max_model_len": self.cfg.engine.max_model_len}]
        for adapter in self.registry.list(principal.scope):
            data.append({"id": adapter["name"], "object": "model", "created": now,
                         "owned_by": adapter["owner"] or "shared", "root": adapter["name"], "parent": self.base,
                         "max_model_len": self.cfg.engine.max_model_len,
                         "promoted_version": adapter["promoted"], "versions": sorted(map(int, adapter["versions"]))})
        return data

    # ---- requests ------------------------------------------------------------------------
    def _route(self, kind: str, model: Any, principal: Principal) -> Route:
        """Resolve ``model`` (base, adapter, ``name@version``) for this caller: unknown → 404."""
        if model is not None and not isinstance(model, str):
            raise InvalidRequestError("model must be a string", param="model")
        if model is None or model == self.base:
            return Route(request_id=new_id())
        return Route(request_id=new_id(), adapter=self.registry.resolve(model, principal.scope).key)

    def _check_limits(self, req: Any) -> None:
        """Operator caps, stated in the error (never a silent cut)."""
        limits = self.cfg.limits
        asked = getattr(req, "max_completion_tokens", None) or getattr(req, "max_tokens", None) \
            or getattr(req, "max_output_tokens", None)
        if limits.max_tokens is not None and asked is not None and asked > limits.max_tokens:
            raise InvalidRequestError(f"max_tokens={asked} exceeds this server's limit of {limits.max_tokens}",
                                      param="max_tokens")
        if (getattr(req, "n", 1) or 1) > limits.max_n:
            raise InvalidRequestError(f"n={req.n} exceeds this server's limit of {limits.max_n}", param="n")
        # vLLM scans every stop string against the output at each step (limits.max_stop_strings/_chars).
        stop = getattr(req, "stop", None) or []
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > limits.max_stop_strings or any(len(s) > limits.max_stop_chars for s in stop):
            raise InvalidRequestError(f"stop: at most {limits.max_stop_strings} stop strings of at most "
                                      f"{limits.max_stop_chars} characters each (got {len(stop)}, "
                                      f"longest {max(map(len, stop))})", param="stop")

    async def _read(self, request: Request) -> dict:
        data = parse_json(await request.body())
        if not isinstance(data, dict):
            raise InvalidRequestError("Request body must be a JSON object.", code="invalid_json")
        return data

    async def _tokenizer(self, kind: str, request: Request) -> Response:
        principal = self._principal(request)
        data = await self._read(request)
        route = self._route(kind, data.get("model"), principal)
        req = _validated(_protocol()[kind], data)
        call = self.llm.tokenize if kind == "tokenize" else self.llm.detokenize
        return _json(await call(req, route))

    async def _generate(self, kind: str, request: Request) -> Response:
        t0 = time.perf_counter()  # TTFT/e2e are measured from arrival, retrieval included
        if self._inflight >= self.cfg.limits.max_concurrent_requests:
            self._count_failure(kind, 429)
            raise OverloadedError("Too many requests in flight; retry later.", retry_after=self.cfg.limits.retry_after_s)
        # The slot is taken before the first await: checked and counted later, 40 requests
        # arriving together all passed a limit of 8 (measured).
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            principal = self._principal(request)
            data = await self._read(request)
            rag_field = data.pop("rag", None)
            rag = _validated(RagOptions, rag_field, "rag.") if rag_field is not None else None
            route = self._route(kind, data.get("model"), principal)
            req = _validated(_protocol()[kind], data)
            self._check_limits(req)
            # Per-tenant prefix cache: one tenant can neither reuse nor time another's cached prompts.
            req.cache_salt = self.auth.cache_salt(principal, req.cache_salt)
            sources = await self._retrieve(rag, req, route, principal)
        except BaseException as exc:
            self._done()
            self._count_failure(kind, to_ragtune_error(exc).status)
            raise
        label = data["model"].partition("@")[0] if route.adapter else self.base
        logger.info("request %s %s model=%s stream=%s rag=%s", route.request_id, kind, route.adapter or self.base,
                    bool(req.stream), rag is not None)
        reply = Reply(self.metrics, kind, label, t0, sources, self._done)
        tap = StreamTap.prepare(req)  # usage is always measured, shown only if the client asked
        try:
            call = {"chat": self.llm.chat, "completion": self.llm.completions, "responses": self.llm.responses}[kind]
            stream = call(req, route)
            first = await stream.__anext__()
            if not isinstance(first, Prelude):
                reply.finish(first)  # an error before generation: right status, no stream
                return _json(first)
            reply.context_used(first.context_used)
            if req.stream:
                return StreamingResponse(reply.sse(stream, tap), media_type="text/event-stream")
            return JSONResponse(await reply.collect(stream))
        except Exception as exc:
            reply.finish(exc)
            # Typed here, not in Starlette's last-resort handler: that one re-raises, and Ray
            # Serve then answers a downstream BackPressureError with its own plain-text 503.
            raise to_ragtune_error(exc, route.request_id) from None
        except BaseException as exc:  # cancelled: the client is gone
            reply.finish(exc)
            raise

    async def _retrieve(self, rag: RagOptions | None, req: Any, route: Route, principal: Principal) -> list[dict] | None:
        """RAG: fetch chunks for the request and hand their text to the replica (it fits them)."""
        if rag is None:
            return None
        if not hasattr(req, "messages") and not hasattr(req, "prompt"):
            raise InvalidRequestError("rag is supported on /v1/chat/completions and /v1/completions", param="rag")
        if self.retriever is None:
            raise InvalidRequestError("retrieval is not enabled on this server", param="rag")
        start = time.perf_counter()
        sources = await retrieve_context(self.retriever, rag, _query(req), principal.owner)
        self.metrics.retrieval.labels(rag.mode).observe(time.perf_counter() - start)
        route.context = [s["text"] for s in sources]
        return sources

    def _count_failure(self, endpoint: str, status: int) -> None:
        # Unresolved model names are client input: never a label (unbounded cardinality).
        self.metrics.requests.labels(endpoint, "(unresolved)", str(status)).inc()
        self.metrics.errors.labels(endpoint, str(status)).inc()

    def _done(self) -> None:
        self._inflight -= 1
        self.metrics.inflight.dec()


def _json(answer: Any) -> Response:
    """A vLLM answer (response model or ``ErrorResponse``) or our typed error, as HTTP."""
    if isinstance(answer, BaseException):
        raise answer
    error = vllm_error_response(answer)
    if error is not None:
        return error
    return JSONResponse(answer.model_dump())


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _query(req: Any) -> str:
    """What to search for: the last user message of a chat, or the completion prompt."""
    messages = getattr(req, "messages", None)
    if messages is None:
        return rag_prompt(req.prompt)
    users = [_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else _text(messages[-1].get("content") if isinstance(messages[-1], dict) else "")
