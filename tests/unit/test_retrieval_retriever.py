"""Retriever with fakes: request checks, batching of concurrent queries, document updates."""

from __future__ import annotations

import asyncio

import pytest

from cluster.errors import InvalidRequestError, NotFoundError
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

    assert asyncio.run(run(["a", "b", "c", "d"])) == ["aa", "bb", "cc", "dd"]
    assert asyncio.run(run(["e", "f"])) == ["ee", "ff"]  # a new loop is fine
    assert calls == [["a", "b", "c"], ["d"], ["e", "f"]]  # max_batch_size respected
    results = asyncio.run(run(["boom", "g"]))
    assert all(isinstance(r, ValueError) for r in results)


def test_micro_batcher_lingers_only_after_a_shared_batch():
    """Calls arriving during a batch go together next; an idle batcher waits for company only when
    the previous batch was shared. The 60 s window makes each wait either obvious or absent."""
    calls, gate = [], None

    async def echo(items):
        calls.append(list(items))
        if gate is not None:
            await gate.wait()
        return items

    batcher = MicroBatcher(echo, max_batch_size=2, wait_timeout_s=60)

    async def scenario():
        nonlocal gate
        gate = asyncio.Event()
        first = asyncio.gather(batcher("a"), batcher("b"))  # full: starts without waiting
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher("c"))  # arrives while [a, b] runs
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.wait_for(first, 5) == ["a", "b"]
        assert await asyncio.wait_for(late, 5) == "c"  # ran alone as soon as [a, b] finished
        gate = None
        assert await asyncio.wait_for(batcher("d"), 5) == "d"  # after a lone batch: no 60 s wait
        await asyncio.wait_for(asyncio.gather(batcher("e"), batcher("f")), 5)
        lone = asyncio.ensure_future(batcher("g"))  # after a shared batch: waits for company
        await asyncio.sleep(0.2)
        assert not lone.done()
        assert await asyncio.wait_for(asyncio.gather(lone, batcher("h")), 5) == ["g", "h"]  # h: as many as before

    asyncio.run(scenario())
    assert calls == [["a", "b"], ["c"], ["d"], ["e", "f"], ["g", "h"]]


def test_each_retriever_batches_its_own_queries():
    first, second = FakeEmbedder(), FakeEmbedder()
    config = RetrievalConfig(search=SearchConfig(batch_wait_timeout_s=5), ingest=IngestConfig(show_progress=False))
    config = config.model_copy(update={"search": config.search.model_copy(update={"batch_max_size": 3})})
    r1 = Retriever(config, embedder=first, store=InMemoryStore())
    r2 = Retriever(config, embedder=second, store=InMemoryStore())

    async def both():
        return await asyncio.gather(*(r.embed(["q1", "q2", "q3"]) for r in (r1, r2)))

    asyncio.run(both())
    assert first.calls == [3] and second.calls == [3], "each instance batches its own queries"


class BatchingStore(InMemoryStore):
    """InMemoryStore with ``search_many``; records each shared search and every filter it saw.

    A query containing "poison" makes any search it takes part in fail (as a query that breaks a
    Milvus request would), so the retriever must retry the others one by one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shared: list[tuple[str, str | None, int, str, list[str]]] = []
        self.filters: list[str | None] = []

    def search(self, info, *, vector, query, top_k, filter, mode):
        if "poison" in query:
            raise InvalidRequestError("invalid filter: poisoned query", param="filter")
        chunks = super().search(info, vector=vector, query=query, top_k=top_k, filter=filter, mode=mode)
        self.filters.append(self.last_filter)
        return chunks

    def search_many(self, info, *, vectors, queries, top_k, filter, mode):
        self.shared.append((info.physical, filter, top_k, mode, list(queries)))
        if any("poison" in q for q in queries):
            raise InvalidRequestError("invalid filter: poisoned batch", param="filter")
        return [self.search(info, vector=v, query=q, top_k=top_k, filter=filter, mode=mode)
                for v, q in zip(vectors, queries, strict=True)]


@pytest.fixture
def grouped():
    config = RetrievalConfig(search=SearchConfig(batch_wait_timeout_s=0.05), ingest=IngestConfig(show_progress=False))
    r = Retriever(config, embedder=FakeEmbedder(), store=BatchingStore())
    for tenant in ("acme", "globex"):
        asyncio.run(r.upsert_documents("kb", tenant, [{**d, "id": f"{tenant}-{d['id']}"} for d in DOCS]))
    return r


def _gather(retriever, calls):
    """The calls concurrently, through a retriever over the same embedder and store whose batch window
    closes when every call has joined (or after 10 s): the grouping asserted does not depend on how
    fast a loaded host lets the calls arrive."""
    search = retriever.config.search.model_copy(update={"batch_max_size": len(calls), "batch_wait_timeout_s": 10.0})
    together = Retriever(retriever.config.model_copy(update={"search": search}),
                         embedder=retriever.embedder, store=retriever.store)

    async def go():
        return await asyncio.gather(*(together.retrieve(**c) for c in calls), return_exceptions=True)

    return asyncio.run(go())


def test_concurrent_queries_share_one_store_search_and_each_gets_its_own_answer(grouped):
    questions = ["green tea brewing", "pump valve spring", "error ZX-81 sensor", "tea temperature"]
    alone = [asyncio.run(grouped.retrieve(q, "kb", "acme", top_k=2)) for q in questions]
    grouped.store.shared.clear()
    grouped.embedder.calls.clear()
    together = _gather(grouped, [{"query": q, "collection": "kb", "tenant": "acme", "top_k": 2} for q in questions])
    assert together == alone  # same chunks, same order, each to its own caller
    assert grouped.embedder.calls == [4]
    assert [(s[2], s[3], s[4]) for s in grouped.store.shared] == [(2, "dense", questions)]


def test_a_batch_splits_by_collection_scope_filter_top_k_and_mode(grouped):
    lang = 'metadata["lang"] == "en"'
    calls = [
        {"query": "tea", "collection": "kb", "tenant": "acme"},
        {"query": "valve", "collection": "kb", "tenant": "acme"},
        {"query": "tea", "collection": "kb", "tenant": "globex"},  # another tenant's collection
        {"query": "tea", "collection": "kb", "tenant": "acme", "filter": lang},
        {"query": "tea", "collection": "kb", "tenant": "acme", "top_k": 3},
        {"query": "tea", "collection": "kb", "tenant": "acme", "mode": "hybrid"},
        {"query": "pump", "collection": "kb", "tenant": "globex"},
    ]
    grouped.store.shared.clear()
    grouped.store.filters.clear()
    results = _gather(grouped, calls)
    assert all(isinstance(r, list) and r for r in results), results
    # One shared search per distinct (collection, filter, top_k, mode); singletons search alone.
    shared = sorted((s[0], s[4]) for s in grouped.store.shared)
    assert shared == [("mem_acme_kb", ["tea", "valve"]), ("mem_globex_kb", ["tea", "pump"])]
    assert {c.document for c in results[2] + results[6]} <= {f"globex-{d['id']}" for d in DOCS}
    assert all(c.document.startswith("acme-") for i in (0, 1, 3, 4, 5) for c in results[i])
    # Every search carried its own tenant scope and client filter.
    assert sorted(set(grouped.store.filters)) == sorted({
        'tenant == "acme"', 'tenant == "globex"', f'({lang}) and (tenant == "acme")'})
    assert len(results[4]) == 3


def test_a_query_that_breaks_the_shared_search_fails_alone(grouped):
    calls = [{"query": q, "collection": "kb", "tenant": "acme"} for q in ("tea", "poison pill", "valve")]
    results = _gather(grouped, calls)
    assert isinstance(results[1], InvalidRequestError) and "poisoned query" in str(results[1])
    assert results[0][0].document == "acme-tea" and results[2][0].document == "acme-pumps"
    assert len(grouped.store.shared) == 1  # the shared try, then one search per query


def test_an_embedder_failure_fails_the_batch(grouped, monkeypatch):
    def broken(texts):
        raise RuntimeError("model gone")

    monkeypatch.setattr(grouped.embedder, "encode", broken)
    results = _gather(grouped, [{"query": q, "collection": "kb", "tenant": "acme"} for q in ("tea", "valve")])
    assert all(isinstance(r, RuntimeError) for r in results)
    with pytest.raises(NotFoundError):  # scope is checked before the batch, as before
        asyncio.run(grouped.retrieve("tea", "kb", "intruder"))
