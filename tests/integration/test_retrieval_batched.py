"""Batched retrieval on the real stack (Milvus Lite, packaged all-MiniLM-L6-v2): concurrent queries
share one embedder call and one multi-vector Milvus search per (collection, scope, filter, top_k,
mode) group, and every query gets exactly the chunks it gets when it runs alone.

Run: HF_HUB_OFFLINE=1 .venv/bin/pytest -m integration tests/integration/test_retrieval_batched.py
"""

from __future__ import annotations

import asyncio

import pytest

from retrieval.config import EmbedderConfig, IngestConfig, MilvusConfig, RetrievalConfig, SearchConfig
from retrieval.retriever import Retriever
from retrieval.sample_kb import SAMPLE_COLLECTION, SAMPLE_QUESTIONS, ingest_sample_kb

pytestmark = pytest.mark.integration

PRIVATE = [
    {"id": "refunds", "text": "Refunds are paid within 14 days to the original card.", "metadata": {"lang": "en"}},
    {"id": "erstattung", "text": "Erstattungen dauern vierzehn Tage.", "metadata": {"lang": "de"}},
    {"id": "shipping", "text": "Parcels ship from Rotterdam every weekday.", "metadata": {"lang": "en"}},
]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    # fp32 queries: the scores are compared batched vs alone to 4 decimals, and a bf16 query's scores move
    # by up to ~1e-3 with the batch it shares (embedder.query_precision; retrieval/embedder.py).
    config = RetrievalConfig(milvus=MilvusConfig(uri=str(tmp_path_factory.mktemp("milvus") / "milvus.db")),
                             ingest=IngestConfig(show_progress=False), search=SearchConfig(batch_wait_timeout_s=0.05),
                             embedder=EmbedderConfig(query_precision="fp32"))
    r = Retriever(config)
    ingest_sample_kb(r.ingestor)
    asyncio.run(r.upsert_documents("shop", "acme", PRIVATE))
    yield r
    r.close()


def _key(chunks):
    return [(c.id, round(c.score, 4)) for c in chunks]


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_concurrent_queries_get_their_own_chunks_from_shared_searches(retriever, monkeypatch, mode):
    calls = [{"query": q, "collection": SAMPLE_COLLECTION, "tenant": "anyone", "top_k": 3, "mode": mode}
             for q, _, _ in SAMPLE_QUESTIONS]
    calls += [{"query": "how long do refunds take", "collection": "shop", "tenant": "acme", "mode": mode},
              {"query": "when do parcels ship", "collection": "shop", "tenant": "acme", "mode": mode},
              {"query": "refunds", "collection": "shop", "tenant": "acme", "mode": mode,
               "filter": 'metadata["lang"] == "de"'}]
    alone = [asyncio.run(retriever.retrieve(**c)) for c in calls]
    # The same embedder and store behind a batch window that closes when every call has joined (or
    # after 10 s), so how the calls group does not depend on how fast a loaded host lets them arrive.
    config = retriever.config.model_copy(update={"search": retriever.config.search.model_copy(
        update={"batch_max_size": len(calls), "batch_wait_timeout_s": 10.0})})
    together_retriever = Retriever(config, embedder=retriever.embedder, store=retriever.store)
    shared, search_many = [], retriever.store.search_many

    def counting(info, **kwargs):
        shared.append((info.name, kwargs["filter"], len(kwargs["queries"])))
        return search_many(info, **kwargs)

    monkeypatch.setattr(retriever.store, "search_many", counting)

    async def together():
        return await asyncio.gather(*(together_retriever.retrieve(**c) for c in calls))

    batched = asyncio.run(together())
    assert [_key(b) for b in batched] == [_key(a) for a in alone]
    assert batched[0][0].document == SAMPLE_QUESTIONS[0][1]
    assert [c.document for c in batched[-1]] == ["erstattung"]  # its own filter, not its neighbours'
    # MilvusStore.search is search_many with one query: the lone filtered query shows as nq=1.
    expected = [(SAMPLE_COLLECTION, None, len(SAMPLE_QUESTIONS)), ("shop", None, 2),
                ("shop", 'metadata["lang"] == "de"', 1)]
    assert sorted(shared, key=str) == sorted(expected, key=str)


def test_search_many_checks_its_arguments(retriever):
    info = retriever.store.resolve("shop", "acme")
    with pytest.raises(ValueError, match="2 vectors for 1 queries"):
        retriever.store.search_many(info, vectors=[[0.0] * 384] * 2, queries=["x"], top_k=1, filter=None, mode="dense")
    assert retriever.store.search_many(info, vectors=[], queries=[], top_k=1, filter=None, mode="dense") == []
