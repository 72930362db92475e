"""Run the serving application on a local (or given) Ray cluster until interrupted."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from cluster.config import RagtuneConfig, RayConfig

__all__ = ["connect_ray", "knowledge_store", "run_serving", "wait_ready"]

logger = logging.getLogger(__name__)
APP_NAME = "ragtune"


def connect_ray(cfg: RayConfig) -> None:
    """Join ``cfg.address`` or start a local single-node Ray bound to loopback."""
    import ray

    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
        return
    # Without this Ray may rewrite the node IP to a non-loopback address (DESIGN.md). Ray reads
    # it at import time, so cluster/cli.py sets it first; this covers library callers that had
    # not imported ray yet.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray gives its GCS 30 s to bind; on a busy 2-core box (an engine or Milvus indexing next
    # door) that start once took longer and `ragtune up` failed. 120 s is Ray's own value for
    # its slower rocksdb backend.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    for attempt in (1, 2):
        try:
            ray.init(
                address="local",  # always a new cluster: never attach to someone's `ray start` head
                num_cpus=cfg.num_cpus,
                include_dashboard=True,
                dashboard_host=cfg.dashboard_host,
                dashboard_port=cfg.dashboard_port,
                _node_ip_address="127.0.0.1",
            )
            return
        except RuntimeError as exc:  # GCS never bound: seen once, with no GCS log to say why
            if attempt == 2 or "Timed out waiting for file" not in str(exc):
                raise
            logger.warning("local Ray did not start (%s); retrying once", exc)
            ray.shutdown()


def wait_ready(url: str, timeout_s: float = 600, headers: dict | None = None) -> None:
    """Poll ``url`` until it answers 200 (the app is deployed and the engine started)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f}s")


@contextmanager
def knowledge_store(cfg: RagtuneConfig) -> Iterator[RagtuneConfig]:
    """Yield ``cfg`` pointing at a store several processes can share.

    A Lite file with ``milvus_lite.enabled`` becomes a milvus-lite server on loopback (started
    here unless one already listens on the port, and stopped on exit only if started here).
    """
    from cluster.milvus_server import MilvusLiteServer

    cfg = cfg.resolved()
    if not (cfg.uses_milvus_lite_file and cfg.milvus_lite.enabled):
        yield cfg
        return
    server = MilvusLiteServer(cfg.milvus_lite_data_dir, port=cfg.milvus_lite.port)
    with server:
        shared = cfg.model_copy(deep=True)
        shared.retrieval.milvus.uri = server.uri
        yield shared


def run_serving(cfg: RagtuneConfig, on_ready: Callable[[str], None] | None = None,
                stop: threading.Event | None = None,
                before_serving: Callable[[RagtuneConfig], None] | None = None) -> None:
    """Deploy the app, call ``on_ready(base_url)``, block until SIGINT/SIGTERM or ``stop``.

    ``before_serving(cfg)`` runs once the knowledge store is up (``ragtune up`` ingests the
    sample knowledge base there).
    """
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if not cfg.serve.rag_enabled:  # no retriever: no knowledge store to share
        _serve(cfg.resolved(), on_ready, stop)
        return
    with knowledge_store(cfg) as shared:
        _serve(shared, on_ready, stop, before_serving)


def _check_real_binds(cfg: RagtuneConfig) -> None:
    """Without keys, refuse to keep serving if the API or a local dashboard answers beyond loopback.

    The config checks resolve host names; this asks the sockets themselves (a proxy or a
    dashboard that ignored its bind address, a host name that resolved differently for Ray).
    """
    from cluster.errors import ConfigError
    from cluster.exposure import reachable_beyond_loopback

    if cfg.serve.auth.keys:
        return
    ports = {"serve.http.port": cfg.serve.http.port}
    if cfg.ray.address is None:
        ports["ray.dashboard_port"] = cfg.ray.dashboard_port
    for field, port in ports.items():
        exposed = reachable_beyond_loopback(port)
        if exposed:
            raise ConfigError(f"{field}={port} answers on {', '.join(exposed)} (beyond loopback) and "
                              "serve.auth.keys is empty; refusing to serve", param=field)


def _serve(cfg: RagtuneConfig, on_ready: Callable[[str], None] | None, stop: threading.Event,
           before_serving: Callable[[RagtuneConfig], None] | None = None) -> None:
    import ray
    from ray import serve

    from serve.app import build_app

    connect_ray(cfg.ray)  # before the sample ingest: Ray's start is the part with a deadline
    try:
        if before_serving:
            before_serving(cfg)
        http = cfg.serve.http
        serve.start(http_options={"host": http.host, "port": http.port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        base_url = f"http://{http.host}:{http.port}"
        wait_ready(f"{base_url}/health")
        _check_real_binds(cfg)
        if on_ready:
            on_ready(base_url)
        stop.wait()
        logger.info("shutting down")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
