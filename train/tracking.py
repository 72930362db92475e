"""Experiment tracking in MLflow: every training run is an MLflow run an adapter version points at.

Who logs what (rank 0 only, never on every micro-batch):

* the **driver** (:func:`start_run`) creates — or, for a resubmitted run of the same
  ``run.name``, reopens — the MLflow run before any worker starts: params (the flattened config),
  tags (run name, base model, dataset hash), the dataset stats as a JSON artifact;
* **worker rank 0** (:class:`MetricLogger`) logs the metrics of each ``ray.train.report`` step
  (loss, lr, samples/s, tokens/s, eval loss…) in one ``log_batch`` call from a background
  thread — the training step only enqueues;
* the **driver** (:func:`finish_run`) logs the exported adapter folder as an artifact, tags the
  registered ``name@version`` and closes the run. The adapter manifest carries the run id and
  tracking URI (``tracking``), so a served version leads back to its run.

The default store is SQLite under the run storage (``<storage>/mlflow/mlflow.db``, artifacts in
``<storage>/mlflow/artifacts``): MLflow 3 refuses new file stores, and a tracking server is one
``tracking.uri: http://HOST:5000`` away. ``mlflow-skinny`` is the client; ``mlflow ui`` (the full
``mlflow`` package) browses the same URI.
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from train.config import TrainConfig

__all__ = ["MetricLogger", "TrackedRun", "finish_run", "flatten_params", "start_run", "tracking_uri", "where"]

logger = logging.getLogger(__name__)

_RUN_TAG = "ragtune.run_name"
_PARAM_MAX = 6000  # MLflow's limit on a param value (characters)


@dataclass
class TrackedRun:
    """The MLflow run of a training run; JSON-friendly (it travels to workers and into manifests)."""

    run_id: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    resumed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return asdict(self)


def _default_root(cfg: TrainConfig) -> Path:
    return Path(cfg.run.storage_path) / "mlflow"


def tracking_uri(cfg: TrainConfig) -> str:
    """``tracking.uri`` or the SQLite store under ``run.storage_path`` (paths must be resolved)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{(_default_root(cfg) / 'mlflow.db').resolve()}"


def where(run: TrackedRun | dict) -> str:
    """One line telling a human where to look at the run."""
    info = run if isinstance(run, dict) else run.as_dict()
    uri = info["tracking_uri"]
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    return f"mlflow ui --backend-store-uri {uri}  -> experiment {info['experiment']!r}, run {info['run_id']}"


def flatten_params(raw: dict, prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 8}}`` → ``{"lora.r": "8"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:_PARAM_MAX]
    return out


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, cfg: TrainConfig) -> str:
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = None if cfg.tracking.uri else str((_default_root(cfg) / "artifacts").resolve())
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def start_run(cfg: TrainConfig, *, dataset_hash: str, data_stats: dict, base_model_path: str) -> TrackedRun | None:
    """Driver: the run's MLflow run (reopened when ``run.name`` was tracked before), or ``None`` if off."""
    if not cfg.tracking.mlflow:
        return None
    from mlflow.entities import Param, RunTag

    uri = tracking_uri(cfg)
    client = _client(uri)
    experiment_id = _experiment_id(client, cfg)
    previous = client.search_runs([experiment_id], filter_string=f"tags.`{_RUN_TAG}` = '{cfg.run.name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    tags = {"ragtune.dataset_hash": dataset_hash, "ragtune.base_model": cfg.base_model,
            "ragtune.base_model_path": base_model_path, "ragtune.adapter_name": cfg.export.adapter_name}
    if previous:
        # A resubmission continues the same training run; MLflow params are immutable, so only
        # tags change (the config of this attempt is an artifact below).
        run_id = previous[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        resumed = True
    else:
        run_id = client.create_run(experiment_id, tags={_RUN_TAG: cfg.run.name}, run_name=cfg.run.name).info.run_id
        params = {**flatten_params(cfg.model_dump(mode="json")), "dataset_hash": dataset_hash}
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        resumed = False
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory(prefix="ragtune-mlflow-") as tmp:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (Path(tmp) / f"train_config-{stamp}.json").write_text(cfg.model_dump_json(indent=2))
        (Path(tmp) / f"dataset-{stamp}.json").write_text(json.dumps({"hash": dataset_hash, **data_stats}, indent=2))
        client.log_artifacts(run_id, tmp, "attempts")
    run = TrackedRun(run_id, uri, cfg.tracking.experiment, experiment_id, resumed)
    logger.info("run %s: tracked in MLflow (%s)", cfg.run.name, where(run))
    return run


class MetricLogger:
    """Worker rank 0: per-report-step metrics into the run, off the training thread.

    ``log`` only enqueues; a daemon thread creates the client on first use and sends each batch,
    so a slow or unreachable tracker (MLflow retries HTTP for minutes) never stalls a step.
    Tracking errors are logged, never raised. ``close`` flushes what is queued.
    """

    def __init__(self, run: dict | None):
        self._run = run
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Queue the numeric metrics of one report step (None, bools and ``step`` itself are skipped)."""
        if self._run is None:
            return
        stamp = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._send_all, name="mlflow-metrics", daemon=True)
            self._thread.start()
        self._queue.put((step, stamp, values))

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is queued (up to ``timeout_s``), then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("MLflow run %s: metrics still unsent after %.0fs; giving up", self._run["run_id"], timeout_s)

    def _send_all(self) -> None:
        from mlflow.entities import Metric

        client = None
        while (item := self._queue.get()) is not None:
            step, stamp, values = item
            try:
                client = client or _client(self._run["tracking_uri"])
                client.log_batch(self._run["run_id"], metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
            except Exception as exc:  # a tracker outage must not kill hours of training
                logger.warning("MLflow run %s: metrics of step %d not logged: %s", self._run["run_id"], step, exc)


def finish_run(run: TrackedRun | None, *, status: str, adapter_dir: str | Path | None = None,
               adapter_key: str | None = None, summary: dict | None = None) -> None:
    """Driver: the adapter artifact, the registered version as a tag, the final status."""
    if run is None:
        return
    from mlflow.entities import RunTag

    client = _client(run.tracking_uri)
    if adapter_dir is not None:
        client.log_artifacts(run.run_id, str(adapter_dir), "adapter")
    tags = [RunTag("ragtune.adapter", adapter_key)] if adapter_key else []
    for key, value in (summary or {}).items():
        tags.append(RunTag(f"ragtune.{key}", json.dumps(value) if not isinstance(value, str) else value))
    if tags:
        client.log_batch(run.run_id, tags=tags)
    client.set_terminated(run.run_id, status=status)
