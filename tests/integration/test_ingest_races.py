"""Document updates on real Milvus Lite (server mode, as retriever replicas share it): concurrent
writers of one document, readers during updates, and writers killed at every step of a write.

Run: flock /tmp/ragtune-heavy.lock .venv/bin/pytest -m integration tests/integration/test_ingest_races.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from pymilvus import MilvusClient

from cluster.milvus_server import MilvusLiteServer
from cluster.processes import REPO, free_port
from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig, IngestConfig, MilvusConfig
from retrieval.embedder import Embedder
from retrieval.ingest import Ingestor
from retrieval.milvus import MilvusStore
from retrieval.types import Document

pytestmark = pytest.mark.integration

CHUNKING = ChunkingConfig(size=200, overlap=20)
# Two versions of one document with different chunk counts: a mix of both, or a shrink that left
# the old tail, is visible as a wrong count or two hashes.
LONG = " ".join(f"Clause {i}: refunds are granted within {i} days of purchase." for i in range(40))
SHORT = "Refunds are no longer granted."


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    with MilvusLiteServer(tmp_path_factory.mktemp("milvus-races"), port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def ingestor(uri: str, embedder: Embedder, batch_chunks: int = 256) -> Ingestor:
    store = MilvusStore(MilvusConfig(uri=uri, consistency_level="Strong"))
    config = IngestConfig(batch_chunks=batch_chunks, max_document_chars=50_000, show_progress=False)
    return Ingestor(store, embedder, Chunker(CHUNKING), config)


def rows(client: MilvusClient, physical: str, expr: str = "chunk_index >= -1") -> list[dict]:
    return client.query(physical, filter=expr, output_fields=["doc_id", "chunk_index", "content_hash", "text"],
                        consistency_level="Strong")


def test_two_writers_and_a_reader_never_see_a_half_done_document(milvus, embedder):
    writers = [ingestor(milvus.uri, embedder) for _ in range(2)]  # two stores: two replicas' clients
    writers[0].ingest("policy-kb", "acme", [Document("policy", LONG)])
    chunk_counts = {len(writers[0].chunker.split(text)) for text in (LONG, SHORT)}
    physical = writers[0].store.resolve("policy-kb", "acme").physical
    reader = MilvusClient(uri=milvus.uri)
    seen, errors, done = [], [], threading.Event()

    def write(w: Ingestor, texts: list[str]) -> None:
        try:
            for text in texts:
                summary = w.ingest("policy-kb", "acme", [Document("policy", text)])
                assert summary.failed == 0, summary.errors
        except Exception as exc:  # surfaced below
            errors.append(exc)

    # The reader is a third store (another retriever replica's client); `raw` counts what a plain
    # milvus-lite query sees, which can show both versions while a flush runs (retrieval/milvus.py).
    store = MilvusStore(MilvusConfig(uri=milvus.uri, consistency_level="Strong"))
    vector, info = embedder.encode(["refund days"])[0], store.resolve("policy-kb", "acme")
    depth, overlaps = [0], []  # writers inside the critical section (read old rows … re-check)
    for w in writers:
        _instrument(w.store, depth, overlaps)
    raw = []

    def read() -> None:  # both read paths: the store's document read and search (each retries a mix)
        while not done.is_set():
            live = [r for r in rows(reader, physical, 'doc_id == "policy"') if r["content_hash"]]
            raw.append(len({r["content_hash"] for r in live}) != 1 or len(live) not in chunk_counts)
            live = store.document_rows(info, ["policy"])
            seen.append(("query", len(live), len({r["content_hash"] for r in live})))
            hits = store.search(info, vector=vector, query="refund days", top_k=100, filter='document == "policy"',
                                mode="hybrid")
            seen.append(("search", len(hits), len({h.id.split("#")[1] for h in hits})))

    threads = [threading.Thread(target=write, args=(writers[0], [SHORT, LONG] * 4)),
               threading.Thread(target=write, args=(writers[1], [LONG, SHORT] * 4))]
    read_thread = threading.Thread(target=read)
    read_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    read_thread.join()
    assert not errors, errors
    assert not overlaps, f"two writers were inside one document's critical section {len(overlaps)} times"
    assert len(seen) > 10, "the reader must have overlapped the writers"
    final = rows(reader, physical, 'doc_id == "policy"')
    assert len({r["content_hash"] for r in final}) == 1 and len(final) in chunk_counts
    assert all(r["content_hash"] for r in final), "tombstones must be gone"
    assert not reader.query(writers[0].store.locks.collection, filter='key != ""', output_fields=["key"],
                            consistency_level="Strong"), "every lock row released"
    for w in [*writers, store]:
        w.close()
    bad = [s for s in seen if s[2] != 1 or s[1] not in chunk_counts]
    print(f"{len(seen)} reads, {len(bad)} half-done; {sum(raw)} of {len(raw)} plain queries saw a mix")
    assert not bad, f"{len(bad)} of {len(seen)} reads saw a half-done document: {bad[:5]}"


_DEPTH_LOCK = threading.Lock()


def _instrument(store: MilvusStore, depth: list[int], overlaps: list[int]) -> None:
    switch = store._switch  # the critical section: read old rows, switch, delete tombstones, re-check

    def counted(*args, **kwargs):
        with _DEPTH_LOCK:
            depth[0] += 1
            if depth[0] > 1:
                overlaps.append(depth[0])
        try:
            return switch(*args, **kwargs)
        finally:
            with _DEPTH_LOCK:
                depth[0] -= 1

    store._switch = counted


# The child updates to version 2 and dies by SIGKILL just before the N-th call of one store step.
# Each point is a distinct crash state: holding lock rows before any write; after the switch but
# before the tombstone delete; between two groups of a many-document ingest.
CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from retrieval.doclocks import DocumentLocks
from retrieval.embedder import Embedder
from retrieval.milvus import MilvusStore
from tests.integration.test_ingest_races import corpus, ingestor
cls, name = {{"wait": (DocumentLocks, "_wait"), "tombstones": (MilvusStore, "_delete_batched"),
              "replace": (MilvusStore, "replace_documents")}}[{target!r}]
original, calls = getattr(cls, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(cls, name, dying)
import retrieval.ingest
retrieval.ingest._WRITE_ROWS = 1  # one write per group of 8 chunks: the 3rd write falls between groups
ingestor({uri!r}, Embedder(), batch_chunks=8).ingest({collection!r}, "acme", corpus(2))
"""


def corpus(version: int) -> list[Document]:
    return [Document(f"doc{i}", f"Version {version} of document {i}. " + LONG[: 300 + 40 * i]) for i in range(12)]


def snapshot(client: MilvusClient, physical: str) -> list[tuple]:
    return sorted((r["id"], r["doc_id"], r["chunk_index"], r["content_hash"], r["text"])
                  for r in client.query(physical, filter="chunk_index >= -1", output_fields=["*"],
                                        consistency_level="Strong"))


@pytest.mark.parametrize(("target", "nth"), [("wait", 1), ("tombstones", 1), ("replace", 3)])
def test_ingest_killed_mid_write_reruns_to_the_same_state(milvus, embedder, target, nth):
    writer = ingestor(milvus.uri, embedder, batch_chunks=8)
    collection = f"crash-kb-{target}"
    client = MilvusClient(uri=milvus.uri)
    writer.ingest(collection, "acme", corpus(1))
    writer.ingest("reference-kb", "acme", corpus(2))  # where an uninterrupted update lands
    script = CHILD.format(repo=str(REPO), target=target, nth=nth, uri=milvus.uri, collection=collection)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    started = time.monotonic()
    summary = writer.ingest(collection, "acme", corpus(2))
    assert summary.failed == 0, summary.errors
    assert time.monotonic() - started < 20, "a dead writer's lock rows must not hold the re-run for a lease"
    physical = writer.store.resolve(collection, "acme").physical
    reference = writer.store.resolve("reference-kb", "acme").physical
    assert snapshot(client, physical) == snapshot(client, reference) != []
    assert not client.query(writer.store.locks.collection, filter='key != ""', output_fields=["key"],
                            consistency_level="Strong"), "no lock rows left"
    again = writer.ingest(collection, "acme", corpus(2))
    assert (again.unchanged, again.chunks) == (len(corpus(2)), 0), "the re-run's result is final"
    writer.close()
