"""k8s/milvus/values.yaml: cluster mode, pinned, credentials only from Secrets, and the app points at it."""

from __future__ import annotations

import re

import yaml

from cluster.k8s_render import OVERLAYS, load_layered
from tests.k8s_support import K8S

VALUES = K8S / "milvus" / "values.yaml"
COMPONENTS = ("mixCoordinator", "proxy", "queryNode", "dataNode", "indexNode")


def _values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def _helm_command() -> re.Match:
    match = re.search(r"helm upgrade --install (\S+) milvus/milvus --version (\S+) -n (\S+) -f k8s/milvus/values.yaml",
                      VALUES.read_text())
    assert match, "values.yaml opens with the pinned helm command"
    return match


def test_chart_and_image_are_pinned_and_cluster_mode_is_on():
    _, chart_version, _ = _helm_command().groups()
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart_version)
    values = _values()
    assert values["cluster"]["enabled"] is True
    assert re.fullmatch(r"v2\.(5|6)\.\d+", values["image"]["all"]["tag"]), "BM25/hybrid search need Milvus >= 2.5"


def test_auth_is_on_and_every_credential_comes_from_a_secret():
    values = _values()
    user = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["authorizationEnabled"] is True
    assert values["minio"]["existingSecret"] and not values["minio"]["accessKey"] and not values["minio"]["secretKey"]
    for component in COMPONENTS:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in values[component]["extraEnv"]}
        assert set(env) == {"COMMON_SECURITY_DEFAULTROOTPASSWORD", "MINIO_ACCESSKEYID", "MINIO_SECRETACCESSKEY"}
        assert env["COMMON_SECURITY_DEFAULTROOTPASSWORD"]["name"] == "ragtune-milvus"
        assert {env["MINIO_ACCESSKEYID"]["name"], env["MINIO_SECRETACCESSKEY"]["name"]} == {values["minio"]["existingSecret"]}


def test_the_app_connects_to_the_release_service_with_the_token_secret():
    release, _, namespace = _helm_command().groups()
    assert namespace == "ragtune"
    for overlay in OVERLAYS:
        uri = load_layered(overlay.serve_configs).retrieval.milvus.uri
        assert uri == f"http://{release}:{_values().get('service', {}).get('port', 19530)}", overlay.name
