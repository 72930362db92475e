"""How the ingress reaches an LLM replica: vLLM request objects in, vLLM answers out.

Split topology: a Ray Serve ``DeploymentHandle`` (``multiplexed_model_id`` routes a request to a
replica that already holds its adapter). Fused topology and tests: the ``LLMServer`` object.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve.protocol import Route

__all__ = ["HandleClient", "LLMClient", "LocalClient"]


class LLMClient(Protocol):
    """How the ingress talks to an LLM replica (vLLM request objects in, vLLM answers out)."""

    def chat(self, request: Any, route: Route) -> AsyncIterator[Any]: ...

    def completions(self, request: Any, route: Route) -> AsyncIterator[Any]: ...

    def responses(self, request: Any, route: Route) -> AsyncIterator[Any]: ...

    async def tokenize(self, request: Any, route: Route) -> Any: ...

    async def detokenize(self, request: Any, route: Route) -> Any: ...

    async def load_adapter(self, key: str) -> None: ...

    async def engine_metrics(self) -> bytes: ...

    async def engine_health(self) -> None: ...


class HandleClient:
    """Through a Ray Serve handle; ``multiplexed_model_id`` routes to replicas holding the adapter."""

    def __init__(self, handle: Any):
        self._handle = handle

    def _to(self, route: Route | None = None, stream: bool = False):
        return self._handle.options(stream=stream, multiplexed_model_id=(route.adapter if route else None) or "")

    def chat(self, request: Any, route: Route) -> AsyncIterator[Any]:
        return self._to(route, stream=True).chat.remote(request, route)

    def completions(self, request: Any, route: Route) -> AsyncIterator[Any]:
        return self._to(route, stream=True).completions.remote(request, route)

    def responses(self, request: Any, route: Route) -> AsyncIterator[Any]:
        return self._to(route, stream=True).responses.remote(request, route)

    async def tokenize(self, request: Any, route: Route) -> Any:
        return await self._to(route).tokenize.remote(request, route)

    async def detokenize(self, request: Any, route: Route) -> Any:
        return await self._to(route).detokenize.remote(request, route)

    async def load_adapter(self, key: str) -> None:
        await self._handle.options(multiplexed_model_id=key).get_adapter.remote(key)

    async def engine_metrics(self) -> bytes:
        return await self._to().engine_metrics.remote()

    async def engine_health(self) -> None:
        await self._to().engine_health.remote()


class LocalClient:
    """In-process (fused topology, unit tests): calls the server object directly."""

    def __init__(self, server: Any):
        self._server = server

    def chat(self, request: Any, route: Route) -> AsyncIterator[Any]:
        return self._server.chat(request, route)

    def completions(self, request: Any, route: Route) -> AsyncIterator[Any]:
        return self._server.completions(request, route)

    def responses(self, request: Any, route: Route) -> AsyncIterator[Any]:
        return self._server.responses(request, route)

    async def tokenize(self, request: Any, route: Route) -> Any:
        return await self._server.tokenize(request, route)

    async def detokenize(self, request: Any, route: Route) -> Any:
        return await self._server.detokenize(request, route)

    async def load_adapter(self, key: str) -> None:
        await self._server.get_adapter(key)

    async def engine_metrics(self) -> bytes:
        return self._server.engine_metrics()

    async def engine_health(self) -> None:
        await self._server.engine_health()
