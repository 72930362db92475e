"""The ingest pipeline: store writes on a writer thread, overlapped with the next group's encode."""

from __future__ import annotations

import threading

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig, IngestConfig
from retrieval.ingest import Ingestor
from retrieval.testing import FakeEmbedder, InMemoryStore
from retrieval.types import Document

SMALL = ChunkingConfig(size=60, overlap=10)


def docs(n: int) -> list[Document]:
    return [Document(f"d{i}", f"document {i} " + "lorem ipsum dolor " * 8) for i in range(n)]


class GatedStore(InMemoryStore):
    """The first write blocks until the embedder has started the next group (or times out)."""

    def __init__(self, next_encode: threading.Event):
        super().__init__()
        self.next_encode, self.overlapped, self.threads = next_encode, None, []

    def replace_documents(self, info, records):
        self.threads.append(threading.current_thread().name)
        if self.overlapped is None:
            self.overlapped = self.next_encode.wait(timeout=10)
        super().replace_documents(info, records)


class CountingEmbedder(FakeEmbedder):
    def __init__(self, started: threading.Event):
        super().__init__()
        self.started = started

    def encode(self, texts):
        if self.calls:  # the second group
            self.started.set()
        return super().encode(texts)


def make(store, embedder, batch_chunks=1):
    config = IngestConfig(batch_chunks=batch_chunks, show_progress=False)
    return Ingestor(store, embedder, Chunker(SMALL), config)


def test_next_group_encodes_while_the_previous_is_written():
    event = threading.Event()
    store, embedder = GatedStore(event), CountingEmbedder(event)
    summary = make(store, embedder).ingest("kb", "t1", docs(4))
    assert store.overlapped is True, "the second encode must start while the first write is in flight"
    assert summary.added == 4 and summary.failed == 0
    assert summary.chunks == len(store.rows["mem_t1_kb"])
    assert all(name.startswith("ingest-writer") for name in store.threads), store.threads


def test_writes_keep_input_order_and_one_write_per_group():
    store = InMemoryStore()
    make(store, FakeEmbedder()).ingest("kb", "t1", docs(5))
    written = [ids[0].split("#")[0] for op, ids in store.ops if op == "replace"]
    assert written == [f"d{i}" for i in range(5)]


def test_a_failing_write_fails_only_its_group():
    class Flaky(InMemoryStore):
        def replace_documents(self, info, records):
            if any(r.doc_id == "d2" for r in records):
                raise RuntimeError("store refused")
            super().replace_documents(info, records)

    store = Flaky()
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(4))
    assert (summary.added, summary.failed) == (3, 1)
    assert summary.errors[0].doc_id == "d2" and "store refused" in summary.errors[0].reason
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {"d0", "d1", "d3"}
    assert summary.chunks == len(store.rows["mem_t1_kb"])
