import json
import shutil

import pytest

from cluster.errors import ConfigError, InvalidRequestError, NotFoundError
from serve.registry import open_registry, parse_model_name


@pytest.fixture
def registry(tmp_path, tiny_model):
    return open_registry(str(tmp_path / "store"), base_model="tiny-llama", base_model_path=str(tiny_model), max_lora_rank=16)


def test_parse_model_name():
    assert parse_model_name("a") == ("a", None)
    assert parse_model_name("a@3") == ("a", 3)
    assert parse_model_name("a@v12") == ("a", 12)
    with pytest.raises(InvalidRequestError, match="must be a number"):
        parse_model_name("a@latest")


def test_register_versions_promote_rollback(registry, adapter_dirs):
    first = registry.register(adapter_dirs["alpha"], "alpha")
    assert (first.version, registry.resolve("alpha").version) == (1, 1)  # first version auto-promoted
    second = registry.register(adapter_dirs["beta"], "alpha")
    assert second.version == 2 and registry.resolve("alpha").version == 1  # not promoted implicitly
    assert second.lora_id != first.lora_id
    registry.promote("alpha", 2)
    assert registry.resolve("alpha").version == 2
    assert registry.resolve("alpha@1").path.endswith("alpha/v1")
    registry.rollback("alpha")
    assert registry.resolve("alpha").version == 1
    with pytest.raises(InvalidRequestError, match="no earlier promoted version"):
        registry.rollback("alpha")
    manifest = registry.manifest(registry.resolve("alpha@2"))
    assert manifest["base_model"] == "tiny-llama" and manifest["version"] == 2


def test_unknown_and_other_tenants_are_404(registry, adapter_dirs):
    registry.register(adapter_dirs["alpha"], "secret", owner="acme")
    registry.register(adapter_dirs["beta"], "shared")
    assert registry.resolve("secret", tenant="acme").owner == "acme"
    for model in ("secret", "secret@1", "nope", "shared@9", "../etc"):
        with pytest.raises(NotFoundError):
            registry.resolve(model, tenant="globex")
    assert [a["name"] for a in registry.list("globex")] == ["shared"]
    assert [a["name"] for a in registry.list(None)] == ["secret", "shared"]
    with pytest.raises(NotFoundError):
        registry.promote("secret", 1, tenant="globex")


def _edit_config(src, dest, **changes):
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 64}, "exceeds the server's max_lora_rank=16"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embeddings/lm_head"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"base_model_name_or_path": "meta-llama/Llama-3-8B"}, "trained on base model"),
    ],
)
def test_validation_rejects_unservable_adapters(registry, adapter_dirs, tmp_path, changes, message):
    bad = _edit_config(adapter_dirs["alpha"], tmp_path / "bad", **changes)
    with pytest.raises(InvalidRequestError, match=message):
        registry.register(bad, "bad")
    assert registry.list() == []  # nothing half-registered


def test_shape_mismatch_is_rejected(registry, tmp_path, tiny_model):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "wrong-base"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 4096)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(InvalidRequestError, match="fits no projection"):
        registry.register(bad, "wrong")


def test_bad_names_and_schemes(registry, adapter_dirs):
    for name in ("Upper", "a/b", "tiny-llama", "x@1", ""):
        with pytest.raises(InvalidRequestError):
            registry.register(adapter_dirs["alpha"], name)
    with pytest.raises(ConfigError, match="mount the bucket"):
        open_registry("s3://bucket/adapters", base_model="m")
