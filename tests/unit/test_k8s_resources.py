"""Resource requests add up: what the rendered configs ask for fits the pods the manifests create.

Per pod, not only in total: a replica needs its CPUs and GPUs on one node, so the check packs
replicas into worker pods (each pod advertises what its container limits or rayStartParams say).
"""

from __future__ import annotations

import math

import pytest
import yaml

from tests.k8s_support import REPO, groups, one, pod_capacity, serve_config

# Cluster-launcher instance types used in cluster/launcher/aws-gpu.yaml: (vCPUs, GPUs).
AWS_INSTANCES = {"m5.2xlarge": (8, 0), "g5.xlarge": (4, 1), "g5.12xlarge": (48, 4)}


def _max_replicas(deployment: dict) -> int:
    auto = deployment.get("autoscaling_config")
    return auto["max_replicas"] if auto else deployment["num_replicas"]


def _demand(name: str) -> list[tuple[str, float, float, int]]:
    """(deployment, CPUs, GPUs per replica, max replicas) of a serving overlay."""
    app = serve_config(name)["applications"][0]
    return [(d["name"], float(d["ray_actor_options"]["num_cpus"]), float(d["ray_actor_options"]["num_gpus"]),
             _max_replicas(d)) for d in app["deployments"]]


def _workers(obj: dict) -> list[tuple[str, float, float, int]]:
    """(group, CPUs, GPUs per pod, max pods) of the worker groups."""
    return [(g, *pod_capacity(spec), spec["maxReplicas"]) for g, spec in groups(obj) if g != "head"]


def _pack(demand: list[tuple[str, float, float, int]], workers: list[tuple[str, float, float, int]]) -> None:
    """Place every replica greedily (GPU replicas first, biggest first) into worker pods."""
    pods = [[cpu, gpu] for _, cpu, gpu, count in workers for _ in range(count)]
    replicas = sorted(((n, c, g) for n, c, g, k in demand for _ in range(k)), key=lambda r: (-r[2], -r[1]))
    for name, cpu, gpu in replicas:
        # GPU-less replicas prefer GPU-less pods, as Ray's scheduler does.
        order = sorted(pods, key=lambda p: (gpu == 0 and p[1] > 0, -p[1] if gpu else 0))
        pod = next((p for p in order if p[0] >= cpu - 1e-9 and p[1] >= gpu - 1e-9), None)
        assert pod is not None, f"no worker pod left for a {name} replica ({cpu} CPU, {gpu} GPU); pods={workers}"
        pod[0] -= cpu
        pod[1] -= gpu


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_serving_replicas_fit_the_worker_groups_at_max_scale(name):
    _pack(_demand(name), _workers(one(name, "RayService")))


def test_llm_gpus_times_max_replicas_fit_the_gpu_workers():
    llm = next(d for d in _demand("gpu") if d[0] == "LLMServer")
    gpus = sum(gpu * count for _, _, gpu, count in _workers(one("gpu", "RayService")))
    assert llm[2] * llm[3] <= gpus
    assert llm[2] >= 1, "the production LLM asks for GPUs"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_replica_asks_for_resources_so_none_lands_on_the_head(name):
    """The head advertises num-cpus 0; a replica asking for nothing could still run there."""
    for deployment, cpu, gpu, _ in _demand(name):
        assert cpu > 0 or gpu > 0, deployment


def test_gpu_worker_group_scales_to_the_llm_autoscaling_bounds():
    app = serve_config("gpu")["applications"][0]
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    gpu_group = next(spec for g, spec in groups(one("gpu", "RayService")) if g == "gpu")
    per_pod = pod_capacity(gpu_group)[1] / llm["ray_actor_options"]["num_gpus"]
    auto = llm["autoscaling_config"]
    assert gpu_group["minReplicas"] == math.ceil(auto["min_replicas"] / per_pod)
    assert gpu_group["maxReplicas"] == math.ceil(auto["max_replicas"] / per_pod)


@pytest.mark.parametrize("name", ["cpu-train", "gpu-train"])
def test_training_workers_fit_the_rayjob_cluster(name):
    train = yaml.safe_load(one(name, "ConfigMap")["data"]["train.yaml"])
    scaling = train["scaling"]
    gpus = scaling["gpus_per_worker"] if scaling["use_gpu"] else 0.0
    demand = [("train-worker", scaling["cpus_per_worker"], gpus, scaling["num_workers"])]
    job = one(name, "RayJob")
    _pack(demand, _workers(job))
    for _, spec in groups(job):
        if spec is not job["spec"]["rayClusterSpec"]["headGroupSpec"]:
            assert spec["minReplicas"] == spec["maxReplicas"], "a run needs all of its workers at once"


def test_cluster_launcher_capacity_fits_the_gpu_config():
    launcher = yaml.safe_load((REPO / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    workers = [(name, *AWS_INSTANCES[t["node_config"]["InstanceType"]], t["max_workers"])
               for name, t in launcher["available_node_types"].items() if name != launcher["head_node_type"]]
    from cluster.config import load_config

    cfg = load_config(REPO / "cluster" / "configs" / "gpu.yaml").serve
    demand = [(n, d.num_cpus, d.num_gpus, d.max_replicas if d.num_replicas == "auto" else d.num_replicas)
              for n, d in (("LLMServer", cfg.llm), ("Retriever", cfg.retriever), ("Ingress", cfg.ingress))]
    # gpu.yaml's retriever asks for no CPUs; count it as 1 so it still needs a place.
    demand = [(n, max(c, 1.0) if g == 0 else c, g, k) for n, c, g, k in demand]
    _pack(demand, workers)
    assert sum(t["max_workers"] for n, t in launcher["available_node_types"].items()
               if n != launcher["head_node_type"]) <= launcher["max_workers"]


def test_packing_detects_overcommit():
    with pytest.raises(AssertionError, match="no worker pod left for a LLMServer"):
        _pack([("LLMServer", 4.0, 1.0, 5)], [("gpu", 8.0, 1.0, 4)])
    with pytest.raises(AssertionError, match="no worker pod left"):  # enough in total, not on one pod
        _pack([("Retriever", 3.0, 0.0, 2)], [("cpu", 4.0, 0.0, 1), ("cpu2", 2.0, 0.0, 1)])
