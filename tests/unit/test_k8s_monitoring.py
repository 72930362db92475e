"""Monitoring: the dashboard queries real metric names and labels; scrape configs select real targets."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from functools import cache
from pathlib import Path

import pytest
import ray

from cluster.k8s_dashboard import PANELS, VLLM_PANELS, build_dashboard
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


def _queries(panels=PANELS):
    for title, _, queries in panels:
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


# ---- the vLLM engine row: names and labels as vLLM 0.32 registers them ---------------------------
# Read from vLLM's source without importing vllm (find_spec on the top-level package runs nothing).
VLLM_METRICS = Path(importlib.util.find_spec("vllm").origin).parent / "v1" / "metrics"
_KINDS = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}
_SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
_SCRAPE_LABELS = {"pod", "namespace", "instance", "job", "service", "container", "endpoint"}
NAME_MATCHER = re.compile(r'__name__=~"([^"]*)"')


@cache
def _vllm_registered() -> dict[str, tuple[str, frozenset[str] | None]]:
    """name → (kind, label names or None if not the per-engine ones) of each metric PrometheusStatLogger creates."""
    tree = ast.parse((VLLM_METRICS / "loggers.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PrometheusStatLogger"]
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    (base,) = [ast.literal_eval(n.value) for n in ast.walk(init) if isinstance(n, ast.Assign)
               and [ast.unparse(t) for t in n.targets] == ["labelnames"]]
    out: dict[str, tuple[str, frozenset[str] | None]] = {}
    for call in ast.walk(cls):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in _KINDS):
            continue
        kw = {k.arg: k.value for k in call.keywords}
        if isinstance(kw.get("name"), ast.Constant):
            per_engine = "labelnames" in kw and ast.unparse(kw["labelnames"]) == "labelnames"
            out[kw["name"].value] = (_KINDS[call.func.attr], frozenset(base) if per_engine else None)
    return out


@cache
def _ray_name() -> tuple[str, str]:
    """(pattern, replacement) of vLLM's RayPrometheusMetric._get_sanitized_opentelemetry_name."""
    source = (VLLM_METRICS / "ray_wrappers.py").read_text()
    assert "class RayPrometheusStatLogger(PrometheusStatLogger):" in source  # same metrics, Ray's wrappers
    fn = next(n for n in ast.walk(ast.parse(source))
              if isinstance(n, ast.FunctionDef) and n.name == "_get_sanitized_opentelemetry_name")
    (sub,) = [c for c in ast.walk(fn) if isinstance(c, ast.Call) and ast.unparse(c.func) == "re.sub"]
    return sub.args[0].value, sub.args[1].value


def _exported() -> dict[str, tuple[str, str, str]]:
    """Every series name a vLLM replica can export → (vLLM metric, suffix, "prometheus" | "ray")."""
    pattern, replacement = _ray_name()
    out = {}
    for name, (kind, _) in _vllm_registered().items():
        for suffix in _SUFFIXES[kind]:
            out[name + suffix] = (name, suffix, "prometheus")
            # Ray's metrics agent exports every ray.util.metrics series with a "ray_" prefix.
            out["ray_" + re.sub(pattern, replacement, name) + suffix] = (name, suffix, "ray")
    return out


def test_vllm_source_is_read_as_expected():
    registered = _vllm_registered()
    assert len(registered) > 20
    assert registered["vllm:kv_cache_usage_perc"] == ("gauge", {"model_name", "engine"})
    assert registered["vllm:num_preemptions"][0] == "counter"
    assert registered["vllm:time_to_first_token_seconds"][0] == "histogram"
    assert "vllm:time_per_output_token_seconds" not in registered  # gone in 0.32: a name we must not use
    assert _exported()["ray_vllm_kv_cache_usage_perc"] == ("vllm:kv_cache_usage_perc", "", "ray")
    # Ray's own LLM dashboards query the same ray_vllm_* form (and never ray_vllm:*).
    ray_dashboards = "".join(p.read_text() for p in
                             (Path(ray.__file__).parent / "dashboard/modules/metrics/dashboards").glob("*llm*.py"))
    assert "ray_vllm_kv_cache_usage_perc" in ray_dashboards and "ray_vllm:" not in ray_dashboards


@pytest.mark.parametrize("expr", list(_queries(VLLM_PANELS)))
def test_vllm_queries_use_registered_metrics_under_both_export_names(expr):
    exported = _exported()
    matchers = NAME_MATCHER.findall(expr)
    assert matchers
    # Every vLLM name sits in a __name__ matcher (a bare vllm:x or ray_vllm_x would work in one mode only).
    assert "vllm" not in NAME_MATCHER.sub("", expr)
    for regex in matchers:
        alternatives = regex.split("|")
        unknown = [a for a in alternatives if a not in exported]
        assert not unknown, f"{unknown} are not series vLLM's PrometheusStatLogger registers"
        (metric_suffix,) = {exported[a][:2] for a in alternatives}
        metric, suffix = metric_suffix
        direct = metric + suffix
        ray_form = next(a for a, v in exported.items() if v == (metric, suffix, "ray"))
        for name in (direct, ray_form):  # PromQL regexes are fully anchored, like re.fullmatch
            assert re.fullmatch(regex, name), f"{regex!r} misses {name}"
        kind, labels = _vllm_registered()[metric]
        assert labels is not None, f"{metric} does not have the per-engine labels"
        allowed = labels | _SCRAPE_LABELS | ({"le"} if kind == "histogram" else set())
        for by, inner in LABELS.findall(expr):
            used = {x.strip() for x in by.split(",") if x.strip()} | set(re.findall(r"(\w+)\s*=~?", inner))
            assert used - {"__name__"} <= allowed, f"{metric}: labels {used - allowed - {'__name__'}} do not exist"


def test_dashboard_has_a_vllm_engine_row_with_the_engine_signals():
    titles = " | ".join(title for title, _, _ in VLLM_PANELS)
    for signal in ("KV-cache", "running vs waiting", "preemptions", "TTFT", "ITL", "prefix-cache hit rate",
                   "queue time"):
        assert signal in titles, signal
    exprs = " ".join(expr for _, _, queries in VLLM_PANELS for expr, _ in queries)
    used = {_exported()[a][0] for regex in NAME_MATCHER.findall(exprs) for a in regex.split("|")}
    assert used >= {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                    "vllm:num_preemptions", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:request_queue_time_seconds"}
    panels = build_dashboard()["panels"]
    (row,) = [i for i, p in enumerate(panels) if p["type"] == "row"]
    assert "vLLM" in panels[row]["title"]
    assert [p["title"] for p in panels[row + 1:]] == [title for title, _, _ in VLLM_PANELS]
    assert [p["title"] for p in panels[:row]] == [title for title, _, _ in PANELS]
    assert all(p["gridPos"]["y"] > panels[row]["gridPos"]["y"] for p in panels[row + 1:])


def test_dashboard_panels_do_not_overlap():
    cells = {}
    for panel in build_dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[x, y] = panel["title"]


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
