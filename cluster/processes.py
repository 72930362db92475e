"""Run ``ragtune`` as a black-box server process for integration and e2e tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

__all__ = ["RagtuneServer"]


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
                                     cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ragtune exited with {self.proc.returncode}:\n{self.tail()}")
            if "is serving" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(1)
        raise TimeoutError(f"ragtune not ready after {self.timeout_s}s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: serve.shutdown() + ray.shutdown()
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
