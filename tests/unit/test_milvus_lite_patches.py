"""The vectorised BM25 scorer gives milvus-lite's own answer, bit for bit (ids, distances, tie order)."""

from __future__ import annotations

import os
import random
import struct
import threading

import numpy as np
import pytest

pytest.importorskip("milvus_lite")
from milvus_lite.engine.collection import Collection  # noqa: E402
from milvus_lite.index.sparse_inverted import SparseInvertedIndex  # noqa: E402
from milvus_lite.server_manager import server_manager_instance  # noqa: E402
from pymilvus import DataType, MilvusClient  # noqa: E402

from retrieval import milvus_lite_patches  # noqa: E402

UPSTREAM = SparseInvertedIndex.search  # captured before any test applies the patches
UPSTREAM_BACKGROUND = Collection._bg_compact_and_index


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
        assert Collection._bg_compact_and_index is not UPSTREAM_BACKGROUND
        assert milvus_lite_patches.apply() is True  # idempotent: the original stays what remove() restores
    finally:
        milvus_lite_patches.remove()
    assert SparseInvertedIndex.search is UPSTREAM and not milvus_lite_patches.is_applied()
    assert Collection._bg_compact_and_index is UPSTREAM_BACKGROUND


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_lower_thread_priority_changes_only_the_calling_thread():
    base = _own_niceness()  # 0 usually; whatever the test run was started at (e.g. under `nice`)
    if base >= 18:
        pytest.skip(f"the tests already run at nice {base}")
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(milvus_lite_patches.lower_thread_priority(base + 1)))
    worker.start()
    worker.join()
    assert seen == [base + 1]
    assert _own_niceness() == base


def _background_niceness(client: MilvusClient, path: str, name: str, timeout_s: float = 60.0) -> int:
    """Insert and flush into a new HNSW collection; the niceness its background thread ends up with."""
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index("v", index_type="HNSW", metric_type="COSINE", params={"M": 8, "efConstruction": 32})
    client.create_collection(name, schema=schema, index_params=index)
    rng = np.random.default_rng(0)
    client.insert(name, [{"id": i, "v": rng.standard_normal(8).tolist()} for i in range(256)])
    client.flush(name)  # the flush hands compaction and the index build to the collection's background thread
    # The collection object, from milvus-lite's own registry: the DB that serves this path caches it.
    # (Not a gc.get_objects() scan: that also meets dead weakref proxies, and isinstance raises on them.)
    _server, db, _port = server_manager_instance._servers[os.path.abspath(path)]
    collection: Collection = db.get_collection(name)
    collection._wait_for_bg(timeout=timeout_s)  # milvus-lite's own drain point: the build has run
    worker = next(t for t in threading.enumerate() if t.name.startswith(f"milvus_lite-{name}"))
    return os.getpriority(os.PRIO_PROCESS, worker.native_id)


def test_background_compaction_and_index_builds_run_at_low_priority(tmp_path):
    base = _own_niceness()
    if base >= milvus_lite_patches.BACKGROUND_NICE:
        pytest.skip(f"the tests already run at nice {base}")
    path = str(tmp_path / "nice.db")
    client = MilvusClient(path)
    try:
        milvus_lite_patches.remove()
        assert _background_niceness(client, path, "upstream") == base  # the control: milvus-lite alone keeps it
        milvus_lite_patches.apply()
        assert _background_niceness(client, path, "patched") == milvus_lite_patches.BACKGROUND_NICE
        # The patched collection is still searched and served (indexed or not, exactly the same rows).
        hits = client.search("patched", data=[np.ones(8).tolist()], limit=3, anns_field="v")
        assert len(hits[0]) == 3
    finally:
        milvus_lite_patches.remove()
        client.close()
        server_manager_instance.release_server(os.path.abspath(path))  # as MilvusStore.close: not at exit


@pytest.mark.parametrize(("raw", "nice"), [(None, 10), ("", 10), ("0", 0), ("19", 19)])
def test_background_nice_from_the_environment(raw, nice):
    assert milvus_lite_patches._background_nice(raw) == nice


@pytest.mark.parametrize("raw", ["-5", "20", "low"])
def test_a_bad_background_nice_names_the_variable(raw):
    with pytest.raises(ValueError, match="RAGTUNE_MILVUS_LITE_BACKGROUND_NICE must be a niceness from 0 to 19"):
        milvus_lite_patches._background_nice(raw)
