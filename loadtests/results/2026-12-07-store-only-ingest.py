"""A 100k-chunk ingest with the embedding taken out: what the store alone costs (section 5 of
2026-12-07-vm-retrieve-100k.md).

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python loadtests/results/2026-12-07-store-only-ingest.py [CHUNKS] [DIR]``.
The real chunker, ingest writer and milvus-lite server (``cluster.milvus_server``, as ``--store-server``)
on the ``--scale`` corpus; each chunk's vector is one of 1,024 real MiniLM vectors plus noise, so no
encoder competes for the cores. Prints wall time, the client's and the server's CPU seconds (during
the ingest, and in total once the server's background work has gone idle). With ``PYSPY=path`` set to
a py-spy binary, samples the server at 20 Hz into ``DIR/server-profile.txt`` (raw format).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from cluster.milvus_server import MilvusLiteServer
from cluster.processes import free_port
from retrieval.bench import _config, process_cpu_seconds, scale_corpus, wait_until_idle
from retrieval.config import MilvusConfig
from retrieval.embedder import Embedder
from retrieval.retriever import Retriever
from retrieval.types import Document


class PooledVectors:
    """The real embedder's interface; ``encode`` draws from a pool of real vectors instead of encoding."""

    def __init__(self, embedder: Embedder, pool_texts: list[str]):
        self.embedder, self.dim, self.model_name = embedder, embedder.dim, embedder.model_name
        self.pool = np.asarray(embedder.encode(pool_texts), dtype=np.float32)
        self.rng = np.random.default_rng(0)

    def __getattr__(self, name: str):
        return getattr(self.embedder, name)

    def encoding_streams(self, requested: int | None = None, *, at_most: int | None = None):
        # One stream, as when this probe was measured (and ``self.rng`` is not thread-safe).
        return contextlib.nullcontext(1)

    def encode(self, texts: list[str]) -> list[list[float]]:
        v = self.pool[self.rng.integers(0, len(self.pool), len(texts))]
        v = v + self.rng.normal(0, 0.02, v.shape).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).tolist()


def main() -> None:
    chunks = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    workdir = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/store-only")
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config(workdir, 300)
    with MilvusLiteServer(workdir / "milvus-server", port=free_port()) as server:
        retriever = Retriever(config.model_copy(update={"milvus": MilvusConfig(uri=server.uri)}),
                              embedder=Embedder())
        documents, pieces = scale_corpus(chunks, retriever.ingestor.chunker, 300)
        retriever.ingestor.embedder = PooledVectors(retriever.embedder, [t for p in pieces[:400] for t in p][:1024])
        retriever.ingestor.ingest("store-only", "bench", [Document("warm-up", "warm up")], progress=False)
        process = psutil.Process(server.pid)
        spy = subprocess.Popen([os.environ["PYSPY"], "record", "--pid", str(server.pid), "--format", "raw", "-o",
                                str(workdir / "server-profile.txt"), "--rate", "20", "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if os.environ.get("PYSPY") else None
        server0, client0, start = process_cpu_seconds(process), time.process_time(), time.perf_counter()
        summary = retriever.ingestor.ingest("store-only", "bench", documents, progress=True)
        wall, client = time.perf_counter() - start, time.process_time() - client0
        during = process_cpu_seconds(process) - server0
        wait_until_idle(server.pid, window_s=10)  # until the background work is done
        total = process_cpu_seconds(process) - server0
        if spy:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        retriever.close()
    print(json.dumps({"chunks": summary.chunks, "wall_s": round(wall, 1), "client_cpu_s": round(client, 1),
                      "server_cpu_during_s": round(during, 1), "server_cpu_total_s": round(total, 1)}))


if __name__ == "__main__":
    main()
