"""cluster/k8s_render.py: one source of truth from the pydantic config to the RayService.

The rendered serveConfigV2 must (1) validate as a Ray Serve config, (2) build the application
locally from its import_path and args — a `serve build` equivalent, so a typo in the import path
or a field fails here — with deployment options equal to what the code applies, and (3) equal the
committed files (`ragtune render k8s --check`).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve._private.build_app import build_app as serve_build
from ray.serve.schema import ServeDeploySchema

from cluster import k8s_render
from cluster.config import RagtuneConfig
from cluster.errors import ConfigError
from cluster.k8s_render import (
    OVERLAYS,
    SECRET_FILES,
    add_cli,
    check_all,
    load_layered,
    render_all,
    render_serve_config,
    render_train_config,
)
from cluster.secret_files import apply_secret_files
from serve.config import hash_key
from tests.k8s_support import K8S, REPO

MODELS_DATA = str(REPO / "data")  # data/models/ holds the packaged models (make setup builds them)
KEY = "rt-test-key"


@pytest.fixture(params=OVERLAYS, ids=lambda o: o.name)
def overlay(request):
    return request.param


@pytest.fixture
def secrets(tmp_path) -> dict[str, dict[str, str]]:
    """SECRET_FILES pointed at temporary files holding a real key digest and a Milvus token."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- {{sha256: {hash_key(KEY)}, tenant: ops, admin: true}}\n")
    token = tmp_path / "token"
    token.write_text("ragtune:s3cret\n")
    paths = {"serve.auth.keys": keys, "retrieval.milvus.token": token}
    return {field: {**spec, "path": str(paths[field])} for field, spec in SECRET_FILES.items()}


def _app(overlay) -> dict:
    return render_serve_config(load_layered(overlay.serve_configs))["applications"][0]


def test_rendered_config_is_a_valid_ray_serve_config(overlay):
    serve = render_serve_config(load_layered(overlay.serve_configs))
    ServeDeploySchema.model_validate(serve)
    assert serve["http_options"]["host"] == "0.0.0.0"


def test_import_path_builds_the_application_with_the_rendered_deployments(overlay, secrets):
    """`serve build`-equivalent: import `import_path`, call it with the rendered args, no Ray started."""
    app = _app(overlay)
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = {"config": {**app["args"]["config"], "data_dir": MODELS_DATA}, "secret_files": secrets}
    built = serve_build(builder(args), name=app["name"])
    in_code = {d.name: d for d in built.deployments}
    assert set(in_code) == {d["name"] for d in app["deployments"]}
    assert built.ingress_deployment_name == "Ingress"
    for rendered in app["deployments"]:
        d = in_code[rendered["name"]]
        cfg = d._deployment_config
        assert d.ray_actor_options == rendered["ray_actor_options"], rendered["name"]
        assert cfg.max_ongoing_requests == rendered["max_ongoing_requests"]
        assert cfg.max_queued_requests == rendered["max_queued_requests"]
        if "autoscaling_config" in rendered:
            got = cfg.autoscaling_config.model_dump(include=set(rendered["autoscaling_config"]))
            assert got == rendered["autoscaling_config"], rendered["name"]
        else:
            assert cfg.num_replicas == rendered["num_replicas"] and cfg.autoscaling_config is None


def test_args_round_trip_to_the_same_config_with_secrets_from_files(overlay, secrets):
    cfg = load_layered(overlay.serve_configs)
    app = render_serve_config(cfg)["applications"][0]
    rebuilt = RagtuneConfig.model_validate(apply_secret_files(app["args"]["config"], secrets))
    assert [k.sha256 for k in rebuilt.serve.auth.keys] == [hash_key(KEY)]
    assert rebuilt.retrieval.milvus.token.get_secret_value() == "ragtune:s3cret"
    expected = cfg.model_copy(deep=True)
    expected.serve.auth.keys, expected.retrieval.milvus.token = rebuilt.serve.auth.keys, rebuilt.retrieval.milvus.token
    assert rebuilt == expected


def test_a_cluster_without_the_keys_secret_refuses_to_build(overlay, secrets, tmp_path):
    app = _app(overlay)
    secrets["serve.auth.keys"]["path"] = str(tmp_path / "missing.yaml")
    builder = importlib.import_module(app["import_path"].split(":")[0]).build_app
    with pytest.raises(ConfigError, match=r"serve\.auth\.keys: .*missing\.yaml does not exist"):
        builder({"config": app["args"]["config"], "secret_files": secrets})


def test_a_typo_in_the_import_path_fails_the_build_check(monkeypatch):
    monkeypatch.setattr(k8s_render, "IMPORT_PATH", "serve.app:build_ap")
    app = _app(OVERLAYS[0])
    module, attr = app["import_path"].split(":")
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize(("override", "message"), [
    ({"serve": {"http": {"host": "127.0.0.1"}}}, r"serve\.http\.host='127\.0\.0\.1'"),
    ({"data_dir": "./data"}, r"data_dir='\./data': must be absolute"),
    ({"serve": {"adapters": {"store_uri": "data/adapters"}}}, r"serve\.adapters\.store_uri"),
    ({"retrieval": {"milvus": {"uri": "./data/milvus.db"}}}, r"Milvus Lite file"),
    ({"retrieval": {"milvus": {"token": "root:Milvus"}}}, r"retrieval\.milvus\.token: must not be"),
])
def test_settings_that_cannot_work_on_a_cluster_are_refused(tmp_path, override, message):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(override))
    cfg = load_layered([*OVERLAYS[0].serve_configs, extra])
    with pytest.raises(ConfigError, match=message):
        render_serve_config(cfg)


def test_layers_merge_deeply_and_name_the_files_on_error(tmp_path):
    cfg = load_layered(OVERLAYS[0].serve_configs)
    assert cfg.serve.engine.max_lora_rank == 16 and cfg.serve.llm.num_cpus == 2  # local.yaml + k8s-cpu.yaml
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: {llm: {num_replicas: many}}\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*serve\.llm\.num_replicas"):
        load_layered([*OVERLAYS[0].serve_configs, bad])


def test_train_config_targets_the_shared_volume_and_the_servers_limits(overlay):
    cfg = load_layered(overlay.serve_configs)
    train = render_train_config(overlay.train_config, cfg)
    assert train["export"]["store"] == cfg.serve.adapters.store_uri
    assert train["export"]["max_lora_rank"] == cfg.serve.engine.max_lora_rank >= train["lora"]["r"]
    assert train["run"]["storage_path"] == "/mnt/ragtune/ray_results"


def test_train_config_for_another_base_model_is_refused():
    gpu_serving = load_layered(OVERLAYS[1].serve_configs)
    with pytest.raises(ConfigError, match="base_model='smollm2-135m-instruct' differs"):
        render_train_config(OVERLAYS[0].train_config, gpu_serving)


# ---- committed == rendered -----------------------------------------------------------------
def test_committed_generated_files_equal_a_fresh_render():
    stale = check_all()
    assert not stale, "stale generated files; run `ragtune render k8s`:\n" + "\n".join(stale.values())


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ragtune")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_passes_on_the_repo_and_fails_on_an_edited_copy(tmp_path, monkeypatch, capsys):
    assert _run_cli(["render", "k8s", "--check"]) == 0
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("crds"))
    target = copy / "overlays" / "gpu" / "generated" / "serve-config.yaml"
    target.write_text(target.read_text().replace("max_replicas: 4", "max_replicas: 40"))
    monkeypatch.setattr(k8s_render, "K8S_DIR", copy)
    monkeypatch.setattr(k8s_render, "REPO", tmp_path)
    assert _run_cli(["render", "k8s", "--check"]) == 1
    assert "stale: k8s/overlays/gpu/generated/serve-config.yaml" in capsys.readouterr().err
    assert _run_cli(["render", "k8s"]) == 0 and not check_all(copy)


def test_render_all_writes_every_generated_file(tmp_path):
    files = render_all(k8s_dir=tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in files} == {
        "monitoring/grafana-dashboard.json",
        *(rel for o in OVERLAYS for rel in o.files),
    }
    assert all(Path(p).read_text() == text for p, text in files.items())
