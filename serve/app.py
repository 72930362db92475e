"""Builds the Ray Serve application graph — the only place Ray Serve decorators are applied.

``import_path: serve.app:build_app`` (with ``args: {config: {...}}``) is what a RayService or
``serve run`` points at; ``ragtune up`` calls :func:`build_app` directly.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import RagtuneConfig
from cluster.models import resolve_model
from cluster.secret_files import apply_secret_files
from retrieval.retriever import Retriever
from serve.ingress import Ingress, LocalClient
from serve.llm import LLMServer, engine_env

__all__ = ["build_app"]


def _llm_deployment_class(max_adapters: int) -> type:
    """``LLMServer`` whose adapter cache is Ray Serve's multiplexed LRU.

    Requests carry ``multiplexed_model_id=name@version``, so the router prefers replicas that
    already hold the adapter; ``max_adapters`` matches vLLM's ``max_cpu_loras``.
    """

    class LLMDeployment(LLMServer):
        async def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            await self.start()

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, key: str):
            return await self.load_adapter(key)

    return LLMDeployment


class IngressDeployment(Ingress):
    """``Ingress`` with the hook ``serve.ingress()`` calls after construction."""

    def __serve_build_asgi_app__(self):
        return self.build_asgi_app()


class FusedDeployment(IngressDeployment):
    """API and engine in one replica: no handle hop between them (``serve.topology: fused``)."""

    async def __init__(self, cfg, model_path: str, retriever=None):
        self._server = LLMServer(cfg.engine, model_path, cfg.adapters.store_uri, max_tokens=cfg.limits.max_tokens)
        await self._server.start()
        super().__init__(cfg, model_path, LocalClient(self._server), retriever)

    async def check_health(self) -> None:
        await self._server.check_health()


def build_app(args: dict[str, Any] | RagtuneConfig | None = None) -> Application:
    """The application: Ingress (OpenAI API) → LLM deployment (vLLM + LoRA) and Retriever.

    Args:
        args: a ``RagtuneConfig``, or ``{"config": <config dict>, "secret_files": {...}}`` as
            Serve's ``args`` pass it (RayService): secrets — API-key digests, the Milvus token —
            are read from mounted files here, so they never appear in the RayService object.
    """
    if isinstance(args, RagtuneConfig):
        cfg = args
    else:
        args = args or {}
        cfg = RagtuneConfig.model_validate(apply_secret_files(args.get("config", {}), args.get("secret_files")))
    cfg = cfg.resolved()
    sc = cfg.serve
    model_path = resolve_model(sc.engine.model, cfg.models_dir)

    llm_opts = sc.llm.serve_options()
    if sc.topology == "fused":
        llm_opts |= sc.http_facing_options(sc.llm)
    llm_opts["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env(sc.engine)}
    retriever = None
    if sc.rag_enabled:
        retriever = serve.deployment(Retriever, name="Retriever", **sc.retriever.serve_options()).bind(cfg.retrieval)
    if sc.topology == "fused":
        fused = serve.deployment(serve.ingress()(FusedDeployment), name="LLMServer", **llm_opts)
        return fused.bind(sc, model_path, retriever)
    llm = serve.deployment(_llm_deployment_class(sc.engine.max_cpu_loras), name="LLMServer", **llm_opts)
    ingress = serve.deployment(serve.ingress()(IngressDeployment), name="Ingress",
                               **(sc.ingress.serve_options() | sc.http_facing_options(sc.ingress)))
    return ingress.bind(sc, model_path, llm.bind(sc.engine, model_path, sc.adapters.store_uri,
                                                 max_tokens=sc.limits.max_tokens), retriever)

