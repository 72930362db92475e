"""The Grafana dashboard for ragtune, built from the metric names in ``serve/metrics.py`` and vLLM's.

Rendered to ``k8s/monitoring/grafana-dashboard.json`` by ``ragtune render k8s`` (a Grafana
sidecar picks it up from the ConfigMap labelled ``grafana_dashboard: "1"``). Panels: throughput,
tokens/s, TTFT, inter-token latency and end-to-end latency quantiles, in-flight requests (queue
depth), errors — per model, where a model is the base model or an adapter name. Then a row for
the vLLM engine behind it (vLLM's own series, per served base model): KV-cache usage, running vs
waiting requests, preemptions, engine TTFT/ITL quantiles, prefix-cache hit rate, queue time, tokens/s.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["PANELS", "VLLM_PANELS", "build_dashboard"]

UID = "ragtune-serving"
_RATE = "[$__rate_interval]"
_MODEL = '{model=~"$model"}'


def _rate(metric: str, by: str, matchers: str = _MODEL) -> str:
    return f"sum by ({by}) (rate({metric}{matchers}{_RATE}))"


def _quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50/p95/p99 per model of a ``ragtune_*_seconds`` histogram."""
    return [(f"histogram_quantile({q}, {_rate(histogram + '_bucket', 'le, model')})", f"p{int(q * 100)} {{{{model}}}}")
            for q in (0.5, 0.95, 0.99)]


_FAILED = '{model=~"$model", status=~"4..|5.."}'
_ERROR_RATIO = f"{_rate('ragtune_requests_total', 'model', _FAILED)} / {_rate('ragtune_requests_total', 'model')}"

# (title, unit, [(PromQL, legend)]) — every ragtune_* name and label is checked against
# serve.metrics.Metrics by tests/unit/test_k8s_monitoring.py.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Throughput (requests/s) per model", "reqps",
     [(_rate("ragtune_requests_total", "model"), "{{model}}")]),
    ("Generated tokens/s per model", "short",
     [(_rate("ragtune_completion_tokens_total", "model"), "{{model}} completion"),
      (_rate("ragtune_prompt_tokens_total", "model"), "{{model}} prompt")]),
    ("Time to first token (TTFT)", "s", _quantiles("ragtune_time_to_first_token_seconds")),
    ("Inter-token latency (ITL)", "s", _quantiles("ragtune_inter_token_latency_seconds")),
    ("End-to-end request latency", "s", _quantiles("ragtune_request_latency_seconds")),
    ("In-flight generation requests (queue depth) per ingress pod", "short",
     [("sum by (pod) (ragtune_inflight_requests)", "{{pod}}")]),
    ("Ray Serve queued requests per deployment", "short",
     [("sum by (deployment) (ray_serve_deployment_queued_queries)", "{{deployment}}")]),
    ("Errors/s by type", "reqps",
     [("sum by (type) (rate(ragtune_errors_total" + _RATE + "))", "{{type}}")]),
    ("Error ratio (4xx+5xx) per model", "percentunit", [(_ERROR_RATIO, "{{model}}")]),
]


# ---- the vLLM engine row ----------------------------------------------------------------------
# vLLM's engine series reach Prometheus under one of two names, depending on the replica's
# serve.engine.metrics (serve/llm.py build_engine):
#   "prometheus": vLLM's PrometheusStatLogger, in ragtune's /metrics (ServiceMonitor)
#                 -> vllm:kv_cache_usage_perc
#   "ray":        vLLM's RayPrometheusStatLogger, via Ray's metrics agent on each Ray pod (PodMonitor)
#                 -> ray_vllm_kv_cache_usage_perc
#                 (vLLM replaces ':' by '_' for OpenTelemetry, Ray prefixes "ray_"; Ray's own LLM
#                 dashboards query these names — there is no "ray_vllm:" series).
# Every engine query selects both names with one regex on __name__, so the one dashboard works for
# both overlays (cpu: prometheus, gpu: ray) with nothing to pick; a dashboard variable would have to
# be set right per cluster. Nothing is counted twice: a replica runs exactly one of the two loggers
# (vLLM adds its default Prometheus logger only when no custom PrometheusStatLogger is given).
# Labels: vLLM's model_name (the served base model; adapters share its engine, so these panels do
# not follow $model) and engine, plus what the scrape adds (pod, ...). Every name is checked against
# vLLM's PrometheusStatLogger by tests/unit/test_k8s_monitoring.py.
def _vllm(metric: str, suffix: str = "") -> str:
    """A selector for vLLM's ``metric`` (as vLLM registers it, ``vllm:...``) under both export names."""
    ray_name = "ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", metric)  # vllm.v1.metrics.ray_wrappers' sanitizing
    return f'{{__name__=~"{metric}{suffix}|{ray_name}{suffix}"}}'


def _engine_sum(metric: str, suffix: str = "") -> str:
    return f"sum by (model_name) (rate({_vllm(metric, suffix)}{_RATE}))"


def _engine_quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50/p95/p99 per served model of a vLLM ``*_seconds`` histogram."""
    bucket = f"sum by (le, model_name) (rate({_vllm(histogram, '_bucket')}{_RATE}))"
    return [(f"histogram_quantile({q}, {bucket})", f"p{int(q * 100)} {{{{model_name}}}}") for q in (0.5, 0.95, 0.99)]


_PREFIX_HIT_RATIO = (f"{_engine_sum('vllm:prefix_cache_hits', '_total')} / "
                     f"{_engine_sum('vllm:prefix_cache_queries', '_total')}")

VLLM_ROW = "vLLM engine (vllm:* or ray_vllm_* series, per served base model)"
VLLM_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("vLLM KV-cache usage (max / mean over engines)", "percentunit",
     [(f"max by (model_name) ({_vllm('vllm:kv_cache_usage_perc')})", "{{model_name}} max"),
      (f"avg by (model_name) ({_vllm('vllm:kv_cache_usage_perc')})", "{{model_name}} mean")]),
    ("vLLM running vs waiting requests (engine queue)", "short",
     [(f"sum by (model_name) ({_vllm('vllm:num_requests_running')})", "{{model_name}} running"),
      (f"sum by (model_name) ({_vllm('vllm:num_requests_waiting')})", "{{model_name}} waiting")]),
    ("vLLM preemptions/s", "short", [(_engine_sum("vllm:num_preemptions", "_total"), "{{model_name}}")]),
    ("vLLM prefix-cache hit rate (cached / queried prompt tokens)", "percentunit",
     [(_PREFIX_HIT_RATIO, "{{model_name}}")]),
    ("vLLM engine time to first token (TTFT)", "s", _engine_quantiles("vllm:time_to_first_token_seconds")),
    ("vLLM engine inter-token latency (ITL)", "s", _engine_quantiles("vllm:inter_token_latency_seconds")),
    ("vLLM request queue time (waiting before scheduled)", "s", _engine_quantiles("vllm:request_queue_time_seconds")),
    ("vLLM engine tokens/s", "short",
     [(_engine_sum("vllm:generation_tokens", "_total"), "{{model_name}} generation"),
      (_engine_sum("vllm:prompt_tokens", "_total"), "{{model_name}} prompt")]),
]


def _panel(index: int, title: str, unit: str, queries: list[tuple[str, str]], *,
           first_id: int = 1, top: int = 0) -> dict[str, Any]:
    targets = [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (expr, legend) in enumerate(queries)]
    return {
        "id": first_id + index, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": top + 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]}},
        "targets": targets,
    }


def _variables() -> list[dict[str, Any]]:
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
    model = {"name": "model", "type": "query", "label": "model / adapter", "multi": True, "includeAll": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(ragtune_requests_total, model)", "refId": "models"},
             "definition": "label_values(ragtune_requests_total, model)"}
    return [datasource, model]


def _row(panel_id: int, title: str, top: int) -> dict[str, Any]:
    return {"id": panel_id, "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": top}}


def build_dashboard() -> dict[str, Any]:
    """The dashboard JSON model (Grafana schema 39)."""
    ragtune = [_panel(i, *spec) for i, spec in enumerate(PANELS)]
    top = 8 * ((len(PANELS) + 1) // 2)  # below the ragtune panels, two per line
    engine = [_row(len(PANELS) + 1, VLLM_ROW, top)]
    engine += [_panel(i, *spec, first_id=len(PANELS) + 2, top=top + 1) for i, spec in enumerate(VLLM_PANELS)]
    return {
        "uid": UID, "title": "ragtune serving", "tags": ["ragtune", "ray-serve", "vllm"],
        "schemaVersion": 39, "editable": True, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables()},
        "panels": ragtune + engine,
    }
