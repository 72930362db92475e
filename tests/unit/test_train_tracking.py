"""MLflow tracking (a real SQLite store in tmp), resume compatibility, packing/tracking config rules,
and ``ragtune train status --adapter``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.models import TINY_LLAMA
from serve.registry import AdapterRegistry
from train import cli, tracking
from train.config import check_context, load_config
from train.launch import check_resume_compatible

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "train" / "configs" / "tiny-test.yaml"


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"run.storage_path={tmp_path / 'results'}", *overrides])


# ---- config rules --------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field"), [
    (["data.pack_length=512"], "data.pack_length"),  # without packing
    (["data.packing=true", "data.pack_length=100", "data.max_seq_len=160"], "data.pack_length"),
    (["run.storage_path=s3://bucket/runs"], "tracking.uri"),
])
def test_packing_and_tracking_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert err.value.param == field and field in err.value.message


def test_remote_storage_with_a_tracking_server_is_fine():
    cfg = load_config(TINY, ["run.storage_path=s3://bucket/runs", "tracking.uri=http://mlflow:5000"])
    assert tracking.tracking_uri(cfg) == "http://mlflow:5000"


@pytest.mark.parametrize(("overrides", "field"), [
    (["data.packing=true", "data.pack_length=4096"], "data.pack_length"),
    (["data.packing=true", "data.max_seq_len=4096"], "data.max_seq_len"),  # pack_length defaults to it
    (["data.max_seq_len=4096"], "data.max_seq_len"),
])
def test_lengths_beyond_the_model_context_are_config_errors(overrides, field):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError, match="exceed.* context of 2048 positions") as err:
        check_context(cfg, 2048)  # the tiny model's max_position_embeddings
    assert err.value.param == field


def test_export_selects_the_best_checkpoint_by_default():
    assert load_config(TINY).export.select == "best"


# ---- resume compatibility ------------------------------------------------------------------
def test_resume_refuses_a_different_base_model_or_lora_shape(tmp_path):
    check_resume_compatible(_cfg(tmp_path))  # a new run: records its fingerprint
    fingerprint = json.loads((tmp_path / "results" / "tiny-test" / "ragtune-run.json").read_text())
    assert fingerprint["lora.r"] == 8 and fingerprint["base_model"] == TINY_LLAMA
    check_resume_compatible(_cfg(tmp_path, "run.max_steps=99"))  # other knobs may change on resubmit
    for override, field in (("lora.r=4", "lora.r"), ("base_model=smollm2-135m-instruct", "base_model"),
                            ("lora.target_modules=[q_proj]", "lora.target_modules")):
        with pytest.raises(ConfigError, match=f"has checkpoints trained with {field}=") as err:
            check_resume_compatible(_cfg(tmp_path, override))
        assert err.value.param == field
    check_resume_compatible(_cfg(tmp_path, "lora.r=4", "run.name=other"))  # a new name is a new run


# ---- MLflow --------------------------------------------------------------------------------
def test_flatten_params():
    assert tracking.flatten_params({"lora": {"r": 8, "t": ["q", "v"]}, "name": "x", "n": None}) == {
        "lora.r": "8", "lora.t": '["q", "v"]', "name": "x", "n": "null"}


def test_a_run_is_tracked_reopened_on_resubmit_and_closed_with_the_adapter(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path)
    run = tracking.start_run(cfg, dataset_hash="sha256:abc", data_stats={"examples": 3}, base_model_path="/m")
    assert run.tracking_uri == f"sqlite:///{tmp_path / 'results' / 'mlflow' / 'mlflow.db'}" and not run.resumed
    logger = tracking.MetricLogger(run.as_dict())
    for step, loss in ((5, 2.0), (10, 1.5)):
        logger.log({"step": step, "loss": loss, "eval_loss": None, "done": False, "lr": 1e-3}, step)
    logger.close()
    again = tracking.start_run(cfg, dataset_hash="sha256:abc", data_stats={}, base_model_path="/m")
    assert again.run_id == run.run_id and again.resumed
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tracking.finish_run(again, status="FINISHED", adapter_dir=adapter, adapter_key="tiny-test@1",
                        summary={"select": "best", "step": 10})

    client = MlflowClient(run.tracking_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["lora.r"] == "8" and got.data.params["dataset_hash"] == "sha256:abc"
    assert got.data.tags["ragtune.adapter"] == "tiny-test@1" and got.data.tags["ragtune.dataset_hash"] == "sha256:abc"
    assert got.data.tags["ragtune.step"] == "10"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(5, 2.0), (10, 1.5)]
    assert "eval_loss" not in got.data.metrics and "done" not in got.data.metrics  # None/bools are not metrics
    assert [a.path for a in client.list_artifacts(run.run_id, "adapter")] == ["adapter/adapter_config.json"]
    assert run.run_id in tracking.where(run) and "mlflow ui --backend-store-uri sqlite:///" in tracking.where(run)


def test_tracking_off_tracks_nothing(tmp_path):
    cfg = _cfg(tmp_path, "tracking.mlflow=false")
    assert tracking.start_run(cfg, dataset_hash="h", data_stats={}, base_model_path="/m") is None
    tracking.MetricLogger(None).log({"loss": 1.0}, 1)  # no-ops
    tracking.finish_run(None, status="FINISHED")
    assert not (tmp_path / "results" / "mlflow").exists()


def test_a_tracker_outage_neither_raises_nor_stalls_the_training_loop(caplog, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # else MLflow retries for minutes
    bad = {"run_id": "nope", "tracking_uri": "http://127.0.0.1:9", "experiment": "x", "experiment_id": "1"}
    logger = tracking.MetricLogger(bad)
    start = time.perf_counter()
    logger.log({"loss": 1.0}, 3)
    assert time.perf_counter() - start < 0.5  # only enqueued
    logger.close(timeout_s=60)
    assert "metrics of step 3 not logged" in caplog.text


def test_server_runs_link_to_the_run_page():
    run = tracking.TrackedRun("abc", "http://mlflow:5000/", "ragtune-train", "7")
    assert tracking.where(run) == "http://mlflow:5000/#/experiments/7/runs/abc"


# ---- ragtune train status --adapter --------------------------------------------------------
def test_status_of_an_adapter_prints_its_run_and_where_to_look(tmp_path, tiny_model, adapter_dirs, capsys):
    store = tmp_path / "adapters"
    run = {"run_id": "r123", "tracking_uri": "sqlite:////x/mlflow.db", "experiment": "ragtune-train",
           "experiment_id": "1", "resumed": False}
    AdapterRegistry(store, base_model=TINY_LLAMA, base_model_path=str(tiny_model)).register(
        adapter_dirs["alpha"], "style", manifest={"run_name": "run-a", "tracking": run,
                                                 "exported": {"select": "best", "step": 20, "eval_loss": 1.2}})
    assert cli.main(["status", "--adapter", "style@1", "--store", str(store)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"] == "style@1" and out["tracking"]["run_id"] == "r123"
    assert out["exported"]["step"] == 20 and "r123" in out["look"] and "sqlite:////x/mlflow.db" in out["look"]


def test_status_needs_a_job_or_an_adapter(capsys):
    assert cli.main(["status"]) == 2
    assert "JOB_ID and --address, or --adapter" in capsys.readouterr().err
