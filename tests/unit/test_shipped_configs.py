"""Every shipped YAML config loads and validates (a typo in a shipped file fails here)."""

from pathlib import Path

import pytest

from cluster.config import RagtuneConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "cluster" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, RagtuneConfig)
    assert path.read_text().startswith("#"), "a shipped config opens with the command that runs it"


def test_local_yaml_equals_embedded_defaults():
    local = load_config(Path(CONFIGS[0]).parent / "local.yaml")
    assert local == load_config()


def test_gpu_config_requests_gpus():
    cfg = load_config(Path(CONFIGS[0]).parent / "gpu.yaml")
    opts = cfg.serve.llm.serve_options()
    assert opts["ray_actor_options"]["num_gpus"] == 1 and opts["autoscaling_config"]["max_replicas"] == 4
    assert cfg.serve.engine.device == "cuda"
