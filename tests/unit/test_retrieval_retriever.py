"""Retriever with fakes: request checks, batching of concurrent queries, document updates."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.errors import InvalidRequestError, NotFoundError
from retrieval import batching
from retrieval.batching import MicroBatcher
from retrieval.config import IngestConfig, RetrievalConfig, SearchConfig
from retrieval.retriever import Retriever
from retrieval.testing import FakeEmbedder, InMemoryStore

DOCS = [
    {"id": "pumps", "text": "The pump needs a new valve every spring."},
    {"id": "tea", "text": "Green tea is brewed at eighty degrees."},
    {"id": "code", "text": "Error ZX-81 means the valve sensor is unplugged.", "metadata": {"lang": "en"}},
]


@pytest.fixture
def retriever():
    config = RetrievalConfig(search=SearchConfig(batch_wait_timeout_s=0.05), ingest=IngestConfig(show_progress=False))
    r = Retriever(config, embedder=FakeEmbedder(), store=InMemoryStore())
    summary = asyncio.run(r.upsert_documents("kb", "acme", DOCS))
    assert summary.added == 3
    return r


def test_retrieve_ranks_the_matching_document_first(retriever):
    chunks = asyncio.run(retriever.retrieve("how is green tea brewed", "kb", "acme", top_k=2))
    assert chunks[0].document == "tea" and chunks[0].id.startswith("tea#") and chunks[0].id.endswith("#0") and len(chunks) == 2
    assert set(chunks[0].to_dict()) == {"id", "document", "source", "score", "text", "chunk_index", "metadata"}


def test_concurrent_queries_share_one_embedding_call(retriever):
    embedder = retriever.embedder
    embedder.calls.clear()

    async def many():
        return await asyncio.gather(*(retriever.retrieve(f"valve question {i}", "kb", "acme") for i in range(8)))

    results = asyncio.run(many())
    assert len(results) == 8 and all(r for r in results)
    assert sum(embedder.calls) == 8 and len(embedder.calls) <= 2, embedder.calls


def test_embed_batches_and_checks_input(retriever):
    retriever.embedder.calls.clear()
    vectors = asyncio.run(retriever.embed(["a", "b", "c"]))
    assert len(vectors) == 3 and retriever.embedder.calls == [3]
    with pytest.raises(InvalidRequestError):
        asyncio.run(retriever.embed("not a list"))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"query": ""}, "query"),
        ({"query": "x" * 9000}, "query"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 51}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"mode": "sparse"}, "mode"),
        ({"filter": "chunk_index > 0) or (true"}, "filter"),
        ({"collection": "bad name"}, "collection"),
    ],
)
def test_bad_requests(retriever, kwargs, param):
    args = {"query": "tea", "collection": "kb", "tenant": "acme"} | kwargs
    with pytest.raises(InvalidRequestError) as exc:
        asyncio.run(retriever.retrieve(**args))
    assert exc.value.param == param


def test_tenant_scope_is_always_in_the_filter(retriever):
    asyncio.run(retriever.retrieve("tea", "kb", "acme", filter='metadata["lang"] == "en"'))
    assert retriever.store.last_filter == '(metadata["lang"] == "en") and (tenant == "acme")'


def test_other_tenant_gets_not_found(retriever):
    with pytest.raises(NotFoundError):
        asyncio.run(retriever.retrieve("tea", "kb", "intruder"))
    with pytest.raises(NotFoundError):
        asyncio.run(retriever.delete_document("kb", "intruder", "tea"))


def test_upsert_with_bad_items_and_delete(retriever):
    summary = asyncio.run(retriever.upsert_documents("kb", "acme", [{"id": "x"}, {"text": "no id"}, DOCS[0]]))
    assert (summary.unchanged, summary.failed) == (1, 2)
    assert summary.errors[0].item == "documents[0]" and summary.errors[0].doc_id == "x"
    asyncio.run(retriever.delete_document("kb", "acme", "tea"))
    chunks = asyncio.run(retriever.retrieve("green tea", "kb", "acme", top_k=5))
    assert "tea" not in {c.document for c in chunks}
    with pytest.raises(NotFoundError, match="document 'tea'"):
        asyncio.run(retriever.delete_document("kb", "acme", "tea"))
    assert asyncio.run(retriever.delete_documents("kb", "acme")) == 2


def test_micro_batcher_works_across_event_loops_and_propagates_errors():
    calls = []

    async def double(items):
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("boom")
        return [i * 2 for i in items]

    batcher = MicroBatcher(double, max_batch_size=3, wait_timeout_s=0.01)

    async def run(items):
        return await asyncio.gather(*(batcher(i) for i in items), return_exceptions=True)

    assert asyncio.run(run(["a", "b"])) == ["aa", "bb"]
    assert asyncio.run(run(["c", "d", "e", "f"])) == ["cc", "dd", "ee", "ff"]  # a new loop is fine
    assert calls == [["a", "b"], ["c", "d", "e"], ["f"]]  # max_batch_size respected
    results = asyncio.run(run(["boom", "g"]))
    assert all(isinstance(r, ValueError) for r in results)


def test_serve_batch_is_used_inside_a_replica(monkeypatch):
    """Inside a replica, make_batcher returns ray.serve.batch; check it batches per instance."""
    from ray import serve

    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    assert batching.in_serve_replica()
    first, second = FakeEmbedder(), FakeEmbedder()
    config = RetrievalConfig(search=SearchConfig(batch_wait_timeout_s=0.05), ingest=IngestConfig(show_progress=False))
    r1 = Retriever(config, embedder=first, store=InMemoryStore())
    r2 = Retriever(config, embedder=second, store=InMemoryStore())
    assert not isinstance(r1._embed_one, MicroBatcher)

    async def both():
        return await asyncio.gather(*(r.embed(["q1", "q2", "q3"]) for r in (r1, r2)))

    asyncio.run(both())
    assert first.calls == [3] and second.calls == [3], "each instance batches its own queries"
