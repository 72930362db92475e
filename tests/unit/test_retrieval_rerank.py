"""Reranking: order by cross-encoder score, candidates fetched, a real tiny CrossEncoder built locally."""

from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import ValidationError

from retrieval.config import IngestConfig, RerankConfig, RetrievalConfig, SearchConfig
from retrieval.rerank import Reranker
from retrieval.retriever import Retriever
from retrieval.testing import FakeEmbedder, InMemoryStore
from retrieval.types import Chunk


class WordOverlapCrossEncoder:
    """Scores a pair by how many query words the text holds; records its calls."""

    def __init__(self):
        self.calls: list[int] = []

    def predict(self, pairs, batch_size=32, show_progress_bar=False):
        self.calls.append(len(pairs))
        return [len(set(re.findall(r"\w+", q.lower())) & set(re.findall(r"\w+", t.lower()))) for q, t in pairs]


def chunk(i: int, text: str, score: float) -> Chunk:
    return Chunk(id=f"d{i}#0", document=f"d{i}", source=f"d{i}", score=score, text=text, chunk_index=0)


def test_rerank_orders_by_cross_encoder_and_keeps_first_stage_score():
    reranker = Reranker(RerankConfig(model="fake", candidates=10), model=WordOverlapCrossEncoder())
    chunks = [chunk(0, "tea at eighty degrees", 0.9), chunk(1, "the valve of the pump needs oil", 0.8),
              chunk(2, "pump valve", 0.7)]
    ranked = reranker.rerank("which pump valve needs oil", chunks, top_k=2)
    assert [c.document for c in ranked] == ["d1", "d2"]
    assert ranked[0].score == 4 and ranked[0].metadata["retrieval_score"] == 0.8
    assert reranker.last_seconds >= 0 and reranker.rerank("q", [], 3) == []
    assert reranker.candidates(5) == 10 and reranker.candidates(50) == 50


def test_retriever_fetches_candidates_and_reranks_before_returning_top_k():
    config = RetrievalConfig(search=SearchConfig(batch_wait_timeout_s=0.01), ingest=IngestConfig(show_progress=False))
    store = InMemoryStore()
    r = Retriever(config, embedder=FakeEmbedder(), store=store)
    docs = [{"id": f"n{i}", "text": f"noise document number {i} about pumps"} for i in range(8)]
    docs.append({"id": "target", "text": "Replace the pump valve gasket every spring with part 7."})
    asyncio.run(r.upsert_documents("kb", "acme", docs))
    seen = []
    search = store.search
    store.search = lambda *a, **kw: seen.append(kw["top_k"]) or search(*a, **kw)
    encoder = WordOverlapCrossEncoder()
    r.reranker = Reranker(RerankConfig(model="fake", candidates=9), model=encoder)
    chunks = asyncio.run(r.retrieve("when to replace the pump valve gasket", "kb", "acme", top_k=2))
    assert seen == [9] and encoder.calls == [9]
    assert len(chunks) == 2 and chunks[0].document == "target"


def test_reranker_needs_a_model_and_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rerank.model"):
        Reranker(RerankConfig())
    with pytest.raises(ValidationError, match="candidates"):
        RerankConfig(candidates=0)
    with pytest.raises(ValidationError, match="extra"):
        RetrievalConfig(rerank={"modle": "x"})
    assert RetrievalConfig().rerank.model is None  # off by default


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A 2-layer BERT with one output, the packaged MiniLM's tokenizer: a real CrossEncoder folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from retrieval.embedder import resolve_model

    path = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_real_cross_encoder_by_path(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    reranker = Reranker(RerankConfig(model=str(tiny_cross_encoder), device="cpu", max_length=64))
    texts = ["the pump valve", "green tea", "error codes of the sensor", "spring maintenance"]
    chunks = [chunk(i, t, 0.5) for i, t in enumerate(texts)]
    ranked = reranker.rerank("pump valve", chunks, top_k=3)
    expected = CrossEncoder(str(tiny_cross_encoder), device="cpu").predict([("pump valve", t) for t in texts])
    order = sorted(range(4), key=lambda i: -float(expected[i]))[:3]
    assert [c.document for c in ranked] == [f"d{i}" for i in order]
    assert [c.score for c in ranked] == pytest.approx([float(expected[i]) for i in order], rel=1e-4)
