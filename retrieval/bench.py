"""Retrieval benchmarks; each function returns result rows (dicts) for ``ragtune bench``.

* ``bench_ingest``: ingest rate (chunks/s, end to end: chunk, hash, embed, upsert, flush) vs the
  raw embedder's encode rate on the same chunk texts. Goal: ratio >= 0.9.
* ``bench_ingest_scale``: the same ratio at scale (``--scale 100000``: 100k chunks through the
  real write path, batched embedding, writes overlapped with encoding); the raw rate is
  ``SentenceTransformer.encode`` of the same chunk texts (all of them, or ``--sample N`` of them)
  at the same batch size, half before and half after the ingest so machine-load drift hits both
  (the half after once the store's background compaction and index builds have gone idle).
  ``--part I/P --workdir DIR`` ingests the I-th of P slices of the corpus into one persistent
  collection (pieces that fit a shared machine's lock slots); each part prints its rows and the
  cumulative ones over the parts done so far; ``--keep --workdir DIR`` keeps a one-piece run's
  collection in DIR. Rows also split the ingest's time: encode (main
  thread), store writes (writer thread, overlapped), and the rest (chunking, hashing, waiting).
* ``bench_quality``: hit@k, MRR@k, nDCG@k (``retrieval.quality``) on a labelled set (a folder of
  documents + JSON Lines of ``{"id", "question", "documents": [ids]}``) for chunk sizes, heading
  context on/off and dense/hybrid: ``--quality DOCS QA.jsonl``.
* ``bench_retrieve``: retrieve latency p50/p99 and throughput with 16 concurrent clients through
  ``Retriever.retrieve`` in-process, dense and hybrid, on a synthetic collection (10k chunks;
  ``quick`` uses 500).
* ``bench_retrieve_compare``: the same load, several embedder settings side by side in one process
  over one collection (``--compare CHUNKS --query-precision fp32,bf16 --workdir DIR``), rounds
  interleaved; the collection stays in DIR and a rerun only ingests what is missing (``--part I/P``
  adds the I-th slice of the documents). Rows carry p50/p99, queries/s, queries per embedder call,
  the embedder's ms per call, and how many of each query's top-5 chunks match the first setting's.
* ``--query-precision`` / ``--document-precision`` (comma lists) with ``--quality``: one quality run
  per setting, in one process.

The corpus is synthetic but deterministic: sentences drawn from the sample knowledge base's
vocabulary. Run: ``HF_HUB_OFFLINE=1 python -m retrieval.bench --quick`` (``--full`` once: it
embeds 10k chunks, several minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig, EmbedderConfig, IngestConfig, MilvusConfig, RetrievalConfig
from retrieval.retriever import Retriever
from retrieval.sample_kb import SAMPLE_KB_DIR
from retrieval.types import Document, EmbedderLike

__all__ = ["bench_ingest", "bench_ingest_scale", "bench_quality", "bench_retrieve", "bench_retrieve_compare", "main",
           "run", "scale_corpus", "synthetic_documents"]

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
        raw = _raw_encode(retriever.embedder)
        raw_seconds = _timed(raw, texts)
        summary = retriever.ingestor.ingest("bench-ingest", "bench", documents, progress=False)
        raw_seconds = (raw_seconds + _timed(raw, texts)) / 2
    finally:
        retriever.close()
    raw_rate, ingest_rate = len(texts) / raw_seconds, summary.chunks / summary.seconds
    return [
        _row("ingest", "raw_encode_rate", raw_rate, "chunks/s", chunks=len(texts)),
        _row("ingest", "ingest_rate", ingest_rate, "chunks/s", chunks=summary.chunks, docs=summary.added),
        _row("ingest", "ingest_vs_raw", ingest_rate / raw_rate, "ratio", goal=">= 0.9"),
    ]


def _raw_encode(embedder: EmbedderLike) -> Any:
    """The reference: the model's own ``SentenceTransformer.encode`` at the ingest's batch size and
    prompt, numpy out (no list conversion); a fake embedder's ``encode`` where there is no model."""
    model = getattr(embedder, "model", None)
    if model is None or not hasattr(model, "encode"):
        return embedder.encode
    batch, prompt = embedder.config.batch_size, embedder.prompts.document  # type: ignore[attr-defined]
    return lambda texts: model.encode(list(texts), prompt=prompt, batch_size=batch, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)


def _raw_encode_streams(embedder: EmbedderLike, group: int, requested: int | None) -> Any:
    """The second reference: the raw encode laid out as the ingest lays out its encoding (groups of
    ``group`` texts on the embedder's ``encoding_streams``), so ``ingest ÷ this`` is what the ingest
    costs beyond encoding the way it encodes."""
    raw = _raw_encode(embedder)

    def run(texts: list[str]) -> None:
        with embedder.encoding_streams(requested) as streams, ThreadPoolExecutor(max_workers=streams) as pool:
            size = min(group, -(-len(texts) // streams))  # a sample smaller than streams x group still uses all
            list(pool.map(raw, [texts[i:i + size] for i in range(0, len(texts), size)]))

    return run


def scale_corpus(chunks: int, chunker: Chunker, chunk_chars: int = 300) -> tuple[list[Document], list[list[str]]]:
    """Deterministic documents of ~4 chunks each until the chunker yields ``chunks``; with their chunks."""
    documents, pieces, total, seed = [], [], 0, 10
    while total < chunks:
        for doc in synthetic_documents(1000, chunk_chars * 7 // 2, seed=seed):
            documents.append(Document(f"{doc.id}-{seed}", doc.text, doc.source))
            pieces.append(chunker.split(doc.text))
            total += len(pieces[-1])
            if total >= chunks:
                break
        seed += 1
    return documents, pieces


def bench_ingest_scale(workdir: Path, *, chunks: int = 100_000, chunk_chars: int = 300, sample: int | None = None,
                       part: tuple[int, int] = (1, 1), embedder: EmbedderLike | None = None,
                       progress: bool = True, store_server: bool = False) -> list[Row]:
    """Ingest ``chunks`` chunks (synthetic documents of ~4 chunks each) and compare with raw encode.

    Args:
        workdir: Folder for the Milvus Lite file (kept across parts when the caller keeps it).
        chunks: Chunks in the whole corpus (documents are generated until the chunker yields this many).
        chunk_chars: Chunk size in characters (300 = ~70 MiniLM tokens; overlap 1/8 of it).
        sample: Chunk texts (of this part, evenly spaced) encoded raw; None = all of them.
        part: ``(i, p)``: ingest the i-th (1-based) of p equal slices of the documents.
        embedder: Reuse a loaded embedder (else the configured one is loaded).
        progress: Show the ingest's tqdm bar.
        store_server: Write to a milvus-lite server process on loopback, as ``ragtune ingest`` and
            ``ragtune up`` do (``milvus_lite.enabled``), instead of opening the Lite file in this
            process (at 20k chunks: 0.85x the raw encode against 0.90x in-process, where
            milvus-lite, which is Python, shares the encoder's GIL but no process switch).
    """
    index, parts = part
    if not 1 <= index <= parts:
        raise ValueError(f"part {index}/{parts}: need 1 <= i <= p")
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config(workdir, chunk_chars)
    if not store_server:
        return _ingest_scale(workdir, config, chunks, chunk_chars, sample, part, embedder, progress)
    from cluster.milvus_server import MilvusLiteServer
    from cluster.processes import free_port

    with MilvusLiteServer(workdir / "milvus-server", port=free_port()) as server:
        served = config.model_copy(update={"milvus": MilvusConfig(uri=server.uri)})
        return _ingest_scale(workdir, served, chunks, chunk_chars, sample, part, embedder, progress, server.pid)


def process_cpu_seconds(process: Any) -> float:
    """User + system CPU seconds of a ``psutil.Process`` so far."""
    times = process.cpu_times()
    return times.user + times.system


def wait_until_idle(pid: int, *, window_s: float = 5.0, busy_cpu_s: float = 0.5, timeout_s: float = 900.0) -> float:
    """Block until process ``pid`` uses less than ``busy_cpu_s`` CPU seconds in a ``window_s`` window;
    the seconds waited.

    After an ingest returns, Milvus Lite still compacts and builds indexes in the background. Timing
    the raw encoder during that work gave it a lower reference (at 50k stored + 12k new chunks: 48.4
    chunks/s right after the ingest, 65.0 once the server was idle; 68-72 before), so the raw rate
    after the ingest is taken once the store is idle. For an in-process store, ``pid`` is this
    process: the caller sleeps, so what CPU it uses is the store's background threads.
    """
    import psutil

    process, started = psutil.Process(pid), time.perf_counter()
    last = process_cpu_seconds(process)
    while time.perf_counter() - started < timeout_s:
        time.sleep(window_s)
        now = process_cpu_seconds(process)
        if now - last < busy_cpu_s:
            break
        last = now
    return time.perf_counter() - started


def _ingest_scale(workdir: Path, config: RetrievalConfig, chunks: int, chunk_chars: int, sample: int | None,
                  part: tuple[int, int], embedder: EmbedderLike | None, progress: bool,
                  store_pid: int | None = None) -> list[Row]:
    import psutil

    index, parts = part
    retriever = Retriever(config, embedder=embedder)
    ingestor, embedder = retriever.ingestor, retriever.embedder
    documents, pieces = scale_corpus(chunks, ingestor.chunker, chunk_chars)
    lo, hi = len(documents) * (index - 1) // parts, len(documents) * index // parts
    documents, texts = documents[lo:hi], [t for chunk_list in pieces[lo:hi] for t in chunk_list]
    probe = texts if sample is None or sample >= len(texts) else texts[:: len(texts) // sample][:sample]
    raw = _raw_encode(embedder)
    raw_streams = _raw_encode_streams(embedder, ingestor.config.batch_chunks, ingestor.config.encode_streams)
    with embedder.encoding_streams(ingestor.config.encode_streams) as streams:
        pass  # how many streams the ingest will run
    timers: dict[str, float] = {"encode": 0.0, "write": 0.0}
    try:
        # Warm-up: both layouts over every length, as the ingest warms them for the "after" half (a first
        # pass meets new tensor shapes, and at one torch thread new kernels; 128 texts left "before" 5-20 %
        # below "after"); the registry and collection are created outside the timing.
        raw(texts[:1024])
        raw_streams(texts[:1024])
        ingestor.ingest("bench-scale", "bench", [Document("warm-up", "warm up")], progress=False)
        # The store's start-up and the warm-up's flush and index build, not the host: the "before" half
        # ran 49.4 chunks/s against 78.8 after (100k, 2026-12-08) while only the "after" half waited.
        settle_before = wait_until_idle(store_pid or os.getpid())
        raw_before = _timed(raw, probe[0::2])
        streams_before = _timed(raw_streams, probe[0::2])
        ingestor.embedder = _Timed(embedder, "encode", timers)  # type: ignore[assignment]
        ingestor.store = _Timed(ingestor.store, ("replace_documents", "flush"), timers, "write")  # type: ignore[assignment]
        store_cpu = psutil.Process(store_pid) if store_pid else None
        store_cpu_before = process_cpu_seconds(store_cpu) if store_cpu else 0.0
        summary = ingestor.ingest("bench-scale", "bench", documents, progress=progress)
        store_cpu_during = process_cpu_seconds(store_cpu) - store_cpu_before if store_cpu else None
        ingestor.embedder, ingestor.store = embedder, ingestor.store._inner  # type: ignore[attr-defined]
        settle = wait_until_idle(store_pid or os.getpid())  # the store's background work, not the host's
        streams_after = _timed(raw_streams, probe[1::2])
        raw_after = _timed(raw, probe[1::2])
    finally:
        retriever.close()
    result = {"part": f"{index}/{parts}", "chunks": summary.chunks, "docs": summary.added + summary.updated,
              "failed": summary.failed, "seconds": summary.seconds, "raw_texts": len(probe),
              "raw_seconds": raw_before + raw_after, "raw_before_texts": len(probe[0::2]), "raw_before_s": raw_before,
              "raw_after_texts": len(probe[1::2]), "raw_after_s": raw_after, "settle_s": settle,
              "settle_before_s": settle_before, "store_cpu_s": store_cpu_during,
              "raw_streams_seconds": streams_before + streams_after, "raw_streams_before_s": streams_before,
              "raw_streams_after_s": streams_after, "streams": streams,
              "encode_s": timers["encode"], "write_s": timers["write"],
              "write_calls": timers.get("replace_documents_calls", 0), "groups": timers.get("encode_calls", 0),
              "store": "server" if config.milvus.uri.startswith(("http://", "https://")) else "in-process"}
    rows = _scale_rows("ingest_scale", result)
    if parts > 1:
        log = workdir / "scale-parts.jsonl"
        with log.open("a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        done = {r["part"]: r for r in map(json.loads, log.read_text(encoding="utf-8").splitlines())}
        total = {k: sum(r.get(k) or 0 for r in done.values()) for k in result if k not in ("part", "store", "streams")}
        rows += _scale_rows("ingest_scale_cumulative", {"part": f"{len(done)}/{parts}", **total})
    return rows


def _scale_rows(bench: str, r: dict[str, Any]) -> list[Row]:
    raw_rate, ingest_rate = r["raw_texts"] / r["raw_seconds"], r["chunks"] / r["seconds"]
    rows = [
        # Before and after the ingest apart: a host whose speed drifts during the run shows here.
        _row(bench, "raw_encode_rate", raw_rate, "chunks/s", chunks=r["raw_texts"], part=r["part"],
             **{f"{when}_rate": round(r[f"raw_{when}_texts"] / r[f"raw_{when}_s"], 1)
                for when in ("before", "after") if r.get(f"raw_{when}_s")},
             **({"after_store_idle_s": round(r["settle_s"], 1)} if "settle_s" in r else {}),
             **({"before_store_idle_s": round(r["settle_before_s"], 1)} if "settle_before_s" in r else {})),
        _row(bench, "ingest_rate", ingest_rate, "chunks/s", chunks=r["chunks"], docs=r["docs"], failed=r["failed"],
             seconds=round(r["seconds"], 1), part=r["part"]),
        _row(bench, "ingest_vs_raw", ingest_rate / raw_rate, "ratio", goal=">= 0.9", part=r["part"],
             store=r.get("store", "in-process")),
    ]
    streams = r.get("streams", 1)
    if r.get("raw_streams_seconds"):
        streams_rate = r["raw_texts"] / r["raw_streams_seconds"]
        rows += [
            _row(bench, "raw_streams_encode_rate", streams_rate, "chunks/s", chunks=r["raw_texts"], part=r["part"],
                 streams=streams, **{f"{when}_rate": round(r[f"raw_{when}_texts"] / r[f"raw_streams_{when}_s"], 1)
                                     for when in ("before", "after") if r.get(f"raw_streams_{when}_s")}),
            _row(bench, "ingest_vs_raw_streams", ingest_rate / streams_rate, "ratio", part=r["part"]),
        ]
    # encode_s sums the encode calls' wall time over the streams: encode_s / streams is the encoders' wall time.
    rows.append(_row(bench, "time_split", r["seconds"], "s", encode_s=round(r["encode_s"], 1), streams=streams,
                     write_s_overlapped=round(r["write_s"], 1),
                     rest_s=round(r["seconds"] - r["encode_s"] / streams, 1),
                     groups=r.get("groups"), writes=r.get("write_calls"), part=r["part"],
                     **({"store_server_cpu_s": round(r["store_cpu_s"], 1)} if r.get("store_cpu_s") else {})))
    return rows


class _Timed:
    """Forwards to ``inner``; adds the wall time of calls to the named methods to ``timers[key]``."""

    def __init__(self, inner: Any, names: str | tuple[str, ...], timers: dict[str, float], key: str | None = None):
        self._names = (names,) if isinstance(names, str) else names
        self._inner, self._timers, self._key = inner, timers, key or self._names[0]
        self._lock = threading.Lock()  # the ingest's encode streams call from several threads

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if attr not in self._names:
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                with self._lock:
                    self._timers[self._key] += time.perf_counter() - started
                    self._timers[f"{attr}_calls"] = self._timers.get(f"{attr}_calls", 0) + 1

        return timed


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


def bench_retrieve_compare(workdir: Path, settings: dict[str, EmbedderConfig], *, chunks: int = 10_000,
                           rounds: int = 2, clients: tuple[int, ...] = (16, 1), modes: tuple[str, ...] = ("dense",
                           "hybrid"), part: tuple[int, int] = (1, 1),
                           batch_waits: tuple[float, ...] = ()) -> list[Row]:
    """Retrieve latency of several embedder settings over one collection, measured in turns.

    Args:
        workdir: Folder of the Milvus Lite file; kept, so a rerun skips the documents already ingested.
        settings: Name → embedder config; the first one ingests and is the reference for top-5 agreement.
        chunks: Collection size (one ~280-character chunk per synthetic document, as section d2).
        rounds: Turns over all (setting, mode, clients) cells; rows are per round.
        clients: Concurrent-client counts (16 clients send 160 queries, 1 client 40, as section d2).
        modes: ``dense`` and/or ``hybrid``.
        part: ``(i, p)``: ingest only the i-th of p slices of the documents and measure nothing (p > 1).
        batch_waits: ``search.batch_wait_timeout_s`` values to cross with the settings (() = the default).
    """
    from retrieval.embedder import Embedder

    if not settings:
        raise ValueError("bench_retrieve_compare: give at least one embedder setting")
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config(workdir, 300)
    config = config.model_copy(update={"ingest": config.ingest.model_copy(update={"batch_chunks": 1024})})
    embedders = {name: Embedder(cfg) for name, cfg in settings.items()}
    first = Retriever(config, embedder=next(iter(embedders.values())))
    try:
        documents = synthetic_documents(chunks, 280, seed=2)
        index, parts = part
        summary = first.ingestor.ingest("bench-retrieve", "bench",
                                        documents[len(documents) * (index - 1) // parts:len(documents) * index // parts],
                                        progress=True)
        rows = [_row("retrieve_compare", "ingest", summary.seconds, "s", added=summary.added,
                     unchanged=summary.unchanged, chunks=summary.chunks, part=f"{index}/{parts}")]
        if parts > 1:
            return rows
        variants = {name: (e, config) for name, e in embedders.items()} if not batch_waits else {
            f"{name} wait={wait * 1000:g}ms": (e, config.model_copy(update={"search": config.search.model_copy(
                update={"batch_wait_timeout_s": wait})})) for name, e in embedders.items() for wait in batch_waits}
        reference = next(iter(variants))
        timers: dict[str, float] = dict.fromkeys(variants, 0.0)
        retrievers = {name: Retriever(cfg, embedder=_Timed(e, "encode_queries", timers, name),  # type: ignore[arg-type]
                                      store=first.store) for name, (e, cfg) in variants.items()}
        queries = [d.text[:80] for d in synthetic_documents(16 * 25, 200, seed=3)]
        for mode in modes:
            rows += asyncio.run(_agreement(retrievers, reference, queries, mode))
            rows += asyncio.run(_known_items(retrievers, documents, mode))
        for turn in range(1, rounds + 1):
            for mode in modes:
                for count in clients:
                    for name, retriever in retrievers.items():
                        timers.update({name: 0.0, "encode_queries_calls": 0})
                        cell = asyncio.run(_load(retriever, queries[:160 if count > 1 else 40], count, mode))
                        calls = timers["encode_queries_calls"] - 1  # less the warm-up query
                        for row in cell:
                            row.update(setting=name, round=turn, batch=round(cell[0]["queries"] / max(calls, 1), 1),
                                       embed_ms_per_call=round(timers[name] * 1000 / max(calls + 1, 1), 1))
                        rows += cell
    finally:
        first.close()
    return rows


async def _agreement(retrievers: dict[str, Retriever], reference: str, queries: list[str], mode: str) -> list[Row]:
    """Mean share of the reference setting's top-5 chunk ids that each other setting also returns."""
    async def top(retriever: Retriever) -> list[set[str]]:
        found = await asyncio.gather(*(retriever.retrieve(q, "bench-retrieve", "bench", top_k=5, mode=mode)
                                       for q in queries))
        return [{c.id for c in chunks} for chunks in found]

    expected = await top(retrievers[reference])
    rows = []
    for name, retriever in retrievers.items():
        if name != reference:
            got = await top(retriever)
            share = statistics.fmean(len(a & b) / max(len(a), 1) for a, b in zip(expected, got, strict=True))
            rows.append(_row("retrieve_compare", "top5_agreement", share, "share", setting=name,
                             reference=reference, mode=mode, queries=len(queries)))
    return rows


async def _known_items(retrievers: dict[str, Retriever], documents: list[Document], mode: str,
                       count: int = 400) -> list[Row]:
    """hit@5/MRR@5 of known-item queries: 80 characters from the middle of a stored document, which is the
    one relevant id (a labelled set as large as the collection needs; the example eval set has 8 documents)."""
    from retrieval.quality import retrieval_metrics

    picked = documents[:: max(len(documents) // count, 1)][:count]
    qrels = {d.id: {d.id} for d in picked}
    rows = []
    for name, retriever in retrievers.items():
        found = await asyncio.gather(*(retriever.retrieve(d.text[100:180], "bench-retrieve", "bench", top_k=5,
                                                          mode=mode) for d in picked))
        metrics = retrieval_metrics({d.id: [c.document for c in chunks] for d, chunks in zip(picked, found,
                                                                                            strict=True)}, qrels, k=5)
        rows += [_row("retrieve_compare", f"known_item_{key}", metrics[key], "", setting=name, mode=mode,
                      queries=metrics["queries"]) for key in ("hit@5", "mrr@5")]
    return rows


def _settings(query: str, document: str) -> dict[str, EmbedderConfig]:
    """``"fp32,bf16"`` × ``"fp32"`` → named embedder configs (``q=bf16 d=fp32``), query side varying first."""
    names = {"q": [p.strip() for p in query.split(",") if p.strip()],
             "d": [p.strip() for p in document.split(",") if p.strip()]}
    return {f"q={q} d={d}": EmbedderConfig(query_precision=q, document_precision=d)  # type: ignore[arg-type]
            for d in names["d"] for q in names["q"]}


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
    parser.add_argument("--sample", type=int, default=None, metavar="TEXTS",
                        help="with --scale: encode only this many of the chunk texts raw (default: all)")
    parser.add_argument("--store-server", action="store_true",
                        help="with --scale: write to a milvus-lite server process, as `ragtune ingest` does")
    parser.add_argument("--part", default="1/1", metavar="I/P",
                        help="with --scale: ingest the I-th of P slices into DIR from --workdir (kept)")
    parser.add_argument("--keep", action="store_true",
                        help="with --scale: ingest into --workdir DIR itself and keep the collection there")
    parser.add_argument("--quality", nargs=2, type=Path, default=None, metavar=("DOCS", "QA_JSONL"),
                        help="only the retrieval-quality comparison on a labelled set")
    parser.add_argument("--compare", type=int, default=None, metavar="CHUNKS",
                        help="only retrieve latency per embedder setting over one collection kept in --workdir")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: turns over the settings")
    parser.add_argument("--modes", default="dense,hybrid", help="with --compare: dense and/or hybrid")
    parser.add_argument("--batch-wait", default="", metavar="LIST",
                        help="with --compare: comma list of search.batch_wait_timeout_s values (seconds)")
    parser.add_argument("--query-precision", default="fp32", metavar="LIST",
                        help="with --quality/--compare: comma list of embedder.query_precision settings")
    parser.add_argument("--document-precision", default="fp32", metavar="LIST",
                        help="with --quality/--compare: comma list of embedder.document_precision settings")
    args = parser.parse_args(argv)
    settings = _settings(args.query_precision, args.document_precision)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)  # temporary folders go inside it
    if args.quality:
        from retrieval.embedder import Embedder

        rows = []
        for name, embedder_config in settings.items():
            with tempfile.TemporaryDirectory(prefix="ragtune-bench-", dir=args.workdir) as tmp:
                rows += [{**row, "setting": name}
                         for row in bench_quality(Path(tmp), *args.quality, embedder=Embedder(embedder_config))]
    elif args.compare:
        if args.workdir is None:
            parser.error("--compare needs --workdir DIR (the collection is kept there)")
        index, parts = (int(x) for x in args.part.split("/"))
        rows = bench_retrieve_compare(args.workdir, settings, chunks=args.compare, rounds=args.rounds,
                                      modes=tuple(args.modes.split(",")), part=(index, parts),
                                      batch_waits=tuple(float(x) for x in args.batch_wait.split(",") if x.strip()))
    elif args.scale:
        index, parts = (int(x) for x in args.part.split("/"))
        if parts > 1 or args.keep:
            if args.workdir is None:
                parser.error("--part I/P and --keep need --workdir DIR (the collection is kept there)")
            rows = bench_ingest_scale(args.workdir, chunks=args.scale, sample=args.sample, part=(index, parts),
                                      store_server=args.store_server)
        else:
            with tempfile.TemporaryDirectory(prefix="ragtune-bench-", dir=args.workdir) as tmp:
                rows = bench_ingest_scale(Path(tmp), chunks=args.scale, sample=args.sample,
                                          store_server=args.store_server)
    else:
        rows = run(quick=not args.full, workdir=args.workdir)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
