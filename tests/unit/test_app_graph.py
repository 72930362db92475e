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
