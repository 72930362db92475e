"""One session-scoped server on the tiny model, shared by the integration tests."""

from __future__ import annotations

import json

import pytest

from cluster.processes import RagtuneServer
from serve.config import hash_key
from serve.registry import open_registry
from tests.conftest import MODELS, free_port

KEYS = {"admin-key": ("ops", True), "acme-key": ("acme", False), "globex-key": ("globex", False)}


@pytest.fixture(scope="session")
def store(tmp_path_factory, tiny_model, adapter_dirs):
    """The adapter store the server reads; tests register more adapters into it while it runs."""
    root = tmp_path_factory.mktemp("store")
    registry = open_registry(str(root), base_model="tiny-llama", base_model_path=str(tiny_model))
    registry.register(adapter_dirs["alpha"], "alpha")
    registry.register(adapter_dirs["beta"], "beta")
    registry.register(adapter_dirs["gamma"], "acme-bot", owner="acme")
    return registry


@pytest.fixture(scope="session")
def server(tmp_path_factory, store):
    config = {
        "data_dir": str(MODELS.parent),
        "ray": {"dashboard_port": free_port(), "num_cpus": 2},
        # A Lite file → `ragtune serve` runs milvus-lite's server mode on this loopback port.
        "retrieval": {"milvus": {"uri": str(tmp_path_factory.mktemp("milvus") / "kb.db")}},
        "milvus_lite": {"port": free_port()},
        "serve": {
            "http": {"host": "127.0.0.1", "port": free_port()},
            # split: Ingress → LLMServer over a handle with adapter multiplexing (the cluster layout);
            # the e2e test runs the local default, fused.
            "topology": "split",
            "engine": {"model": "tiny-llama", "max_model_len": 512, "max_loras": 2, "max_lora_rank": 16,
                       # A random model pads JSON with whitespace forever; compact JSON makes the
                       # grammar-constrained tests (structured outputs, tools) end within max_tokens.
                       "extra_args": {"structured_outputs_config": {"backend": "xgrammar",
                                                                    "disable_any_whitespace": True}}},
            "adapters": {"store_uri": str(store.root)},
            "auth": {"keys": [{"sha256": hash_key(k), "tenant": t, "admin": a} for k, (t, a) in KEYS.items()]},
        },
    }
    workdir = tmp_path_factory.mktemp("server")
    with RagtuneServer(json.loads(json.dumps(config)), workdir) as srv:
        yield srv
        print(srv.tail(20))


@pytest.fixture(scope="module")
def ray_local(tiny_model):
    """A local Ray on loopback for one test module's training runs (tests/integration/test_train*.py)."""
    import ray

    from train.cli import start_local_ray

    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
