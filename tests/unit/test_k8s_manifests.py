"""k8s/: every file parses, every overlay builds with kustomize, every object validates.

Core objects are checked against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail), RayService/RayJob against the pinned KubeRay CRDs (k8s/crds/, strict), and
the pod templates inside them against the core PodTemplateSpec schema as well.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from cluster.k8s_render import APP_DIR, RAYSERVICE_NAME, SECRET_FILES, SHARED_MOUNT
from tests.k8s_support import (
    K8S,
    K8S_VERSION,
    KUSTOMIZATIONS,
    REPO,
    build,
    cluster_spec,
    crd_schema,
    groups,
    one,
    ray_container,
    serve_config,
)

SHIPPED_YAML = sorted(p for p in K8S.rglob("*.yaml") if "crds" not in p.parts)
RAY_KINDS = {"RayService", "RayJob"}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}  # no offline schema: checked structurally below


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_parses_and_opens_with_its_command(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs), f"{path}: empty document"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path}: a shipped YAML opens with the command that applies it"
    assert any(word in path.read_text().split("\n\n")[0] for word in ("kubectl", "helm", "ragtune render"))


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_builds(name):
    objects = build(name)
    assert objects
    assert all(o["metadata"].get("namespace") == "ragtune" for o in objects if o["kind"] != "Namespace")


def _all_objects():
    for name in sorted(KUSTOMIZATIONS):
        for obj in build(name):
            yield pytest.param(obj, id=f"{name}:{obj['kind']}/{obj['metadata']['name']}")


@pytest.mark.parametrize("obj", list(_all_objects()))
def test_object_validates_against_its_schema(obj):
    kind = obj["kind"]
    if kind in MONITORING_KINDS:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        return
    if kind in RAY_KINDS:
        jsonschema.validate(obj, crd_schema(kind))
        for _, group in groups(obj):
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                        "template": group["template"]}
            kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_crd_validation_catches_a_typo():
    obj = one("cpu", "RayService")
    bad = yaml.safe_load(yaml.safe_dump(obj))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.validate(bad, crd_schema("RayService"))


# ---- the Ray clusters ----------------------------------------------------------------------
RAY_OBJECTS = [("cpu", "RayService"), ("gpu", "RayService"), ("cpu-train", "RayJob"), ("gpu-train", "RayJob")]


@pytest.mark.parametrize(("name", "kind"), RAY_OBJECTS)
def test_ray_cluster_is_pinned_authenticated_and_headless(name, kind):
    obj = one(name, kind)
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token", "secretName": "ragtune-ray-token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no replicas or training workers"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard is never exposed"
    images = {c["image"] for _, g in groups(obj) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"one image per cluster, got {images}"
    image = images.pop()
    assert ":" in image and not image.endswith(":latest")


@pytest.mark.parametrize(("name", "kind"), RAY_OBJECTS)
def test_every_ray_pod_is_non_root_and_mounts_the_shared_volume(name, kind):
    for group_name, group in groups(one(name, kind)):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, group_name
        container = ray_container(group)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, group_name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts[SHARED_MOUNT]] == "ragtune-shared", group_name


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_serving_pod_mounts_the_secret_files_the_app_reads(name):
    """The app is built by a Ray task on any pod: every pod needs every secret file."""
    for group_name, group in groups(one(name, "RayService")):
        pod = group["template"]["spec"]
        container = ray_container(group)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for spec in SECRET_FILES.values():
            path = PurePosixPath(spec["path"])
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
            secret = volumes[mount["name"]]["secret"]
            assert mount.get("readOnly") is True
            assert path.name in {item["path"] for item in secret["items"]}, (group_name, path)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_serving_readiness_probes_hit_health_on_the_serve_port(name):
    http = serve_config(name)["http_options"]
    for group_name, group in groups(one(name, "RayService")):
        if group_name == "head":
            continue  # KubeRay's own head probes; excludeHeadPodFromServeSvc keeps it out of traffic
        probe = ray_container(group)["readinessProbe"]["httpGet"]
        assert probe == {"path": "/health", "port": http["port"]}, group_name
    assert one(name, "RayService")["spec"]["excludeHeadPodFromServeSvc"] is True


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_ingress_routes_the_api_to_the_kuberay_serve_service_only(name):
    ingress = one(name, "Ingress")
    port = serve_config(name)["http_options"]["port"]
    backends = {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["number"])
                for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert backends == {(f"{RAYSERVICE_NAME}-serve-svc", port)}
    services = [o for o in build(name) if o["kind"] == "Service"]
    assert all(p["port"] != 8265 for s in services for p in s["spec"]["ports"]), "dashboard must not be exposed"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_gpu_groups_tolerate_and_select_gpu_nodes(name):
    for group_name, group in groups(one(name, "RayService")):
        limits = ray_container(group)["resources"]["limits"]
        pod = group["template"]["spec"]
        if "nvidia.com/gpu" in limits:
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), group_name
            assert pod["nodeSelector"], group_name
        else:
            assert "tolerations" not in pod, f"{group_name}: CPU pods should not land on GPU nodes"


# ---- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu-train", "gpu-train"])
def test_rayjob_runs_the_rendered_train_config(name):
    job = one(name, "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "ragtune train /configs/train.yaml --address auto"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    head = spec["rayClusterSpec"]["headGroupSpec"]
    mounts = {m["name"]: m["mountPath"] for m in ray_container(head)["volumeMounts"]}
    volume = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == "train-config")
    configmap = one(name, "ConfigMap")
    assert mounts["train-config"] == "/configs" and volume["configMap"]["name"] == configmap["metadata"]["name"]
    overlay = name.removesuffix("-train")
    generated = K8S / "overlays" / overlay / "train" / "generated" / "train.yaml"
    assert configmap["data"]["train.yaml"] == generated.read_text()


@pytest.mark.parametrize("name", ["cpu-train", "gpu-train"])
def test_training_exports_into_the_store_serving_reads(name):
    overlay = name.removesuffix("-train")
    train = yaml.safe_load(one(name, "ConfigMap")["data"]["train.yaml"])
    served = serve_config(overlay)["applications"][0]["args"]["config"]
    assert train["export"]["store"] == served["serve"]["adapters"]["store_uri"]
    assert train["base_model"] == served["serve"]["engine"]["model"]
    assert train["run"]["storage_path"].startswith(SHARED_MOUNT)
    assert all(p.startswith(APP_DIR) for p in train["data"]["paths"])


# ---- secrets by reference ------------------------------------------------------------------
def _secret_names(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        for key in ("secretName", "credentials"):
            if isinstance(node.get(key), str):
                found.add(node[key])
        ref = node.get("secretKeyRef") or (node.get("credentials") if isinstance(node.get("credentials"), dict) else None)
        if isinstance(ref, dict) and "name" in ref:
            found.add(ref["name"])
        for value in node.values():
            found |= _secret_names(value)
    elif isinstance(node, list):
        for value in node:
            found |= _secret_names(value)
    return found


def test_no_secret_objects_are_shipped_and_every_referenced_secret_is_documented():
    objects = [o for name in KUSTOMIZATIONS for o in build(name)]
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created by the operator, never shipped"
    milvus = yaml.safe_load((K8S / "milvus" / "values.yaml").read_text())
    names = _secret_names(objects) | _secret_names(milvus) | {milvus["minio"]["existingSecret"]}
    readme = (K8S / "README.md").read_text()
    missing = sorted(n for n in names if f"create secret generic {n} " not in readme and n != "ragtune-api-tls")
    assert not missing, f"k8s/README.md must show how to create: {missing}"


def test_rendered_serve_config_holds_no_secret_values():
    for name in ("cpu", "gpu"):
        app = serve_config(name)["applications"][0]
        assert "keys" not in app["args"]["config"]["serve"]["auth"]
        assert "token" not in app["args"]["config"]["retrieval"]["milvus"]
        assert app["args"]["secret_files"] == SECRET_FILES


def test_repo_relative_paths_exist():
    assert (REPO / "k8s" / "crds" / "SOURCE.md").is_file()
