"""The milvus-lite server SIGKILLed mid-ingest: the supervisor restarts it, the store client reconnects
(``retrieval.milvus._ReloadingClient``), a re-run of the same ingest lands exactly where an
uninterrupted ingest lands, nothing written before the kill is lost.

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
        before_pid, outcome, times = server.proc.pid, {}, {}

        def run():
            try:
                outcome["summary"] = writer.ingest("victim", "acme", corpus(2))
            except Exception as exc:  # the store stayed away longer than milvus.timeout_s: reported, re-run
                outcome["error"] = type(exc).__name__
            times["done"] = time.monotonic()

        def watch():  # the moment the supervisor's restarted server listens again
            while server.restarts == 0 and time.monotonic() - times.get("killed", time.monotonic()) < 60:
                time.sleep(0.02)
            times["restarted"] = time.monotonic()

        replace = writer.store.replace_documents
        calls = []

        def counting(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # two groups switched; kill the server under the third
                times["killed"] = time.monotonic()
                os.kill(before_pid, signal.SIGKILL)
                threading.Thread(target=watch, daemon=True).start()
            return replace(*args, **kwargs)

        writer.store.replace_documents = counting
        thread = threading.Thread(target=run)
        started = time.monotonic()
        thread.start()
        thread.join(timeout=300)
        writer.store.replace_documents = replace
        assert not thread.is_alive(), "the interrupted ingest hung"
        assert "killed" in times, "the ingest never reached the third group"
        deadline = time.monotonic() + 60
        while "restarted" not in times and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.restarts == 1 and server.proc.pid != before_pid, "the supervisor must restart the server"
        restart_s = times["restarted"] - times["killed"]
        # The client retries an unavailable server within milvus.timeout_s (30 s): a 1-2 s restart is
        # ridden out, so the interrupted run itself completes with nothing failed.
        summary = outcome.get("summary")
        assert summary is not None, f"the interrupted ingest raised {outcome.get('error')}"
        assert summary.failed == 0, summary.errors
        rerun = writer.ingest("victim", "acme", corpus(2))
        assert rerun.failed == 0, rerun.errors
        assert rerun.added == rerun.updated == 0, "the interrupted run already wrote every document"
        client = MilvusClient(uri=server.uri)
        for name in (physical, reference):  # a restarted server has every collection released
            client.load_collection(name)
        assert snapshot(client, physical) == snapshot(client, reference) != [], "re-run lands on the same rows"
        client.close()
        print(f"\nmilvus-lite kill mid-ingest: server back {restart_s:.1f}s after the kill; interrupted ingest "
              f"finished "
              f"{times['done'] - times['killed']:.1f}s after the kill (whole run {times['done'] - started:.1f}s), "
              f"{summary.added + summary.updated} written, {summary.unchanged} unchanged, {summary.failed} failed; "
              f"re-run: {rerun.unchanged} unchanged, 0 failed; rows equal an uninterrupted ingest")
        writer.close()
