"""Retrieval on the real stack: Milvus Lite in tmp_path, the packaged all-MiniLM-L6-v2.

One module-scoped Retriever (the model loads once); each test uses its own collection.
Run: HF_HUB_OFFLINE=1 .venv/bin/pytest -m integration tests/integration/test_retrieval.py
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest

from cluster.errors import InvalidRequestError, NotFoundError
from cluster.milvus_server import MilvusLiteServer
from cluster.processes import free_port
from retrieval import milvus_lite_patches
from retrieval.config import IngestConfig, MilvusConfig, RetrievalConfig, SearchConfig
from retrieval.retriever import Retriever
from retrieval.sample_kb import SAMPLE_COLLECTION, SAMPLE_KB_DIR, SAMPLE_QUESTIONS, ingest_sample_kb
from retrieval.types import Document

pytestmark = pytest.mark.integration

MAX_CHARS = 20_000
SAMPLE_DOCS = len(list(SAMPLE_KB_DIR.glob("*.md")))


def run(coro):
    return asyncio.run(coro)


def config_for(uri: str) -> RetrievalConfig:
    return RetrievalConfig(
        milvus=MilvusConfig(uri=uri),
        ingest=IngestConfig(max_document_chars=MAX_CHARS, show_progress=False),
        search=SearchConfig(batch_wait_timeout_s=0.02),
    )


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    path = tmp_path_factory.mktemp("milvus") / "milvus.db"
    r = Retriever(config_for(str(path)))
    summary = ingest_sample_kb(r.ingestor)
    assert (summary.added, summary.failed) == (SAMPLE_DOCS, 0)
    yield r
    r.close()


@pytest.mark.parametrize(("question", "doc_id", "phrase"), SAMPLE_QUESTIONS)
@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_sample_question_ranks_its_document_first(retriever, question, doc_id, phrase, mode):
    chunks = run(retriever.retrieve(question, SAMPLE_COLLECTION, "anyone", top_k=3, mode=mode))
    assert chunks[0].document == doc_id, [c.document for c in chunks]
    assert phrase in chunks[0].text and chunks[0].source == doc_id


def test_reingest_is_a_noop(retriever):
    summary = ingest_sample_kb(retriever.ingestor)
    counts = (summary.added, summary.updated, summary.unchanged, summary.deleted, summary.failed)
    assert counts == (0, 0, SAMPLE_DOCS, 0, 0)
    assert summary.chunks == 0


PARTS = [
    {"id": "target", "text": "The lid seal for the older lab fridge is spare part QX-4471-B; order it from facilities."},
    {"id": "d1", "text": "Spare parts QY-4477-D and QK-4417-R: rotor and drive belt for the centrifuge."},
    {"id": "d2", "text": "Product code QZ-4771-E is the replacement rotor for the model 9 centrifuge."},
    {"id": "d3", "text": "Codes QR-1447-F and QV-4741-E are gasket kits for the centrifuge lid."},
    {"id": "d4", "text": "Part OX-4417-P is a pressure valve; part QW-7144-H is its housing."},
    {"id": "d5", "text": "Serial numbers such as SN-4417-XQ are printed on the back of every device."},
    {"id": "d6", "text": "Spare part identifiers follow the pattern XX-0000-X, for example AB-1234-C."},
]


def test_hybrid_beats_dense_on_a_rare_product_code(retriever):
    assert run(retriever.upsert_documents("parts", "acme", PARTS)).added == len(PARTS)
    dense = run(retriever.retrieve("QX-4471-B", "parts", "acme", top_k=3, mode="dense"))
    hybrid = run(retriever.retrieve("QX-4471-B", "parts", "acme", top_k=3, mode="hybrid"))
    # The embedding sees look-alike codes; BM25 matches the exact tokens qx / 4471.
    assert "target" not in [c.document for c in dense]
    assert hybrid[0].document == "target"


POLICY_V1 = " ".join(
    f"Section {i}: the refund window is thirty days and receipts are required for item group {i}." for i in range(30)
)
POLICY_V2 = "The refund window is now forty-five days. Receipts are optional."


def test_update_replaces_and_delete_removes(retriever):
    run(retriever.upsert_documents("live", "acme", [{"id": "policy", "text": POLICY_V1}, {"id": "other", "text": "x y"}]))
    only_policy = 'doc_id == "policy"'
    before = run(retriever.retrieve("refund window", "live", "acme", top_k=50, filter=only_policy))
    assert len(before) > 3

    summary = run(retriever.upsert_documents("live", "acme", [{"id": "policy", "text": POLICY_V2}]))
    assert (summary.updated, summary.chunks) == (1, 1)
    after = run(retriever.retrieve("refund window", "live", "acme", top_k=50, filter=only_policy))
    assert [(c.text, c.chunk_index) for c in after] == [(POLICY_V2, 0)], "no stale chunk may survive an update"
    assert after[0].id.startswith("policy#") and after[0].id not in {c.id for c in before}, "a new generation's id"

    run(retriever.delete_document("live", "acme", "policy"))
    assert run(retriever.retrieve("refund window", "live", "acme", top_k=50, filter=only_policy)) == []
    assert [c.document for c in run(retriever.retrieve("refund", "live", "acme", top_k=50))] == ["other"]
    with pytest.raises(NotFoundError):
        run(retriever.delete_document("live", "acme", "policy"))


def test_tenant_isolation(retriever):
    run(retriever.upsert_documents("secrets", "acme", [{"id": "s", "text": "The acme launch code is 1234."}]))
    with pytest.raises(NotFoundError):
        run(retriever.retrieve("launch code", "secrets", "globex"))
    with pytest.raises(NotFoundError):
        run(retriever.delete_document("secrets", "globex", "s"))
    # globex gets its own namespace: same name, its own documents only.
    run(retriever.upsert_documents("secrets", "globex", [{"id": "g", "text": "Globex keeps its recipes here."}]))
    assert {c.document for c in run(retriever.retrieve("launch code", "secrets", "globex", top_k=10))} == {"g"}
    assert {c.document for c in run(retriever.retrieve("launch code", "secrets", "acme", top_k=10))} == {"s"}
    # A client filter narrows but never widens the tenant scope; the tenant is not a field
    # clients may filter on at all (it would let a caller probe who owns a public collection).
    with pytest.raises(InvalidRequestError, match="tenant"):
        run(retriever.retrieve("code", "secrets", "globex", filter='tenant == "acme"'))
    assert run(retriever.retrieve("code", "secrets", "globex", filter='source != "nowhere"'))
    with pytest.raises(InvalidRequestError):
        run(retriever.retrieve("code", "secrets", "globex", filter='tenant == "acme") or (tenant != ""'))
    # Public collections: readable by all, writable by the owner only.
    assert run(retriever.retrieve("codename", SAMPLE_COLLECTION, "globex"))
    with pytest.raises(InvalidRequestError, match="read-only"):
        run(retriever.upsert_documents(SAMPLE_COLLECTION, "globex", [{"id": "x", "text": "spam"}]))
    with pytest.raises(InvalidRequestError, match="read-only"):
        run(retriever.delete_documents(SAMPLE_COLLECTION, "globex"))
    with pytest.raises(NotFoundError):
        run(retriever.retrieve("x", "no-such-collection", "acme"))


def test_concurrent_retrieves_share_embedding_calls(retriever, monkeypatch):
    calls = []
    encode = retriever.embedder.encode_queries  # queries are embedded with the query prompt

    def counting(texts):
        calls.append(len(texts))
        return encode(texts)

    monkeypatch.setattr(retriever.embedder, "encode_queries", counting)

    async def eight():
        questions = [q for q, _, _ in SAMPLE_QUESTIONS] * 2
        return await asyncio.gather(*(retriever.retrieve(q, SAMPLE_COLLECTION, "anyone") for q in questions))

    results = run(eight())
    assert all(results) and sum(calls) == 8
    assert len(calls) <= 2, f"8 concurrent retrieves took {len(calls)} encode calls: {calls}"


def test_bad_input_is_reported_per_item(retriever, tmp_path):
    items = [
        {"id": "good", "text": "A perfectly fine document."},
        {"id": "empty", "text": "  "},
        {"id": "huge", "text": "x " * MAX_CHARS},
        {"id": "dup", "text": "one"},
        {"id": "dup", "text": "two"},
        {"text": "no id"},
    ]
    summary = run(retriever.upsert_documents("inputs", "acme", items))
    assert (summary.added, summary.failed) == (1, 5)
    assert {e.item for e in summary.errors} == {f"documents[{i}]" for i in range(1, 6)}

    (tmp_path / "ok.md").write_text("# OK\nfine", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.7")
    summary = retriever.ingestor.ingest_paths("files", "acme", [tmp_path], progress=False)
    assert (summary.added, summary.failed) == (1, 2)
    reasons = {Path(e.item).name: e.reason for e in summary.errors}
    assert "not valid UTF-8" in reasons["latin1.txt"] and "corrupt PDF" in reasons["scan.pdf"]

    with pytest.raises(InvalidRequestError, match="unknown field 'no_such_field'"):
        run(retriever.retrieve("fine", "inputs", "acme", filter="no_such_field == 1"))


def test_reopened_store_serves_the_same_data(retriever, tmp_path):
    config = config_for(str(tmp_path / "reopen.db"))
    first = Retriever(config, embedder=retriever.embedder)
    first.ingestor.ingest("kb", "acme", [Document("a", "Marlo the pangolin wears a hard hat.")], progress=False)
    first.close()  # stops the in-process Lite server: the next open starts from disk
    second = Retriever(config, embedder=retriever.embedder)
    try:
        assert [c.document for c in run(second.retrieve("pangolin", "kb", "acme"))] == ["a"]
    finally:
        second.close()


def test_milvus_lite_server_mode(retriever, tmp_path):
    # The same server `ragtune up` runs for shared stores (cluster/milvus_server.py).
    with MilvusLiteServer(tmp_path / "srv", port=free_port()) as server:
        # ... with ragtune's vectorised BM25 scorer in the server process (retrieval/milvus_lite_patches.py).
        assert "retrieval.milvus_lite_patches" in psutil.Process(server.proc.pid).cmdline()
        remote = Retriever(config_for(server.uri), embedder=retriever.embedder)
        try:
            summary = run(remote.upsert_documents("parts", "acme", PARTS))
            assert summary.added == len(PARTS)
            assert remote.store.row_count(remote.store.resolve("parts", "acme")) == summary.chunks  # sizes writes
            assert run(remote.retrieve("QX-4471-B", "parts", "acme", mode="hybrid"))[0].document == "target"
            # ... and its background compaction/index builds (started by the ingest's flush) at low priority,
            # while the process itself (its gRPC threads: searches and writes) keeps this test's niceness.
            if os.getpriority(os.PRIO_PROCESS, 0) < milvus_lite_patches.BACKGROUND_NICE:  # else nothing to lower
                process = psutil.Process(server.proc.pid)
                deadline = time.monotonic() + 60
                while not any(os.getpriority(os.PRIO_PROCESS, t.id) == milvus_lite_patches.BACKGROUND_NICE
                              for t in process.threads()) and time.monotonic() < deadline:
                    time.sleep(0.2)
                niceness = [os.getpriority(os.PRIO_PROCESS, t.id) for t in process.threads()]
                assert milvus_lite_patches.BACKGROUND_NICE in niceness
                assert os.getpriority(os.PRIO_PROCESS, process.pid) == os.getpriority(os.PRIO_PROCESS, 0)
        finally:
            remote.close()
