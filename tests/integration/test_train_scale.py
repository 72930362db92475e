"""Cluster-scale training on real Ray Train + DeepSpeed (CPU, gloo) with the tiny model:
elastic resume (a checkpoint written by 2 workers continues on 1), and resubmissions that would
load checkpoints into a different model are refused before any worker starts.

    pytest -m integration tests/integration/test_train_scale.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import ConfigError
from tests.integration.training import checkpoint_metrics, tiny_config
from train.config import TrainConfig
from train.launch import launch

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-scale")


def _config(workdir: Path, name: str, *overrides: str) -> TrainConfig:
    return tiny_config(workdir, name, "deepspeed.zero_stage=2", "run.checkpoint_every_steps=4", "eval.every_steps=4",
                       "run.num_to_keep=null", "run.max_failures=0", "tracking.mlflow=false", *overrides)


def _eval_losses(workdir: Path, name: str) -> dict[int, float]:
    return {step: m["eval_loss"] for step, m in checkpoint_metrics(workdir / "results" / name).items()}


@pytest.fixture(scope="module")
def reference(ray_local, workdir):
    """8 uninterrupted steps on 2 workers."""
    return launch(_config(workdir, "ref", "run.max_steps=8"))


def test_a_checkpoint_of_2_workers_resumes_on_1(reference, workdir):
    first = launch(_config(workdir, "elastic", "run.max_steps=4"))
    assert first.metrics["step"] == 4
    # The same run on one worker: ZeRO-2 partitions of 2 ranks → universal checkpoint → 1 rank.
    resumed = launch(_config(workdir, "elastic", "run.max_steps=8", "scaling.num_workers=1"))
    assert resumed.metrics["step"] == 8 and resumed.metrics["resumed_from_step"] == 4
    assert resumed.metrics["resumed_from_workers"] == 2
    ref, ours = _eval_losses(workdir, "ref"), _eval_losses(workdir, "elastic")
    assert ours[4] == pytest.approx(ref[4], abs=1e-6)  # the same 4 steps before the switch
    # One worker sees half the examples per step (micro-batch 8 instead of 2 x 8) for steps 5-8,
    # so the curves part a little. Measured (lr 5e-3, constant): eval loss at step 8 6.09 resumed
    # on 1 worker vs 6.14 uninterrupted (both up from 5.60 at step 4: this lr overshoots between
    # steps 4 and 8 on the random tiny model); train loss of steps 5-8 5.58 vs 5.59.
    assert ours[8] == pytest.approx(ref[8], abs=0.15)
    assert resumed.metrics["loss"] == pytest.approx(reference.metrics["loss"], abs=0.1)
    assert resumed.adapter.key == "elastic@2"  # the first 4 steps exported elastic@1


def test_resuming_into_a_different_lora_rank_or_base_model_starts_nothing(reference, workdir):
    for override, field in (("lora.r=4", "lora.r"), ("base_model=smollm2-135m-instruct", "base_model")):
        with pytest.raises(ConfigError, match=f"has checkpoints trained with {field}=") as err:
            launch(_config(workdir, "ref", "run.max_steps=12", override))
        assert err.value.param == field
    assert max(_eval_losses(workdir, "ref")) == 8  # nothing ran
