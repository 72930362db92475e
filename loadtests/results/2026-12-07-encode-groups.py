"""Where the ingest's encode time goes: the same 2048 scale-corpus chunk texts encoded three ways.

``raw``: the reference of ``retrieval.bench --scale`` (one ``SentenceTransformer.encode`` call);
``g256`` / ``g1024``: as the ingest encodes, ``Embedder.encode`` per group of 256 / 1024 chunks.
Alternated A B C C B A in one process. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/results/2026-12-07-encode-groups.py
"""

from __future__ import annotations

import json
import time

from retrieval.bench import _raw_encode, scale_corpus
from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig
from retrieval.embedder import Embedder


def main() -> None:
    embedder = Embedder()
    _, pieces = scale_corpus(2048, Chunker(ChunkingConfig(size=300, overlap=300 // 8)), 300)
    texts = [t for p in pieces for t in p][:2048]
    raw = _raw_encode(embedder)
    raw(texts[:128])  # warm-up

    def grouped(size: int):
        return lambda ts: [embedder.encode(ts[i:i + size]) for i in range(0, len(ts), size)]

    variants = {"raw": raw, "g256": grouped(256), "g1024": grouped(1024)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for name in ("raw", "g256", "g1024", "g1024", "g256", "raw"):
        started = time.perf_counter()
        variants[name](texts)
        rates[name].append(round(len(texts) / (time.perf_counter() - started), 1))
        print(name, rates[name][-1], "chunks/s", flush=True)
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
