"""milvus-lite's server mode on loopback, for when several processes need one knowledge store.

A Milvus Lite ``.db`` file is locked to one process (DESIGN.md): retriever replicas and
``ragtune ingest`` next to a running stack would fight over it. ``ragtune up`` therefore runs
``milvus-lite server`` bound to 127.0.0.1 and every client connects by URI — the same client
code as a production Milvus cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["MilvusLiteServer", "is_listening"]

logger = logging.getLogger(__name__)


def is_listening(host: str, port: int) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class MilvusLiteServer:
    """Start ``milvus-lite server`` (or reuse one already listening); stop only what we started."""

    def __init__(self, data_dir: str | Path, port: int = 19530, host: str = "127.0.0.1"):
        self.data_dir, self.port, self.host = Path(data_dir), port, host
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60) -> str:
        """Ensure a server answers on ``uri``; return the URI."""
        if is_listening(self.host, self.port):
            logger.info("reusing the Milvus server on %s", self.uri)
            return self.uri
        self.data_dir.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
        with open(self.data_dir / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [exe, "server", "--data-dir", str(self.data_dir), "--host", self.host, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy(),
            )
        deadline = time.monotonic() + timeout_s
        while not is_listening(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"milvus-lite server did not start; see {self.data_dir / 'server.log'}")
            time.sleep(0.2)
        logger.info("milvus-lite server pid=%d on %s (data %s)", self.proc.pid, self.uri, self.data_dir)
        return self.uri

    def stop(self) -> None:
        """Stop the server if this object started it (SIGTERM, then SIGKILL after 10 s)."""
        from cluster.processes import stop_process

        stop_process(self.proc, signal.SIGTERM, timeout_s=10)

    def __enter__(self) -> MilvusLiteServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
