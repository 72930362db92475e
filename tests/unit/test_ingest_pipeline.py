"""The ingest pipeline: store writes on a writer thread, overlapped with the next group's encode."""

from __future__ import annotations

import threading
import time

import pytest

import retrieval.ingest
from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig, IngestConfig
from retrieval.ingest import Ingestor
from retrieval.testing import FakeEmbedder, InMemoryStore
from retrieval.types import Document

SMALL = ChunkingConfig(size=60, overlap=10)


@pytest.fixture(autouse=True)
def one_row_writes(monkeypatch):
    """These tests watch single-document groups move through the writer: no minimum write size."""
    monkeypatch.setattr(retrieval.ingest, "_WRITE_ROWS", 1)


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


def test_writes_keep_input_order():
    store = InMemoryStore()
    make(store, FakeEmbedder()).ingest("kb", "t1", docs(6))
    order = [i.split("#")[0] for op, ids in store.ops if op == "replace" for i in ids]
    assert list(dict.fromkeys(order)) == [f"d{i}" for i in range(6)]


class SlowStore(InMemoryStore):
    """Each write takes long enough for several groups to encode meanwhile."""

    def __init__(self, delay_s: float, fail_doc: str | None = None):
        super().__init__()
        self.delay_s, self.fail_doc, self.writes = delay_s, fail_doc, []

    def replace_documents(self, info, records):
        self.writes.append(list(dict.fromkeys(r.doc_id for r in records)))
        time.sleep(self.delay_s)
        if any(r.doc_id == self.fail_doc for r in records):
            raise RuntimeError("store refused")
        super().replace_documents(info, records)


def test_groups_encoded_during_a_slow_write_are_written_together():
    store = SlowStore(0.2)
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(12))
    assert summary.added == 12 and summary.chunks == len(store.rows["mem_t1_kb"])
    assert len(store.writes) < 12, "groups encoded while the writer was busy share a write"
    assert max(map(len, store.writes)) <= 4, "at most four groups in one write"
    assert [d for w in store.writes for d in w] == [f"d{i}" for i in range(12)], "input order"


def test_a_failing_write_fails_the_documents_written_with_it():
    store = SlowStore(0.05, fail_doc="d2")
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(8))
    failed_write = next(w for w in store.writes if "d2" in w)
    assert {e.doc_id for e in summary.errors} == set(failed_write) and summary.failed == len(failed_write)
    assert all("store refused" in e.reason for e in summary.errors)
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {f"d{i}" for i in range(8)} - set(failed_write)
    assert summary.added == 8 - len(failed_write) and summary.chunks == len(store.rows["mem_t1_kb"])


def test_the_writer_flushes_every_flush_rows(monkeypatch):
    monkeypatch.setattr(retrieval.ingest, "_FLUSH_ROWS", 5)
    store = InMemoryStore()
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(6))
    ops = [op for op, _ in store.ops]
    assert ops.count("flush") >= 2 and ops[-1] == "flush", ops
    assert ops.index("flush") < len(ops) - 1, "an intermediate flush during the ingest, not only the final one"
    assert summary.added == 6


def test_a_failed_intermediate_flush_fails_nothing(monkeypatch):
    class NoFlush(InMemoryStore):
        calls = 0

        def flush(self, info):
            NoFlush.calls += 1
            if NoFlush.calls == 1:
                raise RuntimeError("flush refused")
            super().flush(info)

    monkeypatch.setattr(retrieval.ingest, "_FLUSH_ROWS", 5)
    store = NoFlush()
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(4))
    assert (summary.added, summary.failed) == (4, 0) and NoFlush.calls >= 2


class RecordingStore(InMemoryStore):
    def __init__(self):
        super().__init__()
        self.write_rows = []

    def replace_documents(self, info, records):
        self.write_rows.append(len(records))
        super().replace_documents(info, records)


def test_writes_carry_at_least_write_rows_rows(monkeypatch):
    monkeypatch.setattr(retrieval.ingest, "_WRITE_ROWS", 10)
    store = RecordingStore()
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(12))  # one document (~3 chunks) per group
    assert sum(store.write_rows) == summary.chunks == len(store.rows["mem_t1_kb"])
    assert len(store.write_rows) >= 2 and all(n >= 10 for n in store.write_rows[:-1]), store.write_rows
    assert all(n < 5 * 10 for n in store.write_rows), "a write stops growing at _MERGE_WRITES units"


def test_writes_grow_with_the_rows_written_so_far(monkeypatch):
    monkeypatch.setattr(retrieval.ingest, "_WRITE_ROWS", 4)
    monkeypatch.setattr(retrieval.ingest, "_WRITE_GROWTH", 2)
    monkeypatch.setattr(retrieval.ingest, "_FLUSH_ROWS", 30)
    store = RecordingStore()
    summary = make(store, FakeEmbedder()).ingest("kb", "t1", docs(80))  # ~3 chunks a document, one per group
    assert sum(store.write_rows) == summary.chunks == len(store.rows["mem_t1_kb"])
    before = 0
    for n in store.write_rows[:-1]:
        assert n >= max(4, min(before // 2, 30)), (before, store.write_rows)
        before += n
    assert max(store.write_rows[:-1]) >= 30, "the unit grew up to its cap"
    assert max(store.write_rows) < 4 * 30 + 4, "and stops there (at most _MERGE_WRITES units and a group)"
    fixed = RecordingStore()
    monkeypatch.setattr(retrieval.ingest, "_WRITE_GROWTH", 10**9)
    make(fixed, FakeEmbedder()).ingest("kb", "t1", docs(80))
    assert len(store.write_rows) < len(fixed.write_rows) / 2, (store.write_rows, fixed.write_rows)


def test_writes_into_a_large_collection_start_large(monkeypatch):
    # The unit counts the rows stored before this ingest too: each write's reads walk all of them.
    monkeypatch.setattr(retrieval.ingest, "_WRITE_ROWS", 4)
    monkeypatch.setattr(retrieval.ingest, "_WRITE_GROWTH", 2)
    monkeypatch.setattr(retrieval.ingest, "_FLUSH_ROWS", 30)
    store = RecordingStore()
    first = make(store, FakeEmbedder()).ingest("kb", "t1", docs(40))
    assert first.chunks >= 60
    store.write_rows.clear()
    more = [Document(f"new{i}", f"new document {i} " + "lorem ipsum dolor " * 8) for i in range(40)]
    second = make(store, FakeEmbedder()).ingest("kb", "t1", more)
    assert second.added == 40 and sum(store.write_rows) == second.chunks
    assert store.write_rows[0] >= 30, ("the first write is already capped size", store.write_rows)
    empty = RecordingStore()
    make(empty, FakeEmbedder()).ingest("kb", "t1", more)
    assert empty.write_rows[0] < 30, ("an empty collection starts small", empty.write_rows)


class MeetingEmbedder(FakeEmbedder):
    """Every encode call waits until ``streams`` calls are running at once (a barrier, 10 s at most)."""

    def __init__(self, streams: int, fail_doc: str | None = None):
        super().__init__(streams=streams)
        self.barrier, self.fail_doc = threading.Barrier(streams, timeout=10), fail_doc
        self.met, self.threads = 0, set()

    def encode(self, texts):
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()  # raises BrokenBarrierError when the partner never comes
        self.met += 1
        if self.fail_doc and any(t.startswith(f"document {self.fail_doc[1:]} ") for t in texts):
            raise RuntimeError("encoder refused")
        return super().encode(texts)


def test_groups_encode_on_concurrent_streams_and_land_as_one_stream_would():
    store, embedder = InMemoryStore(), MeetingEmbedder(streams=2)
    summary = make(store, embedder).ingest("kb", "t1", docs(6))  # one document a group: 6 groups
    assert embedder.met == 6, "every group's encode ran beside another one"
    assert len(embedder.threads) == 2 and all(n.startswith("ingest-encode") for n in embedder.threads)
    single = InMemoryStore()
    make(single, FakeEmbedder()).ingest("kb", "t1", docs(6))
    assert summary.added == 6 and summary.failed == 0
    assert store.rows == single.rows, "same rows and vectors as one stream"
    order = [i.split("#")[0] for op, ids in store.ops if op == "replace" for i in ids]
    assert list(dict.fromkeys(order)) == [f"d{i}" for i in range(6)], "written in input order"


def test_a_failing_stream_fails_only_its_group():
    store = InMemoryStore()
    summary = make(store, MeetingEmbedder(streams=2, fail_doc="d3")).ingest("kb", "t1", docs(6))
    assert [e.doc_id for e in summary.errors] == ["d3"] and "encoder refused" in summary.errors[0].reason
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {f"d{i}" for i in range(6)} - {"d3"}


def test_in_order_keeps_input_order_and_bounds_the_work_ahead():
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.ingest import _in_order

    submitted, lock = [], threading.Lock()

    def work(i):
        with lock:
            submitted.append(i)
        time.sleep(0.02 * (5 - i % 5))  # later items finish first
        return i * i

    def items():  # a generator, as the ingest's groups are
        yield from range(12)

    out = []
    with ThreadPoolExecutor(3) as pool:
        for i, future in _in_order(pool, work, items(), ahead=3):
            assert len(submitted) <= i + 3, "never more than `ahead` items past the one yielded"
            out.append((i, future.result()))
    assert out == [(i, i * i) for i in range(12)]


def test_streams_never_outnumber_the_groups():
    class Asked(FakeEmbedder):
        def encoding_streams(self, requested=None, *, at_most=None):
            self.asked = (requested, at_most)
            return super().encoding_streams(requested, at_most=at_most)

    one_group = Asked(streams=4)
    make(InMemoryStore(), one_group, batch_chunks=10_000).ingest("kb", "t1", docs(5))
    assert one_group.asked == (None, 1), "one group encodes as one call on every thread"
    six = Asked(streams=4)
    make(InMemoryStore(), six).ingest("kb", "t1", docs(6))
    assert six.asked == (None, 6)
