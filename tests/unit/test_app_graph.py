"""The application graph for each topology (built, not run: no Ray is started)."""

import pytest

from cluster.config import load_config
from serve.app import build_app


def _names(app) -> list[str]:
    root = app._bound_deployment
    children = [a._bound_deployment.name for a in root.init_args if hasattr(a, "_bound_deployment")]
    return [root.name, *children]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ["LLMServer", "Retriever"]),  # fused (the local default): API + engine in one deployment
        (["serve.topology=split"], ["Ingress", "LLMServer", "Retriever"]),
        (["serve.topology=split", "serve.rag_enabled=false"], ["Ingress", "LLMServer"]),
    ],
)
def test_topologies(tiny_model, overrides, expected):
    app = build_app(load_config(None, ["serve.engine.model=tiny-llama", *overrides]))
    assert _names(app) == expected


def test_llm_replica_gets_engine_env_and_gpus(tiny_model):
    cfg = load_config(None, ["serve.engine.model=tiny-llama", "serve.topology=split", "serve.engine.kv_cache_space_gib=2"])
    llm = build_app(cfg)._bound_deployment.init_args[2]._bound_deployment
    env = llm.ray_actor_options["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


@pytest.mark.parametrize(
    ("topology", "limit", "ongoing"),
    [("fused", 10, 64), ("fused", 1000, 1032), ("split", 10, 512), ("split", 1000, 1032)],
)
def test_http_facing_deployment_is_bounded_by_the_ingress_not_serve(tiny_model, topology, limit, ongoing):
    # Serve's own refusal is a plain-text 503 without Retry-After: the HTTP-facing replica has no
    # Serve queue bound; the ingress answers 429 itself, and 32 slots beyond its limit stay free for
    # health/metrics (never fewer than the deployment's own max_ongoing_requests: 64 llm, 512 ingress).
    cfg = load_config(None, ["serve.engine.model=tiny-llama", f"serve.topology={topology}",
                             f"serve.limits.max_concurrent_requests={limit}"])
    root = build_app(cfg)._bound_deployment
    assert root.name == ("LLMServer" if topology == "fused" else "Ingress")
    assert (root.max_ongoing_requests, root.max_queued_requests) == (ongoing, -1)
    inner = {a._bound_deployment.name: a._bound_deployment for a in root.init_args if hasattr(a, "_bound_deployment")}
    if topology == "split":  # the LLM deployment behind the handle keeps its own configured bounds
        assert (inner["LLMServer"].max_ongoing_requests, inner["LLMServer"].max_queued_requests) == (64, 256)
    assert (inner["Retriever"].max_ongoing_requests, inner["Retriever"].max_queued_requests) == (128, 512)


def test_fused_replica_gets_engine_env(tiny_model):
    root = build_app(load_config(None, ["serve.engine.model=tiny-llama"]))._bound_deployment
    assert root.ray_actor_options["runtime_env"]["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
