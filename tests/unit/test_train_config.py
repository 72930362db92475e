"""TrainConfig: shipped configs load, bad values and bad combinations fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from cluster.errors import ConfigError
from train.config import TrainConfig, load_config
from train.recipe import deepspeed_config, lr_lambda

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "train" / "configs").glob("*.yaml"))
MINIMAL = {
    "base_model": "tiny-llama",
    "data": {"paths": ["train/examples/ragtune-style.jsonl"]},
    "run": {"name": "t"},
    "export": {"adapter_name": "t"},
}


def _load(*overrides: str) -> TrainConfig:
    return load_config(MINIMAL, list(overrides))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"example-cpu.yaml", "tiny-test.yaml", "gpu-zero3.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert path.read_text().startswith("#"), "a shipped config opens with the command that runs it"
    assert "ragtune train" in path.read_text().splitlines()[1] + path.read_text().splitlines()[0]
    for data_path in cfg.data.paths:
        assert (REPO / data_path).is_file() or cfg.scaling.use_gpu


def test_gpu_config_is_nccl_bf16_zero3():
    cfg = load_config(REPO / "train" / "configs" / "gpu-zero3.yaml")
    assert cfg.scaling.use_gpu and cfg.backend == "nccl"
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"
    ds = deepspeed_config(cfg, world_size=cfg.scaling.num_workers)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3


def test_cpu_defaults_resolve_to_gloo():
    assert _load().backend == "gloo"


@pytest.mark.parametrize(("override", "field"), [
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp16", "deepspeed.precision"),
    ("lora.r=0", "lora.r"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("data.format=csv", "data.format"),
    ("data.eval_fraction=0.9", "data.eval_fraction"),
    ("optim.lr=-1", "optim.lr"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("run.name=bad name!", "run.name"),
    ("export.adapter_name=Bad_Name", "export.adapter_name"),
    ("deepspeed.zero_stag=2", "deepspeed.zero_stag"),  # a typo is an unknown field, not a silent default
])
def test_bad_field_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert field in err.value.message
    assert err.value.param == field


@pytest.mark.parametrize(("overrides", "field"), [
    (["deepspeed.offload_params=true", "deepspeed.zero_stage=2"], "deepspeed.offload_params"),
    (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "deepspeed.offload_optimizer"),
    (["deepspeed.stage3_param_persistence_threshold=0", "deepspeed.zero_stage=2"],
     "deepspeed.stage3_param_persistence_threshold"),
    (["scaling.backend=nccl"], "scaling.backend"),
    (["eval.early_stopping_patience=2"], "eval.early_stopping_patience"),
    (["data.eval_path=x.jsonl", "data.eval_fraction=0.1"], "data.eval_fraction"),
    (["lora.r=32", "export.max_lora_rank=16"], "lora.r"),
    (["lora.target_modules=[q_proj, lm_head]"], "lora.target_modules"),
    (["debug.fail_rank=2", "scaling.num_workers=2"], "debug.fail_rank"),
])
def test_invalid_combinations_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    assert err.value.param == field
    assert field in err.value.message


def test_direct_construction_also_validates():
    with pytest.raises(ValidationError, match="deepspeed.zero_stage"):
        TrainConfig.model_validate({**MINIMAL, "deepspeed": {"zero_stage": 9}})


def test_overrides_parse_yaml_values():
    cfg = _load("lora.target_modules=[q_proj, v_proj]", "deepspeed.zero_stage=3", "run.max_steps=7",
                "export.promote=true")
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert (cfg.deepspeed.zero_stage, cfg.run.max_steps, cfg.export.promote) == (3, 7, True)


def test_bad_override_syntax_is_a_config_error():
    with pytest.raises(ConfigError, match="expected"):
        _load("no-equals-sign")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def _models(model: type[BaseModel]):
    yield model
    for info in model.model_fields.values():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _models(info.annotation)


def test_every_field_has_a_description():
    missing = [f"{m.__name__}.{name}" for m in _models(TrainConfig)
               for name, info in m.model_fields.items() if not info.description]
    assert missing == []


def test_deepspeed_config_maps_the_knobs():
    cfg = _load("deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0",
                "deepspeed.gradient_accumulation_steps=4", "run.micro_batch_size=2", "deepspeed.gradient_clipping=0.5")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 2 * 4 * 2
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no JIT-compiled Adam by default
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False


def test_deepspeed_offload_maps_to_cpu_devices():
    cfg = _load("deepspeed.zero_stage=3", "deepspeed.offload_params=true", "deepspeed.offload_optimizer=true")
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu"} and zero["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize(("schedule", "expected_end"), [("constant", 1.0), ("linear", 0.0), ("cosine", 0.0)])
def test_lr_schedule_warms_up_then_decays(schedule, expected_end):
    f = lr_lambda(_load(f"optim.schedule={schedule}", "optim.warmup_steps=4"), total_steps=20)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    assert f(20) == pytest.approx(expected_end, abs=1e-9)


def test_early_stopping_counts_evals_without_improvement():
    from train.recipe import _early_stop

    cfg = _load("data.eval_fraction=0.1", "eval.early_stopping_patience=2", "eval.early_stopping_min_delta=0.1")
    state = {"best_eval": None, "bad_evals": 0, "best_step": None, "step": 0}

    def at(step: int, loss: float) -> bool:
        state["step"] = step
        return _early_stop(state, loss, cfg)

    # 0.95 is not better by more than min_delta; 0.85 is; then two evals without improvement stop.
    assert [at(10 * i, loss) for i, loss in enumerate((1.0, 0.95, 0.85, 0.84, 0.83), 1)] == [False] * 4 + [True]
    assert state["best_eval"] == 0.85 and state["best_step"] == 30  # the step export.select=best exports


@pytest.mark.parametrize(("overrides", "expected"), [
    (["run.micro_batch_size=8", "deepspeed.gradient_accumulation_steps=2"], (17, 9)),  # 270/2 → 135 → 17 → 9
    (["run.micro_batch_size=8", "run.epochs=2.5"], (17, 43)),
    (["run.max_steps=5"], (34, 5)),
])
def test_step_plan(overrides, expected):
    from train.recipe import _plan_steps

    assert _plan_steps(_load(*overrides), n_train=270, world=2) == expected
