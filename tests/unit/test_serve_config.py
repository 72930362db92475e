import json

import pytest

from cluster.config import load_config
from cluster.errors import ConfigError
from serve.config import DeploymentConfig, hash_key


def test_defaults_are_local_and_valid():
    cfg = load_config()
    assert cfg.serve.http.host == "127.0.0.1"
    assert cfg.serve.engine.device == "cpu"
    assert cfg.serve.engine.dtype == "float32" and cfg.serve.engine.enforce_eager
    # No operator cap on max_tokens: the context window bounds it, as in vLLM.
    assert cfg.serve.limits.max_tokens is None
    engine = cfg.serve.engine
    assert (engine.generation_config, engine.tool_call_parser, engine.enable_auto_tool_choice) == ("auto", "hermes", True)
    assert engine.extra_args == {}


def test_engine_and_frontend_kwargs_split():
    extra = {"kv_cache_dtype": "auto", "enable_force_include_usage": True, "speculative_config": {"method": "ngram"}}
    cfg = load_config(None, ["serve.engine.model=tiny-llama", "serve.engine.generation_config=vllm",
                             "serve.engine.enable_prefix_caching=true", f"serve.engine.extra_args={json.dumps(extra)}"])
    engine = cfg.serve.engine
    kwargs = engine.engine_kwargs("/models/tiny")
    assert kwargs["model"] == "/models/tiny" and kwargs["served_model_name"] == ["tiny-llama"]
    assert kwargs["generation_config"] == "vllm" and kwargs["enable_prefix_caching"] is True
    assert kwargs["enable_lora"] and kwargs["max_loras"] == 8 and kwargs["max_lora_rank"] == 16
    assert kwargs["kv_cache_dtype"] == "auto" and kwargs["speculative_config"] == {"method": "ngram"}
    assert "gpu_memory_utilization" not in kwargs and "quantization" not in kwargs
    assert "enable_force_include_usage" not in kwargs and "tool_call_parser" not in kwargs
    assert engine.frontend_kwargs() == {"chat_template": None, "tool_call_parser": "hermes",
                                        "enable_auto_tool_choice": True, "enable_force_include_usage": True}


def test_engine_kwargs_follow_lora_and_device():
    plain = load_config(None, ["serve.engine.enable_lora=false"]).serve.engine.engine_kwargs("/m")
    assert not {"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"} & set(plain)
    gpu = load_config(None, ["serve.engine.device=cuda", "serve.llm.num_gpus=1",
                             "serve.engine.gpu_memory_utilization=0.5"]).serve.engine
    assert gpu.engine_kwargs("/m")["gpu_memory_utilization"] == 0.5
    no_tools = load_config(None, ["serve.engine.enable_auto_tool_choice=false", "serve.engine.tool_call_parser=null"])
    assert no_tools.serve.engine.frontend_kwargs()["tool_call_parser"] is None


def test_kwargs_build_vllms_own_args(tiny_model):
    from serve.llm import _engine_args, frontend_args

    extra = {"enable_force_include_usage": True, "structured_outputs_config": {"backend": "xgrammar"}}
    engine = load_config(None, ["serve.engine.model=tiny-llama", f"serve.engine.extra_args={json.dumps(extra)}"]).serve.engine
    args = _engine_args(engine, str(tiny_model), max_tokens=100)
    assert type(args).__name__ == "AsyncEngineArgs" and args.served_model_name == ["tiny-llama"]
    assert args.override_generation_config == {"max_new_tokens": 100}  # the operator cap is vLLM's default too
    assert type(args.structured_outputs_config).__name__ == "StructuredOutputsConfig"  # dict → vLLM's dataclass
    ns = frontend_args(engine, args)
    assert (ns.tool_call_parser, ns.enable_auto_tool_choice, ns.enable_force_include_usage) == ("hermes", True, True)
    assert ns.model == str(tiny_model) and ns.max_model_len == engine.max_model_len



@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["serve.engine.dtype=float8"], "serve.engine.dtype"),
        (["serve.engine.max_lora_rank=12"], "serve.engine.max_lora_rank"),
        (["serve.engine.max_loras=8", "serve.engine.max_cpu_loras=2"], "max_cpu_loras=2 must be >= engine.max_loras=8"),
        (["serve.engine.dtype=bfloat16", "serve.engine.enforce_eager=false"], "wrong answers"),
        (["serve.http.host=0.0.0.0"], "beyond loopback but serve.auth.keys is empty"),
        (["serve.engine.colour=blue"], "serve.engine.colour: Extra inputs are not permitted"),
        (["serve.limits.default_max_tokens=5000"], "serve.limits.default_max_tokens: Extra inputs are not permitted"),
        (["serve.limits.max_tokens=0"], "serve.limits.max_tokens"),
        (["serve.engine.tool_call_parser=null"], "engine.enable_auto_tool_choice=true needs engine.tool_call_parser"),
        # Nested vLLM sections are validated when the config loads, not when the replica starts.
        (['serve.engine.extra_args={"structured_outputs_config": {"backend": 5}}'],
         "engine.extra_args.structured_outputs_config"),
        (['serve.engine.extra_args={"colour": 1}'], "engine.extra_args.colour: not an AsyncEngineArgs or frontend field"),
        (['serve.engine.extra_args={"max_model_len": 4096}'], "engine.extra_args.max_model_len: set engine.max_model_len"),
        (['serve.engine.extra_args={"tool_call_parser": "x"}'], "engine.extra_args.tool_call_parser: set engine.tool_call_parser"),
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
