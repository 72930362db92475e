"""The vectorised BM25 scorer gives milvus-lite's own answer, bit for bit (ids, distances, tie order)."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

pytest.importorskip("milvus_lite")
from milvus_lite.index.sparse_inverted import SparseInvertedIndex  # noqa: E402

from retrieval import milvus_lite_patches  # noqa: E402

UPSTREAM = SparseInvertedIndex.search  # captured before any test applies the patch


def _f32(x: float) -> float:
    """A Python float holding a float32 value, as milvus-lite's ``bytes_to_sparse`` returns."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _corpus(docs: int, vocabulary: int, seed: int) -> list[dict[int, float]]:
    rng = random.Random(seed)
    vectors = []
    for _ in range(docs):
        terms = rng.sample(range(vocabulary), rng.randint(0, 12))
        vectors.append({t: _f32(float(rng.randint(1, 4))) for t in terms})
    vectors += vectors[:docs // 10]  # exact duplicates: equal scores, so the tie order is tested too
    return vectors


def _queries(count: int, vocabulary: int, seed: int) -> list[dict[int, float]]:
    rng = random.Random(seed)
    queries = [{t: 1.0 for t in rng.sample(range(vocabulary + 5), rng.randint(1, 8))} for _ in range(count)]
    return queries + [{}, {vocabulary + 100: 1.0}]  # an empty query and one whose term no document has


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (1.2, 0.0), (2.0, 1.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_same_ids_and_distances_as_upstream(k1, b, masked):
    index = SparseInvertedIndex(k1=k1, b=b)
    vectors = _corpus(600, 60, seed=1)
    build_mask = np.array([i % 7 != 3 for i in range(len(vectors))])
    index.build(vectors, valid_mask=build_mask)
    queries = _queries(40, 60, seed=2)
    mask = np.random.default_rng(3).random(len(vectors)) > 0.3 if masked else None
    for top_k in (1, 5, 50, 2000):  # 2000: more slots than scored documents (padding)
        want_ids, want_dists = UPSTREAM(index, queries, top_k, valid_mask=mask)
        got_ids, got_dists = milvus_lite_patches.bm25_search(index, queries, top_k, valid_mask=mask)
        assert got_ids.dtype == want_ids.dtype and got_dists.dtype == want_dists.dtype
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_dists, want_dists)
    assert (want_ids[:, 1] >= 0).sum() > 20, "the case must have real multi-hit rankings"


def test_a_rebuilt_index_drops_the_cached_postings():
    index = SparseInvertedIndex()
    index.build([{1: 1.0}, {1: 2.0, 2: 1.0}])
    milvus_lite_patches.bm25_search(index, [{1: 1.0}], 2)
    index.build([{2: 1.0}, {1: 1.0}, {1: 3.0}])
    ids, dists = milvus_lite_patches.bm25_search(index, [{1: 1.0}], 3)
    want_ids, want_dists = UPSTREAM(index, [{1: 1.0}], 3)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dists, want_dists)
    assert list(ids[0]) == [2, 1, -1]


def test_apply_installs_and_remove_restores():
    try:
        assert milvus_lite_patches.apply() is True
        assert SparseInvertedIndex.search is milvus_lite_patches.bm25_search and milvus_lite_patches.is_applied()
        assert milvus_lite_patches.apply() is True  # idempotent: the original stays what remove() restores
    finally:
        milvus_lite_patches.remove()
    assert SparseInvertedIndex.search is UPSTREAM and not milvus_lite_patches.is_applied()
