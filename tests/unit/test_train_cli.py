"""``ragtune train`` argument handling, job path rewriting and Ray token auth (no Ray started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from train import cli
from train.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "train" / "configs" / "tiny-test.yaml"


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="ragtune")
    cli.add_cli(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture
def calls(monkeypatch):
    seen = []
    for name in ("_cmd_run", "_cmd_submit", "_cmd_status", "_cmd_logs", "_cmd_stop"):
        monkeypatch.setattr(cli, name, lambda args, name=name: seen.append((name, args)) or 0)
    return seen


@pytest.mark.parametrize(("argv", "handler", "fields"), [
    (["train", "cfg.yaml", "--set", "lora.r=4"], "_cmd_run", {"config": "cfg.yaml", "overrides": ["lora.r=4"]}),
    (["train", "run", "cfg.yaml", "--address", "auto"], "_cmd_run", {"config": "cfg.yaml", "address": "auto"}),
    (["train", "submit", "cfg.yaml", "--address", "http://h:8265", "--wait"], "_cmd_submit",
     {"config": "cfg.yaml", "address": "http://h:8265", "wait": True}),
    (["train", "status", "job-1", "--address", "http://h:8265"], "_cmd_status", {"job_id": "job-1"}),
    (["train", "logs", "job-1", "--address", "http://h:8265", "-f"], "_cmd_logs", {"follow": True}),
    (["train", "stop", "job-1", "--address", "http://h:8265"], "_cmd_stop", {"job_id": "job-1"}),
])
def test_actions_dispatch(parser, calls, argv, handler, fields):
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    (name, sub), = calls
    assert name == handler
    assert {k: getattr(sub, k) for k in fields} == fields


def test_remote_actions_need_an_address(parser, calls):
    args = parser.parse_args(["train", "logs", "job-1"])
    with pytest.raises(SystemExit):
        args.func(args)


def test_auth_header_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert cli.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert cli.auth_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "other").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other"))
    assert cli.auth_headers() == {"Authorization": "Bearer path-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert cli.auth_headers() == {"Authorization": "Bearer env-token"}
    assert cli.auth_headers("explicit") == {"Authorization": "Bearer explicit"}


def test_job_client_wants_the_dashboard_url():
    with pytest.raises(ConfigError, match="dashboard URL"):
        cli.job_client("127.0.0.1:6379")


def test_job_paths_ship_sources_and_pin_local_data(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = cli.job_config_for(load_config(TINY, ["run.tensorboard_dir=data/tb"]), REPO)
    assert cfg.data.paths == ["train/examples/ragtune-style.jsonl"]  # travels with the working_dir
    assert cfg.run.storage_path == str(REPO / "data" / "ray_results")  # data/ is excluded: absolute
    assert cfg.export.store == str(REPO / "data" / "adapters")
    assert cfg.models_dir == str(REPO / "data" / "models")
    assert cfg.run.tensorboard_dir == str(REPO / "data" / "tb")
    assert cfg.base_model == "tiny-llama"  # a packaged name, not a path


def test_job_paths_keep_uris_and_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    cfg = cli.job_config_for(load_config(TINY, ["run.storage_path=s3://bucket/runs", "tracking.mlflow=false",
                                                 f"export.store={tmp_path}"]), REPO)
    assert cfg.run.storage_path == "s3://bucket/runs" and cfg.export.store == str(tmp_path)


def test_submit_fails_before_contacting_ray_when_data_is_missing(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(TINY, ["data.paths=[train/examples/missing.jsonl]"])
    with pytest.raises(ConfigError, match="missing.jsonl does not exist"):
        cli.submit_job(cfg, "http://127.0.0.1:1")


def test_main_reports_config_errors(capsys):
    assert cli.main([str(TINY), "--set", "deepspeed.zero_stage=9"]) == 2
    assert "deepspeed.zero_stage" in capsys.readouterr().err
