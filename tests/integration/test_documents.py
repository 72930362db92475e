"""Real documents on the real stack: a mixed folder (PDF, HTML, DOCX, Markdown) into Milvus Lite.

Generated files (tests/documents.py), the packaged all-MiniLM-L6-v2, one module-scoped Retriever.
Run: HF_HUB_OFFLINE=1 .venv/bin/pytest -m integration tests/integration/test_documents.py
"""

from __future__ import annotations

import asyncio

import pytest

from retrieval.config import ChunkingConfig, IngestConfig, MilvusConfig, RetrievalConfig, SearchConfig
from retrieval.quality import retrieval_metrics
from retrieval.retriever import Retriever
from tests import documents

pytestmark = pytest.mark.integration

QUESTIONS = [
    (documents.PDF_QUESTION, "manual.pdf", documents.PDF_FACT, 2, ["Handbook", "Refunds"]),
    (documents.HTML_QUESTION, "choir.html", documents.HTML_FACT, None, ["Choir", "Rehearsals"]),
    (documents.DOCX_QUESTION, "report.docx", documents.DOCX_FACT, None, ["Annual report", "Regions"]),
    ("Where is the spare office key kept?", "notes/keys.md", "blue box at reception", None, ["Office", "Keys"]),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    documents.write_pdf(root / "manual.pdf")
    documents.write_html(root / "choir.html")
    documents.write_docx(root / "report.docx")
    (root / "notes").mkdir()
    documents.write_markdown(root / "notes" / "keys.md")
    documents.write_blank_pdf(root / "scan.pdf")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n")
    return root


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, folder):
    config = RetrievalConfig(
        milvus=MilvusConfig(uri=str(tmp_path_factory.mktemp("milvus") / "docs.db")),
        chunking=ChunkingConfig(size=400, overlap=60),
        ingest=IngestConfig(show_progress=False),
        search=SearchConfig(batch_wait_timeout_s=0.01),
    )
    retriever = Retriever(config)
    summary = retriever.ingestor.ingest_paths("handbook", "acme", [folder])
    yield retriever, summary
    retriever.close()


def test_every_file_is_accounted_for(ingested):
    _, summary = ingested
    assert (summary.added, summary.failed, summary.skipped) == (4, 1, 1), summary.to_dict()
    [scan] = summary.errors
    assert scan.doc_id == "scan.pdf" and "no text layer" in scan.reason
    [photo] = summary.skipped_files
    assert photo.doc_id == "photo.png" and "unsupported file type '.png'" in photo.reason


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_fact_ranks_first_with_page_and_heading_path(ingested, mode):
    retriever, _ = ingested
    run, qrels = {}, {}
    for question, doc_id, fact, page, headings in QUESTIONS:
        chunks = asyncio.run(retriever.retrieve(question, "handbook", "acme", top_k=3, mode=mode))
        top = chunks[0]
        assert top.document == doc_id, [(c.document, c.text[:60]) for c in chunks]
        assert fact in top.text and top.metadata["headings"] == headings
        assert top.metadata.get("page") == page
        assert top.metadata["format"] == doc_id.rsplit(".", 1)[1]
        assert top.metadata["char_end"] > top.metadata["char_start"]
        run[question], qrels[question] = [c.document for c in chunks], {doc_id}
    metrics = retrieval_metrics(run, qrels, k=3)
    assert metrics["hit@3"] == 1.0 and metrics["mrr@3"] == 1.0


def test_docx_table_survives_whole(ingested):
    retriever, _ = ingested
    chunks = asyncio.run(retriever.retrieve("growth by region table North South West", "handbook", "acme", top_k=5,
                                            mode="hybrid"))
    tables = [c for c in chunks if "| North | 17% |" in c.text]
    assert tables and all(row in tables[0].text for row in ("| Region | Growth |", "| South | 4% |", "| West | 9% |"))


def test_reingest_is_a_noop_with_stable_ids(ingested, folder):
    retriever, _ = ingested
    before = asyncio.run(retriever.retrieve(documents.PDF_QUESTION, "handbook", "acme", top_k=5))
    again = retriever.ingestor.ingest_paths("handbook", "acme", [folder])
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 4, 0)
    after = asyncio.run(retriever.retrieve(documents.PDF_QUESTION, "handbook", "acme", top_k=5))
    assert [c.id for c in after] == [c.id for c in before]


def test_query_and_document_prompts_from_the_model_config(tmp_path):
    from sentence_transformers import SentenceTransformer

    from retrieval.config import EmbedderConfig
    from retrieval.embedder import Embedder, resolve_model

    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: "}
    model.save(str(tmp_path / "prompted"))
    # fp32 queries: compared with the raw fp32 encode to 1e-5 (bf16 is tested in test_retrieval_embedder_precision).
    embedder = Embedder(EmbedderConfig(model=str(tmp_path / "prompted"), device="cpu", query_precision="fp32"))
    assert (embedder.prompts.query, embedder.prompts.document) == ("query: ", "passage: ")
    raw = model.encode(["query: refund days", "passage: refund days"], normalize_embeddings=True)
    assert embedder.encode_queries(["refund days"])[0] == pytest.approx(raw[0].tolist(), abs=1e-5)
    assert embedder.encode(["refund days"])[0] == pytest.approx(raw[1].tolist(), abs=1e-5)
