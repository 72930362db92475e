"""Ingest into a collection that already holds rows: write units sized to the collection (``d42a32e``)
against sizing from this ingest's rows only (before it). Real encoder for the new chunks, real
milvus-lite server, alternating arms in one run; results in section 6 of ``2026-12-07-vm-retrieve-100k.md``.

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python loadtests/results/2026-12-08-write-sizing-ab.py [STORED] [NEW] [DIR]``.
Per arm: a fresh server; ``STORED`` chunks written with pooled real vectors (no encoder, as
``2026-12-07-store-only-ingest.py``) and the server's background work left to go idle; then ``NEW``
chunks of other documents ingested with MiniLM, timed against the raw encode of the same texts
(half before, half after the ingest, each once the server is idle). The "small" arm replaces ``Ingestor._stored_rows`` by 0 — the write
sizing as it was before ``d42a32e``; everything else is the same code.
The run recorded in the results used an inline copy of ``retrieval.bench.wait_until_idle`` (the same
5 s window and 0.5 CPU-s threshold), replaced by the import since.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import psutil

from cluster.milvus_server import MilvusLiteServer
from cluster.processes import free_port
from retrieval.bench import (
    _config,
    _raw_encode,
    _Timed,
    _timed,
    process_cpu_seconds,
    scale_corpus,
    wait_until_idle,
)
from retrieval.config import MilvusConfig
from retrieval.embedder import Embedder
from retrieval.retriever import Retriever
from retrieval.types import Document

_spec = importlib.util.spec_from_file_location("store_only", Path(__file__).with_name("2026-12-07-store-only-ingest.py"))
store_only = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_only)  # PooledVectors


def arm(name: str, stored: int, new: int, workdir: Path, embedder: Embedder) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config(workdir, 300)
    with MilvusLiteServer(workdir / "milvus-server", port=free_port()) as server:
        retriever = Retriever(config.model_copy(update={"milvus": MilvusConfig(uri=server.uri)}), embedder=embedder)
        ingestor = retriever.ingestor
        try:
            documents, pieces = scale_corpus(stored + new, ingestor.chunker, 300)
            cut, total = 0, 0
            while total < stored:
                total, cut = total + len(pieces[cut]), cut + 1
            old_docs, new_docs = documents[:cut], documents[cut:]
            texts = [t for p in pieces[cut:] for t in p]
            ingestor.embedder = store_only.PooledVectors(embedder, [t for p in pieces[:400] for t in p][:1024])
            ingestor.ingest("ab", "bench", [Document("warm-up", "warm up"), *old_docs], progress=False)
            process = psutil.Process(server.pid)
            idle_s = wait_until_idle(process.pid)
            ingestor.embedder = embedder
            if name == "small":
                ingestor._stored_rows = lambda info: 0  # the sizing before d42a32e
            raw = _raw_encode(embedder)
            raw(texts[:128])  # warm-up
            probe = texts[:: max(1, len(texts) // 2000)][:2000]
            raw_before = _timed(raw, probe[0::2])
            timers = {"write": 0.0}
            ingestor.store = _Timed(ingestor.store, ("replace_documents", "flush"), timers, "write")
            server0 = process_cpu_seconds(process)
            summary = ingestor.ingest("ab", "bench", new_docs, progress=True)
            server_during = process_cpu_seconds(process) - server0
            ingestor.store = ingestor.store._inner
            after_idle_s = wait_until_idle(process.pid)  # the writes' index builds would slow the raw reference
            server_total = process_cpu_seconds(process) - server0
            raw_after = _timed(raw, probe[1::2])
        finally:
            retriever.close()
    raw_rate = len(probe) / (raw_before + raw_after)
    rate = summary.chunks / summary.seconds
    return {"arm": name, "stored": total + 1, "new_chunks": summary.chunks, "failed": summary.failed,
            "ingest_s": round(summary.seconds, 1), "ingest_rate": round(rate, 1),
            "raw_rate": round(raw_rate, 1), "raw_before": round(len(probe[0::2]) / raw_before, 1),
            "raw_after": round(len(probe[1::2]) / raw_after, 1), "ingest_vs_raw": round(rate / raw_rate, 3),
            "writes": int(timers.get("replace_documents_calls", 0)), "write_s": round(timers["write"], 1),
            "server_cpu_during_s": round(server_during, 1), "server_cpu_total_s": round(server_total, 1),
            "preload_idle_wait_s": round(idle_s, 1), "after_idle_wait_s": round(after_idle_s, 1)}


def main() -> None:
    stored = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 12_000
    root = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/write-sizing-ab")
    embedder = Embedder()
    for i, name in enumerate(("sized", "small", "small", "sized")):  # ABBA: drift cancels in the means
        print(json.dumps(arm(name, stored, new, root / f"{i}-{name}", embedder)), flush=True)


if __name__ == "__main__":
    main()
