import pytest

from cluster.config import load_config
from cluster.errors import ConfigError
from serve.config import DeploymentConfig, hash_key


def test_defaults_are_local_and_valid():
    cfg = load_config()
    assert cfg.serve.http.host == "127.0.0.1"
    assert cfg.serve.engine.device == "cpu"
    assert cfg.serve.engine.dtype == "float32" and cfg.serve.engine.enforce_eager


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["serve.engine.dtype=float8"], "serve.engine.dtype"),
        (["serve.engine.max_lora_rank=12"], "serve.engine.max_lora_rank"),
        (["serve.engine.max_loras=8", "serve.engine.max_cpu_loras=2"], "max_cpu_loras=2 must be >= engine.max_loras=8"),
        (["serve.engine.dtype=bfloat16", "serve.engine.enforce_eager=false"], "wrong answers"),
        (["serve.http.host=0.0.0.0"], "beyond loopback but serve.auth.keys is empty"),
        (["serve.engine.colour=blue"], "serve.engine.colour: Extra inputs are not permitted"),
        (["serve.limits.default_max_tokens=5000"], "exceeds limits.max_tokens"),
        (["serve.http.port=70000"], "serve.http.port"),
    ],
)
def test_bad_config_names_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in info.value.message


def test_yaml_file_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("serve:\n  engine:\n    model: tiny-llama\n    max_model_len: 512\n")
    cfg = load_config(path, ["serve.http.port=9001"])
    assert (cfg.serve.engine.model, cfg.serve.engine.max_model_len, cfg.serve.http.port) == ("tiny-llama", 512, 9001)


def test_yaml_error_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("serve:\n  engine:\n    max_model_len: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message and "serve.engine.max_model_len" in info.value.message
    assert "'lots'" in info.value.message


def test_exposed_with_keys_is_allowed():
    key = {"sha256": hash_key("k"), "tenant": "acme"}
    cfg = load_config(None, ["serve.http.host=0.0.0.0", f"serve.auth.keys=[{key}]"])
    assert cfg.serve.auth.keys[0].tenant == "acme"


def test_autoscaling_options():
    opts = DeploymentConfig(num_replicas="auto", min_replicas=1, max_replicas=4, target_ongoing_requests=8).serve_options()
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in opts


def test_gpu_config_requires_gpus_per_replica():
    with pytest.raises(ConfigError, match="num_gpus"):
        load_config(None, ["serve.engine.device=cuda", "serve.engine.tensor_parallel_size=2", "serve.llm.num_gpus=1"])
    cfg = load_config(None, ["serve.engine.device=cuda", "serve.engine.tensor_parallel_size=2", "serve.llm.num_gpus=2"])
    assert cfg.serve.llm.serve_options()["ray_actor_options"]["num_gpus"] == 2
