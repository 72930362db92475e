"""Monitoring: the dashboard queries real metric names and labels; scrape configs select real targets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray

from cluster.k8s_dashboard import PANELS, build_dashboard
from serve.metrics import Metrics
from tests.k8s_support import K8S, build, groups, one, ray_container

NAME = re.compile(r"\b((?:ragtune|ray)_[a-z_]+)\b")
LABELS = re.compile(r"by \(([^)]*)\)|\{([^}]*)\}")


def _label_names(family_name: str) -> set[str]:
    metrics = Metrics()
    for attr in vars(metrics).values():
        if getattr(attr, "_name", None) == family_name:
            return set(attr._labelnames)
    raise KeyError(family_name)


def _queries():
    for title, _, queries in PANELS:
        for expr, _ in queries:
            yield pytest.param(expr, id=title)


@pytest.mark.parametrize("expr", list(_queries()))
def test_dashboard_queries_use_existing_metrics_and_labels(expr):
    names = set(NAME.findall(expr))
    assert names
    families = {f.name for f in Metrics().registry.collect()}
    for name in names:
        if name.startswith("ray_"):
            # Ray's own metrics get the ray_ prefix on export; the name must exist in Ray's source.
            source = Path(ray.__file__).parent / "serve"
            assert any(f'"{name.removeprefix("ray_")}"' in p.read_text() for p in source.rglob("*.py")), name
            continue
        family = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert family in families, f"{name} is not exported by serve/metrics.py"
        allowed = _label_names(family) | {"le", "pod", "namespace", "instance", "job", "service"}
        for by, matchers in LABELS.findall(expr):
            used = {x.strip() for x in by.split(",") if x.strip()} | set(re.findall(r"(\w+)\s*=~?", matchers))
            assert used <= allowed, f"{name}: labels {used - allowed} do not exist"


def test_dashboard_covers_the_serving_signals_per_model():
    titles = " | ".join(title for title, _, _ in PANELS)
    for signal in ("TTFT", "ITL", "Throughput", "queue depth", "Error", "tokens/s"):
        assert signal in titles, signal
    exprs = " ".join(expr for _, _, queries in PANELS for expr, _ in queries)
    for metric in ("ragtune_requests_total", "ragtune_errors_total", "ragtune_inflight_requests",
                   "ragtune_time_to_first_token_seconds_bucket", "ragtune_inter_token_latency_seconds_bucket",
                   "ragtune_request_latency_seconds_bucket", "ragtune_prompt_tokens_total",
                   "ragtune_completion_tokens_total"):
        assert metric in exprs, metric
    dashboard = build_dashboard()
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_committed_dashboard_is_the_built_one_and_is_shipped_in_a_configmap():
    committed = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    assert committed == build_dashboard()
    configmap = one("monitoring", "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["ragtune-serving.json"]) == committed


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_servicemonitor_reaches_metrics_on_every_serving_worker(overlay):
    monitor = one("monitoring", "ServiceMonitor")
    service = next(o for o in build(overlay) if o["kind"] == "Service" and o["metadata"]["name"] == "ragtune-metrics")
    assert _matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert endpoint["path"] == "/metrics" and endpoint["authorization"]["credentials"]["name"] == "ragtune-metrics-key"
    selected = [g for g, spec in groups(one(overlay, "RayService"))
                if all(spec["template"]["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())]
    assert selected == [g for g, _ in groups(one(overlay, "RayService")) if g != "head"]
    for g, spec in groups(one(overlay, "RayService")):
        if g in selected:
            names = {p["name"]: p["containerPort"] for p in ray_container(spec)["ports"]}
            assert names[port["targetPort"]] == port["port"] == 8000


@pytest.mark.parametrize(("name", "kind"), [("cpu", "RayService"), ("gpu", "RayService"),
                                            ("cpu-train", "RayJob"), ("gpu-train", "RayJob")])
def test_podmonitor_reaches_ray_metrics_on_every_ray_pod(name, kind):
    monitor = one("monitoring", "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for group_name, spec in groups(one(name, kind)):
        assert _matches(monitor["spec"]["selector"], spec["template"]["metadata"]["labels"]), group_name
        ports = {p["name"]: p["containerPort"] for p in ray_container(spec)["ports"]}
        assert ports[endpoint["port"]] == 8080, group_name  # KubeRay's metrics-export-port
