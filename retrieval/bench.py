"""Retrieval benchmarks; each function returns result rows (dicts) for ``ragtune bench``.

* ``bench_ingest``: ingest rate (chunks/s, end to end: chunk, hash, embed, upsert, flush) vs the
  raw embedder's encode rate on the same chunk texts. Goal: ratio >= 0.9.
* ``bench_ingest_scale``: the same ratio at scale (``--scale 100000``: 100k chunks through the
  real write path, batched embedding and bulk upserts); the raw rate is measured on a sample of
  the same chunk texts before and after the ingest.
* ``bench_quality``: hit@k, MRR@k, nDCG@k (``retrieval.quality``) on a labelled set (a folder of
  documents + JSON Lines of ``{"id", "question", "documents": [ids]}``) for chunk sizes, heading
  context on/off and dense/hybrid: ``--quality DOCS QA.jsonl``.
* ``bench_retrieve``: retrieve latency p50/p99 and throughput with 16 concurrent clients through
  ``Retriever.retrieve`` in-process, dense and hybrid, on a synthetic collection (10k chunks;
  ``quick`` uses 500).

The corpus is synthetic but deterministic: sentences drawn from the sample knowledge base's
vocabulary. Run: ``HF_HUB_OFFLINE=1 python -m retrieval.bench --quick`` (``--full`` once: it
embeds 10k chunks, several minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig, IngestConfig, MilvusConfig, RetrievalConfig
from retrieval.retriever import Retriever
from retrieval.sample_kb import SAMPLE_KB_DIR
from retrieval.types import Document, EmbedderLike

__all__ = ["bench_ingest", "bench_ingest_scale", "bench_quality", "bench_retrieve", "main", "run", "synthetic_documents"]

Row = dict[str, Any]


def _vocabulary() -> list[str]:
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE_KB_DIR.glob("*.md")))
    return sorted(set(re.findall(r"[A-Za-z][A-Za-z-]{2,}", text)))


def synthetic_documents(count: int, chars: int, seed: int = 0) -> list[Document]:
    """``count`` deterministic documents of about ``chars`` characters each."""
    rng, words = random.Random(seed), _vocabulary()
    docs = []
    for i in range(count):
        sentences, size = [], 0
        while size < chars:
            sentence = " ".join(rng.choices(words, k=rng.randint(8, 16))).capitalize() + "."
            sentences.append(sentence)
            size += len(sentence) + 1
        docs.append(Document(f"doc-{i:05d}", " ".join(sentences)[:chars], f"synthetic/{i}"))
    return docs


def _row(bench: str, metric: str, value: float, unit: str, **extra: Any) -> Row:
    return {"bench": bench, "metric": metric, "value": round(value, 3), "unit": unit, **extra}


def _config(workdir: Path, chunk_chars: int) -> RetrievalConfig:
    return RetrievalConfig(
        milvus=MilvusConfig(uri=str(workdir / "bench.db")),
        chunking=ChunkingConfig(size=chunk_chars, overlap=chunk_chars // 8),
        ingest=IngestConfig(show_progress=False),
    )


def bench_ingest(workdir: Path, *, docs: int = 60, doc_chars: int = 2400, chunk_chars: int = 800,
                 embedder: EmbedderLike | None = None) -> list[Row]:
    """Ingest rate vs raw encode rate on the same chunk texts.

    Args:
        workdir: Folder for a fresh Milvus Lite file.
        docs: Number of synthetic documents.
        doc_chars: Characters per document.
        chunk_chars: Chunk window (overlap = 1/8 of it).
        embedder: Reuse a loaded embedder (else the configured one is loaded).
    """
    config = _config(workdir, chunk_chars)
    retriever = Retriever(config, embedder=embedder)
    try:
        documents = synthetic_documents(docs, doc_chars, seed=1)
        texts = [c for d in documents for c in Chunker(config.chunking).split(d.text)]
        # Warm-up with full batches: the first passes at each shape pay one-off kernel/allocator costs.
        retriever.embedder.encode(texts[:128])
        # Create the registry and the collection outside the timing: the goal is the steady rate.
        retriever.ingestor.ingest("bench-ingest", "bench", [Document("warm-up", "warm up")], progress=False)
        # Raw encode before and after the ingest, averaged, so machine-load drift hits both sides.
        raw_seconds = _timed(retriever.embedder.encode, texts)
        summary = retriever.ingestor.ingest("bench-ingest", "bench", documents, progress=False)
        raw_seconds = (raw_seconds + _timed(retriever.embedder.encode, texts)) / 2
    finally:
        retriever.close()
    raw_rate, ingest_rate = len(texts) / raw_seconds, summary.chunks / summary.seconds
    return [
        _row("ingest", "raw_encode_rate", raw_rate, "chunks/s", chunks=len(texts)),
        _row("ingest", "ingest_rate", ingest_rate, "chunks/s", chunks=summary.chunks, docs=summary.added),
        _row("ingest", "ingest_vs_raw", ingest_rate / raw_rate, "ratio", goal=">= 0.9"),
    ]


def bench_ingest_scale(workdir: Path, *, chunks: int = 100_000, chunk_chars: int = 300, sample: int = 4096,
                       embedder: EmbedderLike | None = None, progress: bool = True) -> list[Row]:
    """Ingest ``chunks`` chunks (synthetic documents of ~4 chunks each) and compare with raw encode.

    Args:
        workdir: Folder for a fresh Milvus Lite file.
        chunks: Chunks to ingest (documents are generated until the chunker yields this many).
        chunk_chars: Chunk size in characters (300 = ~70 MiniLM tokens; overlap 1/8 of it).
        sample: Chunk texts encoded raw, before and after the ingest, for the reference rate.
        embedder: Reuse a loaded embedder (else the configured one is loaded).
        progress: Show the ingest's tqdm bar.
    """
    config = _config(workdir, chunk_chars)
    retriever = Retriever(config, embedder=embedder)
    chunker = retriever.ingestor.chunker
    documents, texts, seed = [], [], 10
    while len(texts) < chunks:
        batch = synthetic_documents(1000, chunk_chars * 7 // 2, seed=seed)
        for doc in batch:
            doc = Document(f"{doc.id}-{seed}", doc.text, doc.source)
            documents.append(doc)
            texts.extend(chunker.split(doc.text))
            if len(texts) >= chunks:
                break
        seed += 1
    try:
        retriever.embedder.encode(texts[:128])
        retriever.ingestor.ingest("bench-scale", "bench", [Document("warm-up", "warm up")], progress=False)
        probe = texts[:: max(1, len(texts) // sample)][:sample]
        raw_seconds = _timed(retriever.embedder.encode, probe)
        summary = retriever.ingestor.ingest("bench-scale", "bench", documents, progress=progress)
        raw_seconds = (raw_seconds + _timed(retriever.embedder.encode, probe)) / 2
    finally:
        retriever.close()
    raw_rate, ingest_rate = len(probe) / raw_seconds, summary.chunks / summary.seconds
    return [
        _row("ingest_scale", "raw_encode_rate", raw_rate, "chunks/s", chunks=len(probe)),
        _row("ingest_scale", "ingest_rate", ingest_rate, "chunks/s", chunks=summary.chunks, docs=summary.added,
             seconds=round(summary.seconds, 1)),
        _row("ingest_scale", "ingest_vs_raw", ingest_rate / raw_rate, "ratio", goal=">= 0.9"),
    ]


def bench_quality(workdir: Path, docs: Path, qa: Path, *, k: int = 5, sizes: tuple[int, ...] = (400, 800),
                  embedder: EmbedderLike | None = None) -> list[Row]:
    """Retrieval quality per chunking/mode choice on a labelled set (document-level relevance).

    Args:
        workdir: Folder for fresh Milvus Lite files.
        docs: Folder of documents (ids = paths relative to it).
        qa: JSON Lines with ``id``, ``question`` and ``documents`` (the relevant document ids).
        k: Cut-off rank.
        sizes: Chunk sizes (characters) to compare.
        embedder: Reuse a loaded embedder (else the configured one is loaded).
    """
    from retrieval.quality import retrieval_metrics

    items = [json.loads(line) for line in qa.read_text(encoding="utf-8").splitlines() if line.strip()]
    qrels = {str(item["id"]): set(item["documents"]) for item in items}
    rows = []
    for size in sizes:
        for context in (True, False):
            chunking = ChunkingConfig(size=size, overlap=size // 8, heading_context=context)
            config = _config(workdir / f"q{size}{context}", size).model_copy(update={"chunking": chunking})
            retriever = Retriever(config, embedder=embedder)
            embedder = retriever.embedder
            try:
                summary = retriever.ingestor.ingest_paths("quality", "bench", [docs], progress=False)
                for mode in ("dense", "hybrid"):
                    run = asyncio.run(_ranked_documents(retriever, items, k, mode))
                    metrics = retrieval_metrics(run, qrels, k=k)
                    rows += [_row("quality", name, value, "", size=size, heading_context=context, mode=mode,
                                  chunks=summary.chunks, queries=metrics["queries"])
                             for name, value in metrics.items() if "@" in name]
            finally:
                retriever.close()
    return rows


async def _ranked_documents(retriever: Retriever, items: list[dict], k: int, mode: str) -> dict[str, list[str]]:
    run = {}
    for item in items:
        # Extra chunks so that k distinct documents are ranked even when one document has several hits.
        chunks = await retriever.retrieve(item["question"], "quality", "bench", top_k=4 * k, mode=mode)
        run[str(item["id"])] = list(dict.fromkeys(c.document for c in chunks))[:k]
    return run


def _timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def bench_retrieve(workdir: Path, *, chunks: int = 10_000, clients: int = 16, queries_per_client: int = 25,
                   chunk_chars: int = 300, embedder: EmbedderLike | None = None) -> list[Row]:
    """Retrieve latency (p50/p99) and throughput under concurrent clients, dense and hybrid.

    Args:
        workdir: Folder for a fresh Milvus Lite file.
        chunks: Collection size (one chunk per synthetic document).
        clients: Concurrent clients, each issuing queries back to back.
        queries_per_client: Queries per client per mode.
        chunk_chars: Document (= chunk) length; short keeps the 10k embedding affordable.
        embedder: Reuse a loaded embedder (else the configured one is loaded).
    """
    retriever = Retriever(_config(workdir, chunk_chars), embedder=embedder)
    try:
        documents = synthetic_documents(chunks, chunk_chars - 20, seed=2)
        summary = retriever.ingestor.ingest("bench-retrieve", "bench", documents, progress=True)
        rows = [_row("retrieve", "collection_chunks", summary.chunks, "chunks", ingest_s=round(summary.seconds, 1))]
        queries = [d.text[:80] for d in synthetic_documents(clients * queries_per_client, 200, seed=3)]
        for mode in ("dense", "hybrid"):
            rows += asyncio.run(_load(retriever, queries, clients, mode))
    finally:
        retriever.close()
    return rows


async def _load(retriever: Retriever, queries: list[str], clients: int, mode: str) -> list[Row]:
    latencies: list[float] = []

    async def client(mine: list[str]) -> None:
        for query in mine:
            started = time.perf_counter()
            await retriever.retrieve(query, "bench-retrieve", "bench", top_k=5, mode=mode)
            latencies.append(time.perf_counter() - started)

    await retriever.retrieve(queries[0], "bench-retrieve", "bench", mode=mode)  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(client(queries[i::clients]) for i in range(clients)))
    wall = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    extra = {"mode": mode, "clients": clients, "queries": len(latencies)}
    return [
        _row("retrieve", "p50_latency", cuts[49] * 1000, "ms", **extra),
        _row("retrieve", "p99_latency", cuts[98] * 1000, "ms", **extra),
        _row("retrieve", "throughput", len(latencies) / wall, "queries/s", **extra),
    ]


def run(quick: bool = True, workdir: Path | None = None) -> list[Row]:
    """Both benchmarks; ``quick`` = small sizes (about a minute), else the full 10k-chunk run."""
    from retrieval.embedder import Embedder

    embedder = Embedder()
    with tempfile.TemporaryDirectory(prefix="ragtune-bench-", dir=workdir) as tmp:
        rows = bench_ingest(Path(tmp) / "ingest", docs=40 if quick else 100, embedder=embedder)
        rows += bench_retrieve(Path(tmp) / "retrieve", chunks=500 if quick else 10_000,
                               queries_per_client=10 if quick else 25, embedder=embedder)
    return rows


def main(argv: list[str] | None = None) -> None:
    """CLI: print one JSON row per line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=True, help="small sizes (default)")
    size.add_argument("--full", action="store_true", help="10k-chunk collection (several minutes)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put temporary Milvus files")
    parser.add_argument("--scale", type=int, default=None, metavar="CHUNKS",
                        help="only the ingest-at-scale benchmark with this many chunks (e.g. 100000)")
    parser.add_argument("--quality", nargs=2, type=Path, default=None, metavar=("DOCS", "QA_JSONL"),
                        help="only the retrieval-quality comparison on a labelled set")
    args = parser.parse_args(argv)
    if args.quality:
        with tempfile.TemporaryDirectory(prefix="ragtune-bench-", dir=args.workdir) as tmp:
            rows = bench_quality(Path(tmp), *args.quality)
    elif args.scale:
        with tempfile.TemporaryDirectory(prefix="ragtune-bench-", dir=args.workdir) as tmp:
            rows = bench_ingest_scale(Path(tmp), chunks=args.scale)
    else:
        rows = run(quick=not args.full, workdir=args.workdir)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
