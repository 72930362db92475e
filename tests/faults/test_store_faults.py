"""The milvus-lite server SIGKILLed mid-ingest: the supervisor restarts it, a re-run of the same
ingest lands exactly where an uninterrupted ingest lands, nothing written before the kill is lost.

Run: flock /tmp/ragtune-heavy.lock .venv/bin/pytest -m faults -s tests/faults/test_store_faults.py
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from pymilvus import MilvusClient

from cluster.milvus_server import MilvusLiteServer
from cluster.processes import free_port
from retrieval.embedder import Embedder
from tests.integration.test_ingest_races import corpus, ingestor, snapshot

pytestmark = pytest.mark.faults


def test_milvus_killed_mid_ingest_restarts_and_rerun_is_exact(tmp_path):
    embedder = Embedder()
    with MilvusLiteServer(tmp_path / "milvus", port=free_port()) as server:
        writer = ingestor(server.uri, embedder, batch_chunks=4)
        writer.ingest("reference", "acme", corpus(2))
        writer.ingest("victim", "acme", corpus(1))
        physical = writer.store.resolve("victim", "acme").physical
        reference = writer.store.resolve("reference", "acme").physical
        before_pid, outcome = server.proc.pid, {}

        def run():
            try:
                outcome["summary"] = writer.ingest("victim", "acme", corpus(2))
            except Exception as exc:  # the store vanished under it: reported, then re-run
                outcome["error"] = type(exc).__name__

        replace = writer.store.replace_documents
        calls = []

        def counting(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # two groups switched; kill the server under the third
                os.kill(before_pid, signal.SIGKILL)
            return replace(*args, **kwargs)

        writer.store.replace_documents = counting
        thread = threading.Thread(target=run)
        killed_at = time.monotonic()
        thread.start()
        thread.join(timeout=300)
        writer.store.replace_documents = replace
        while server.restarts == 0 and time.monotonic() - killed_at < 60:
            time.sleep(0.1)
        assert server.restarts == 1 and server.proc.pid != before_pid, "the supervisor must restart the server"
        restarted = time.monotonic()
        # pymilvus retries an unavailable server within milvus.timeout_s, so the interrupted run may
        # fail some groups, raise, or ride out the restart; either way the re-run must be exact.
        summary = outcome.get("summary")
        assert summary is not None or "error" in outcome
        rerun = writer.ingest("victim", "acme", corpus(2))
        assert rerun.failed == 0, rerun.errors
        client = MilvusClient(uri=server.uri)
        assert snapshot(client, physical) == snapshot(client, reference) != [], "re-run lands on the same rows"
        print(f"\nmilvus-lite kill mid-ingest: supervisor restart within {restarted - killed_at:.1f}s of the "
              f"kill (includes the interrupted ingest), interrupted run: "
              f"{summary.to_dict()['failed'] if summary else outcome['error']} failed, re-run: {rerun.updated} "
              f"updated, {rerun.unchanged} unchanged, 0 failed, state equal to an uninterrupted ingest")
        writer.close()
