"""The Grafana dashboard for ragtune, built from the metric names in ``serve/metrics.py``.

Rendered to ``k8s/monitoring/grafana-dashboard.json`` by ``ragtune render k8s`` (a Grafana
sidecar picks it up from the ConfigMap labelled ``grafana_dashboard: "1"``). Panels: throughput,
tokens/s, TTFT, inter-token latency and end-to-end latency quantiles, in-flight requests (queue
depth), errors — per model, where a model is the base model or an adapter name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PANELS", "build_dashboard"]

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


def _panel(index: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict[str, Any]:
    targets = [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (expr, legend) in enumerate(queries)]
    return {
        "id": index + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
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


def build_dashboard() -> dict[str, Any]:
    """The dashboard JSON model (Grafana schema 39)."""
    return {
        "uid": UID, "title": "ragtune serving", "tags": ["ragtune", "ray-serve", "vllm"],
        "schemaVersion": 39, "editable": True, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables()},
        "panels": [_panel(i, *spec) for i, spec in enumerate(PANELS)],
    }
