"""BM25 scorer A/B in one process: milvus-lite's own ``SparseInvertedIndex.search`` vs ragtune's
vectorised one (``retrieval/milvus_lite_patches.py``), alternated over one kept collection.

Hybrid (and dense, for reference) retrieve with 16 clients and 1 client, as bench section d2, plus
a check that both scorers return the same top-5 chunks and scores for 400 queries. The collection
is the one ``retrieval.bench --compare`` keeps in DIR; create it first:

    HF_HUB_OFFLINE=1 .venv/bin/python -m retrieval.bench --compare 10000 --workdir DIR --modes dense --rounds 1
    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/results/2026-12-07-bm25-ab.py DIR [ROUNDS]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from retrieval import milvus_lite_patches
from retrieval.bench import _config, _load, synthetic_documents
from retrieval.retriever import Retriever

SCORERS = {"upstream": milvus_lite_patches.remove, "vectorised": milvus_lite_patches.apply}


async def _top5(retriever: Retriever, queries: list[str]) -> list[list[tuple[str, float]]]:
    found = await asyncio.gather(*(retriever.retrieve(q, "bench-retrieve", "bench", top_k=5, mode="hybrid")
                                   for q in queries))
    return [[(c.id, c.score) for c in chunks] for chunks in found]


def main() -> None:
    workdir, rounds = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3
    retriever = Retriever(_config(workdir, 300))
    queries = [d.text[:80] for d in synthetic_documents(16 * 25, 200, seed=3)]
    try:
        answers = {}
        for name, install in SCORERS.items():
            install()
            answers[name] = asyncio.run(_top5(retriever, queries))
        same = sum(a == b for a, b in zip(answers["upstream"], answers["vectorised"], strict=True))
        print(json.dumps({"metric": "identical hybrid top-5 (ids and scores)", "value": same, "of": len(queries)}))
        for turn in range(1, rounds + 1):
            for mode in ("hybrid", "dense"):
                for name, install in SCORERS.items():
                    install()
                    for clients in (16, 1):
                        for row in asyncio.run(_load(retriever, queries[:160 if clients > 1 else 40], clients, mode)):
                            print(json.dumps({**row, "bm25": name, "round": turn}), flush=True)
    finally:
        retriever.close()


if __name__ == "__main__":
    main()
