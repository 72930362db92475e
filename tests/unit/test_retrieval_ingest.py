"""Incremental ingestion against the in-memory store: counts, ordering, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.errors import InvalidRequestError, NotFoundError
from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig, IngestConfig
from retrieval.ingest import Ingestor, content_hash
from retrieval.testing import FakeEmbedder, InMemoryStore
from retrieval.types import Document, ItemError

SMALL = ChunkingConfig(size=60, overlap=10)


def make(batch_chunks=256, max_chars=5_000, chunking=SMALL):
    store, embedder = InMemoryStore(), FakeEmbedder()
    config = IngestConfig(batch_chunks=batch_chunks, max_document_chars=max_chars, show_progress=False)
    return Ingestor(store, embedder, Chunker(chunking), config), store, embedder


def doc(doc_id, text=None, **kw):
    return Document(doc_id, text or f"document {doc_id} " + "lorem ipsum dolor " * 8, **kw)


def counts(summary):
    return (summary.added, summary.updated, summary.unchanged, summary.deleted, summary.failed)


def test_first_ingest_then_rerun_is_a_noop():
    ingestor, store, embedder = make()
    docs = [doc("a"), doc("b"), doc("c")]
    first = ingestor.ingest("kb", "t1", docs)
    assert counts(first) == (3, 0, 0, 0, 0) and first.chunks == len(store.rows["mem_t1_kb"]) > 3
    ops, calls = len(store.ops), len(embedder.calls)
    again = ingestor.ingest("kb", "t1", docs)
    assert counts(again) == (0, 0, 3, 0, 0) and again.chunks == 0
    assert len(embedder.calls) == calls and len(store.ops) == ops, "a no-op must not write or embed"


def test_update_is_one_replace_under_generation_ids():
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a", "word " * 100), doc("b")])
    old_ids = {r.id for r in store.rows["mem_t1_kb"].values() if r.doc_id == "a"}
    store.ops.clear()
    summary = ingestor.ingest("kb", "t1", [doc("a", "short new text"), doc("b")])
    assert counts(summary) == (0, 1, 1, 0, 0) and summary.chunks == 1
    assert [op for op, _ in store.ops] == ["replace", "flush"], "write and switch are one store call"
    a_rows = [r for r in store.rows["mem_t1_kb"].values() if r.doc_id == "a"]
    generation = a_rows[0].content_hash[:12]
    assert [(r.id, r.text) for r in a_rows] == [(f"a#{generation}#0", "short new text")]
    assert not old_ids & {r.id for r in a_rows}, "a new generation never reuses the old one's ids"


def test_generation_ids_depend_only_on_content():
    first, store1, _ = make()
    second, store2, _ = make()
    first.ingest("kb", "t1", [doc("a", "word " * 100)])
    first.ingest("kb", "t1", [doc("a", "other " * 90)])
    second.ingest("kb", "t1", [doc("a", "other " * 90)])
    assert store1.rows["mem_t1_kb"].keys() == store2.rows["mem_t1_kb"].keys(), "a re-run lands on the same ids"


def test_prune_deletes_documents_absent_from_input():
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a"), doc("b"), doc("c")])
    summary = ingestor.ingest("kb", "t1", [doc("a")], prune=True)
    assert counts(summary) == (0, 0, 1, 2, 0)
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {"a"}


def test_prune_keeps_documents_that_failed_to_load():
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a"), doc("b")])
    failed = ItemError("b.md", "not valid UTF-8", "b")
    summary = ingestor.ingest("kb", "t1", [doc("a"), failed], prune=True)
    assert counts(summary) == (0, 0, 1, 0, 1)
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {"a", "b"}


def test_prune_skipped_when_a_failure_has_no_document_id():
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a"), doc("b")])
    summary = ingestor.ingest("kb", "t1", [doc("a"), ItemError("x.jsonl:3", "invalid JSON")], prune=True)
    assert summary.prune_skipped and summary.deleted == 0
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {"a", "b"}


def test_bad_items_are_reported_and_the_rest_ingested():
    ingestor, store, _ = make(max_chars=500)
    items = [
        doc("ok"),
        Document("empty", "   \n "),
        Document("huge", "x " * 300),
        doc("dup", "first"),
        doc("dup", "second"),
        Document("", "no id"),
        ItemError("bad.txt", "not valid UTF-8 (byte 0xff at offset 3)", "bad.txt"),
    ]
    summary = ingestor.ingest("kb", "t1", items)
    assert counts(summary) == (1, 0, 0, 0, 6)
    reasons = {e.doc_id: e.reason for e in summary.errors}
    assert "empty document" in reasons["empty"]
    assert "too large: 600 characters (limit 500" in reasons["huge"]
    assert "duplicate document id 'dup' (2 times" in reasons["dup"]
    assert "non-empty" in reasons[""]
    assert "UTF-8" in reasons["bad.txt"]
    assert {r.doc_id for r in store.rows["mem_t1_kb"].values()} == {"ok"}


def test_embedding_batches_span_documents():
    ingestor, _, embedder = make(batch_chunks=1000)
    summary = ingestor.ingest("kb", "t1", [doc(str(i)) for i in range(20)])
    assert embedder.calls == [summary.chunks], "all chunks of a small ingest go to the model in one call"


def test_a_failing_batch_fails_only_its_documents():
    ingestor, store, embedder = make(batch_chunks=1)  # one document per batch
    real_encode = embedder.encode

    def flaky(texts):
        if any("poison" in t for t in texts):
            raise RuntimeError("model exploded")
        return real_encode(texts)

    embedder.encode = flaky
    summary = ingestor.ingest("kb", "t1", [doc("a"), doc("b", "poison pill"), doc("c")])
    assert counts(summary) == (2, 0, 0, 0, 1)
    assert summary.errors[0].doc_id == "b" and "model exploded" in summary.errors[0].reason
    # The failed document is retried by the next run (it has no stored hash).
    embedder.encode = real_encode
    assert counts(ingestor.ingest("kb", "t1", [doc("a"), doc("b", "poison pill"), doc("c")])) == (1, 0, 2, 0, 0)


def test_hash_covers_content_and_config():
    a = Document("a", "text", "src", {"k": 1})
    assert content_hash(a, "cfg") == content_hash(Document("a", "text", "src", {"k": 1}), "cfg")
    assert content_hash(a, "cfg") != content_hash(Document("a", "text", "src", {"k": 2}), "cfg")
    assert content_hash(a, "cfg") != content_hash(Document("a", "text", "other"), "cfg")
    assert content_hash(a, "cfg") != content_hash(a, "cfg2")
    # Changing the chunking config re-embeds everything.
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a")])
    rechunked = Ingestor(store, FakeEmbedder(), Chunker(ChunkingConfig(size=40, overlap=5)),
                         IngestConfig(show_progress=False))
    assert rechunked.ingest("kb", "t1", [doc("a")]).updated == 1


def test_interrupted_update_is_rewritten():
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a", "word " * 100)])
    # Simulate a crash between upsert and stale delete: one chunk carries a different hash.
    rows = store.rows["mem_t1_kb"]
    key = sorted(rows)[5]
    rows[key] = replace(rows[key], content_hash="old")
    assert ingestor.ingest("kb", "t1", [doc("a", "word " * 100)]).updated == 1
    assert {r.content_hash for r in rows.values()} != {"old"}


def test_delete_documents_and_tenancy():
    ingestor, _, _ = make()
    ingestor.ingest("kb", "t1", [doc("a"), doc("b")])
    assert ingestor.delete_documents("kb", "t1", ["a", "zzz"]) == 1
    with pytest.raises(NotFoundError, match="document 'a' not found"):
        ingestor.delete_document("kb", "t1", "a")
    with pytest.raises(NotFoundError, match="collection 'kb' not found"):
        ingestor.delete_documents("kb", "t2")
    assert ingestor.delete_documents("kb", "t1") == 1


def test_public_collections_are_read_only_for_others():
    ingestor, store, _ = make()
    ingestor.ingest("shared", "owner", [doc("a")], public=True)
    assert store.resolve("shared", "other").owner == "owner"
    with pytest.raises(InvalidRequestError, match="read-only"):
        ingestor.ingest("shared", "other", [doc("b")])
    with pytest.raises(InvalidRequestError, match="read-only"):
        ingestor.delete_documents("shared", "other")


def test_model_change_is_refused():
    ingestor, store, _ = make()
    ingestor.ingest("kb", "t1", [doc("a")])
    other = Ingestor(store, FakeEmbedder(dim=32, model_name="other"), Chunker(SMALL), IngestConfig(show_progress=False))
    with pytest.raises(InvalidRequestError, match="built with embedding model 'fake-embedder'"):
        other.ingest("kb", "t1", [doc("a")])


def test_summary_to_dict():
    ingestor, _, _ = make()
    summary = ingestor.ingest("kb", "t1", [doc("a"), Document("e", "")])
    data = summary.to_dict()
    assert data["added"] == 1 and data["failed"] == 1 and data["errors"][0]["doc_id"] == "e"
    assert data["seconds"] >= 0
