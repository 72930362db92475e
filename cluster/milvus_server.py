"""milvus-lite's server mode on loopback, for when several processes need one knowledge store.

A Milvus Lite ``.db`` file is locked to one process (DESIGN.md): retriever replicas and
``ragtune ingest`` next to a running stack would fight over it. ``ragtune up`` therefore runs
``milvus-lite server`` bound to 127.0.0.1 and every client connects by URI — the same client
code as a production Milvus cluster.

**Whose port.** The server writes ``server.pid.json`` (pid, port, data dir) into its data dir.
A listener already on the port is reused only when that file names a live ``milvus-lite
server`` process of this data dir listening on this port — e.g. ``ragtune ingest`` next to a
running ``ragtune up``. Anything else there (another Milvus, another user's server, any
program) is refused: clients would send every document to it.

**Supervised.** The process that started the server restarts it when it exits unexpectedly
(backoff 0.5 s doubling to 10 s; the data survives SIGKILL, DESIGN.md), so a crash costs the
seconds of a restart, not the store. A reused server is not restarted by the reuser.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from cluster.errors import ConfigError

__all__ = ["MilvusLiteServer", "is_listening"]

logger = logging.getLogger(__name__)

PID_FILE = "server.pid.json"


def is_listening(host: str, port: int) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class MilvusLiteServer:
    """Start and supervise ``milvus-lite server`` on loopback, or reuse the one this data dir runs."""

    def __init__(self, data_dir: str | Path, port: int = 19530, host: str = "127.0.0.1",
                 supervise: bool = True, max_backoff_s: float = 10.0):
        self.data_dir, self.port, self.host = Path(data_dir).resolve(), port, host
        self.supervise, self.max_backoff_s = supervise, max_backoff_s
        self.proc: subprocess.Popen | None = None
        self.restarts = 0  # unexpected exits followed by a restart
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid (ours, or the verified one we reuse)."""
        return self.proc.pid if self.proc else self._owner_pid()

    def start(self, timeout_s: float = 60) -> str:
        """Ensure our server answers on ``uri``; return the URI.

        Raises:
            ConfigError: The port is taken by a process that is not this data dir's milvus-lite server.
            RuntimeError: The server did not come up within ``timeout_s``.
        """
        if is_listening(self.host, self.port):
            owner = self._owner_pid()
            if owner is None:
                raise ConfigError(
                    f"port {self.port} on {self.host} is in use by a process that is not the milvus-lite server "
                    f"ragtune started for {self.data_dir}; set milvus_lite.port to a free port", param="milvus_lite.port")
            logger.info("reusing the milvus-lite server pid=%d on %s (data %s)", owner, self.uri, self.data_dir)
            return self.uri
        self._spawn(timeout_s)
        if self.supervise:
            self._supervisor = threading.Thread(target=self._watch, name="milvus-lite-supervisor", daemon=True)
            self._supervisor.start()
        return self.uri

    def _spawn(self, timeout_s: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "server.log", "ab") as log:  # the child keeps its own descriptor
            # `milvus-lite server ...` with ragtune's vectorised BM25 scorer (retrieval/milvus_lite_patches.py).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "retrieval.milvus_lite_patches", "server", "--data-dir", str(self.data_dir),
                 "--host", self.host, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy(),
            )
        self._write_pid_file(self.proc.pid)
        deadline = time.monotonic() + timeout_s
        while not is_listening(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._stop_proc()
                raise RuntimeError(f"milvus-lite server did not start; see {self.data_dir / 'server.log'}")
            time.sleep(0.1)
        if self._owner_pid() != self.proc.pid:  # gRPC sets SO_REUSEPORT: someone may share the port
            self._stop_proc()
            raise ConfigError(f"port {self.port} is shared with another listener; set milvus_lite.port",
                              param="milvus_lite.port")
        logger.info("milvus-lite server pid=%d on %s (data %s)", self.proc.pid, self.uri, self.data_dir)

    def _write_pid_file(self, pid: int) -> None:
        record = {"pid": pid, "port": self.port, "host": self.host, "data_dir": str(self.data_dir)}
        tmp = self.data_dir / f".{PID_FILE}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.data_dir / PID_FILE)

    def _owner_pid(self) -> int | None:
        """The pid in our pid file if it is a live milvus-lite server of this data dir on this port."""
        try:
            record = json.loads((self.data_dir / PID_FILE).read_text())
            proc = psutil.Process(int(record["pid"]))
            cmdline = proc.cmdline()
            listening = {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None
        ours = "server" in cmdline and str(self.data_dir) in cmdline and any("milvus" in part for part in cmdline)
        return proc.pid if ours and self.port in listening else None

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None or proc.poll() is None:
                self._stopping.wait(0.2)
                continue
            if self._stopping.is_set():
                return
            logger.error("milvus-lite server pid=%d exited with %s; restarting in %.1fs",
                         proc.pid, proc.returncode, backoff)
            if self._stopping.wait(backoff):
                return
            try:
                self._spawn(timeout_s=60)
            except (RuntimeError, ConfigError) as exc:
                logger.error("milvus-lite restart failed: %s", exc)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self.restarts += 1
            backoff = 0.5

    def _stop_proc(self) -> None:
        from cluster.processes import stop_process

        stop_process(self.proc, signal.SIGTERM, timeout_s=10)

    def stop(self) -> None:
        """Stop supervising, and stop the server if this object started it (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=70)  # a restart in progress finishes first
        self._stop_proc()
        if self.proc is not None:
            (self.data_dir / PID_FILE).unlink(missing_ok=True)

    def __enter__(self) -> MilvusLiteServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
