"""Two patches on Milvus Lite: BM25 scoring without a Python loop per posting, and background work
(compaction, index builds) at low CPU priority.

**BM25, vectorised: the same scores and order.** milvus-lite 3.2 (the default store: a Lite file
in-process, or its server mode on loopback) scores the sparse (BM25) leg of every ``hybrid`` search in
``SparseInvertedIndex.search`` (``milvus_lite/index/sparse_inverted.py``): for each query, for each
query term, a Python loop over the term's whole posting list (``for local_id, tf in posting`` with a
numpy scalar BM25 formula per row), then a ``sorted`` of every scored document. Cost: ~1 µs per
posting entry, one query after the other; a 10-term query over a 10k-chunk collection touches ~10k
postings, so the BM25 leg (~10 ms a query, 16 queries a batch) was most of a hybrid retrieve's time
under load, and it grows linearly with the collection. There is nothing to configure instead: 3.2
accepts only ``SPARSE_INVERTED_INDEX`` with ``inverted_index_algo: TAAT_NAIVE`` and ``drop_ratio_* = 0``.

Here each term's posting list becomes two arrays on first use (document ids, and the BM25
term-frequency factor, which depends only on the document and the index's ``k1``/``b``/``avgdl``),
and a query adds whole arrays into one score vector. Bit for bit what upstream computes: the
upstream arithmetic runs in float32 (a numpy float32 ``dl`` makes every step float32 under NEP 50,
Python floats taking part as weak scalars), and so does this, in the same order of operations and
of query terms; ties keep upstream's order (documents in the order the query's terms first reach
them, as a stable ``sorted`` over an insertion-ordered dict does). ``tests/unit/
test_milvus_lite_patches.py`` checks ids and distances against the upstream method.

**Background work yields the CPU.** After each flush milvus-lite compacts segments and builds their
indexes (FAISS HNSW with ``efConstruction`` 200, on every core) on one background thread per
collection (``Collection._bg_compact_and_index``). During a bulk ingest that work competes with the
embedder for the same cores: in a store-only 100k-chunk ingest (no embedding) HNSW builds were 40 % of
the milvus-lite server's samples (py-spy), and a 2-thread encoder next to a busy HNSW build ran at
0.53x its rate alone, losing more than the build used (OpenMP threads stall on a descheduled peer).
The patch runs that thread at nice +10 (``BACKGROUND_NICE``, environment variable
``RAGTUNE_MILVUS_LITE_BACKGROUND_NICE``; Linux sets niceness per thread, and the
OpenMP workers FAISS starts from it inherit it), so compaction and index builds use the cores
that searches, writes and the embedder leave idle; measured beside the same encoder: 0.87-0.92x.
Searches and writes (the gRPC threads) keep normal priority. Index builds are not needed for
correctness: until a segment's index is built milvus-lite searches it exactly (brute force).

Production Milvus (a server URI) has its own engine; these patches touch only Milvus Lite in the
processes ragtune starts: :func:`apply` runs when ``retrieval.milvus`` opens a store and in the
milvus-lite server launched by ``cluster.milvus_server`` (``python -m retrieval.milvus_lite_patches
server ...`` = ``milvus-lite server ...`` with the patches applied).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["BACKGROUND_NICE", "apply", "bm25_search", "is_applied", "lower_thread_priority", "main", "remove"]

logger = logging.getLogger(__name__)

def _background_nice(raw: str | None) -> int:
    if raw is None or not raw.strip():
        return 10
    if not raw.strip().isdigit() or int(raw) > 19:
        raise ValueError(f"RAGTUNE_MILVUS_LITE_BACKGROUND_NICE must be a niceness from 0 to 19, got {raw!r}")
    return int(raw)


# CFS weight 110 against 1024 at nice 0: ~10 % of a core when it contends. 0 keeps milvus-lite's own
# priority (e.g. for an A/B); the server ragtune spawns inherits the variable.
BACKGROUND_NICE = _background_nice(os.environ.get("RAGTUNE_MILVUS_LITE_BACKGROUND_NICE"))
_original_search: Any = None
_original_background: Any = None
_lock = threading.Lock()


def apply() -> bool:
    """Install the vectorised BM25 search on milvus-lite's ``SparseInvertedIndex`` (idempotent).

    Returns:
        True when the patch is in place, False when milvus-lite is not installed (a Milvus server
        URI needs no patch).
    """
    global _original_search, _original_background
    try:
        from milvus_lite.engine.collection import Collection
        from milvus_lite.index.sparse_inverted import SparseInvertedIndex
    except ImportError:
        return False
    with _lock:
        if _original_search is None:
            _original_search = SparseInvertedIndex.search
            SparseInvertedIndex.search = bm25_search
        if _original_background is None:
            _original_background = Collection._bg_compact_and_index
            Collection._bg_compact_and_index = _background_at_low_priority
    return True


def is_applied() -> bool:
    """Whether :func:`apply` has replaced the upstream methods."""
    return _original_search is not None and _original_background is not None


def remove() -> None:
    """Restore the upstream methods (benchmarks compare both in one process). A background thread
    already lowered stays at its priority."""
    global _original_search, _original_background
    from milvus_lite.engine.collection import Collection
    from milvus_lite.index.sparse_inverted import SparseInvertedIndex

    with _lock:
        if _original_search is not None:
            SparseInvertedIndex.search = _original_search
            _original_search = None
        if _original_background is not None:
            Collection._bg_compact_and_index = _original_background
            _original_background = None


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> int:
    """Raise the calling thread's niceness to at least ``nice`` (Linux: per thread; threads it starts
    afterwards inherit it). Returns the niceness now in effect; unchanged where the OS has no
    per-thread priority."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return 0
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # e.g. a sandbox that forbids it: the work still runs, at normal priority
        logger.warning("could not lower the priority of milvus-lite's background thread (%s)", exc)
    return os.getpriority(os.PRIO_PROCESS, tid)


def _background_at_low_priority(self: Any) -> None:
    """``Collection._bg_compact_and_index`` on a thread lowered to ``BACKGROUND_NICE`` (a no-op after the
    first task on the collection's single-worker background pool: the thread is already there)."""
    if BACKGROUND_NICE > 0:
        lower_thread_priority(BACKGROUND_NICE)
    _original_background(self)


def _postings(index: Any, term: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The term's (document ids, BM25 tf factor) arrays, built once per index build and term."""
    cache = getattr(index, "_ragtune_postings", None)
    # ``build`` replaces ``_posting_lists`` (and the statistics): a cache of an older build is dropped.
    if cache is None or cache[0] is not index._posting_lists:
        cache = (index._posting_lists, {})
        index._ragtune_postings = cache
    arrays = cache[1].get(term)
    if arrays is None:
        posting = index._posting_lists.get(term)
        if not posting:
            return None
        ids = np.fromiter((p[0] for p in posting), dtype=np.int64, count=len(posting))
        tf = np.fromiter((p[1] for p in posting), dtype=np.float64, count=len(posting))
        k1, b = index.k1, index.b
        avgdl = index.avgdl if index.avgdl > 0 else 1.0
        dl = index._doc_lengths[ids]  # float32, as upstream's per-row ``dl``
        # Upstream: (tf * (k1 + 1.0)) / (tf + k1 * (1.0 - b + b * dl / avgdl)) with a Python-float tf and
        # a float32 dl: the numerator is a double rounded to float32 when it meets the float32
        # denominator, and tf (a float32 value from the packed vector) joins the denominator as float32.
        numerator = (tf * (k1 + 1.0)).astype(np.float32)
        denominator = tf.astype(np.float32) + k1 * ((1.0 - b) + (b * dl) / avgdl)
        arrays = (ids, numerator / denominator)
        cache[1][term] = arrays
    return arrays


def bm25_search(self: Any, query_sparse_vectors: list[dict[int, float]], top_k: int,
                valid_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Drop-in for ``SparseInvertedIndex.search``: ``(local_ids, distances)``, each ``(nq, top_k)``,
    distance = -BM25 score, padded with -1 / +inf."""
    from milvus_lite.index.sparse_common import empty_results, validate_mask

    valid_mask = validate_mask(valid_mask, len(self._doc_lengths))
    nq = len(query_sparse_vectors)
    all_ids, all_dists = empty_results(nq, top_k)
    if self.doc_count == 0:
        return all_ids, all_dists
    n, total = len(self._doc_lengths), self.doc_count
    for qi, query_terms in enumerate(query_sparse_vectors):
        if not query_terms:
            continue
        scores = np.zeros(n, dtype=np.float32)
        first = np.full(n, -1, dtype=np.int64)  # order in which the query's terms first reach a document
        reached = 0
        for term, weight in query_terms.items():
            arrays = _postings(self, term)
            if arrays is None:
                continue
            ids, factor = arrays
            df = self._df[term]
            idf = math.log((total - df + 0.5) / (df + 0.5) + 1.0)
            # Posting ids are unique within a term, so fancy-index += adds each once.
            scores[ids] += (idf * factor) * weight
            new = ids[first[ids] < 0]
            first[new] = np.arange(reached, reached + len(new))
            reached += len(new)
        # Masked documents are dropped here rather than per term: a document's score depends only on
        # its own postings, and dropping some documents keeps the others' first-reached order.
        reached_mask = first >= 0 if valid_mask is None else (first >= 0) & valid_mask
        candidates = np.flatnonzero(reached_mask)
        # Highest score first; equal scores in first-reached order (upstream's stable sort).
        order = np.lexsort((first[candidates], -scores[candidates]))[:top_k]
        best = candidates[order]
        all_ids[qi, :len(best)] = best
        all_dists[qi, :len(best)] = -scores[best]
    return all_ids, all_dists


def main(argv: list[str] | None = None) -> None:
    """``milvus-lite`` (its command line, e.g. ``server --data-dir D --host 127.0.0.1 --port P``) with the patches."""
    apply()
    from milvus_lite.cmdline import main as milvus_lite_main

    sys.exit(milvus_lite_main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
