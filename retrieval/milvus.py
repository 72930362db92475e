"""The Milvus store: one collection per knowledge base, plus a small registry collection.

The same code runs against a Milvus Lite file (``./data/milvus.db``), a milvus-lite server
(``http://127.0.0.1:P``) and a production Milvus (URI + token).

**Chunk collections** have an explicit schema (no dynamic fields): ``id`` (primary key,
``doc_id#chunk_index``), ``doc_id``, ``chunk_index``, ``text`` (analyzer on), ``source``,
``tenant``, ``metadata`` (JSON), ``content_hash``, ``dense`` (HNSW, COSINE) and ``sparse``
(filled from ``text`` by a BM25 ``Function``), so dense and hybrid (dense + BM25, RRF) search
both work.

**Document generations.** A document version's chunks have ids ``doc_id#<generation>#i``
(the generation is the start of the version's content hash). An update is one upsert request
carrying the new generation's rows *and* a tombstone (``chunk_index = -1``) over every id of the
old generation, so the switch from old to new is a single write: Milvus applies one request at
one timestamp (milvus-lite under one memtable lock), so readers get the old version or the new
one, never a mix and never none. A tombstone is the old row itself with ``content_hash = ""``
(same vector, text, source, metadata): it matches every filter and ranks exactly where the old
row did, so a search's candidates always hold the newest version of an id and Milvus's
keep-the-newest dedup hides the old row; the store drops tombstone hits before answering.
Tombstones are then deleted (under the document's lock, also when swept after a crash). Writers
of a document are serialised by ``retrieval.doclocks`` (rows in this same store, so the rule holds
across retriever replicas), because two writers that both read the old ids would each leave their
own chunks live.

**Reads that race a flush (milvus-lite 3.2.2).** Its flush swaps in an empty memtable *before* it
takes the lock that publishes the sealed segment, and a read takes its segment snapshot, its
candidate rows and its delete mask at three moments. A read that a flush (any client's, e.g. the
other writer's ingest ending) overlaps can therefore see (a) the frozen memtable's rows but not its
deletes: old rows sealed earlier come back next to the new version (measured: the two-writer test's
reader saw 18 + 1 rows of two versions in 1 read of ~500, always during a flush; reproduced
deterministically by running a flush between candidate assembly and masking), or (b) none of the
frozen memtable: the state of the last flush. ``Strong`` changes nothing there (milvus-lite has no
timestamps), and a hybrid search's two legs are two reads besides. So: a search or
:meth:`document_rows` answer holding two versions of one document is read again (up to
``_MIXED_READS``; the check is a dict pass over the hits, nothing else changes on the search path);
and a writer, still holding the lock, re-reads the switched documents and hides (tombstone, delete)
any older row its first read missed, failing the write if one survives ``_VERIFY_PASSES`` checks —
case (b) in the writer's read would otherwise leave the previous version live until the next write.

**Ownership** (owner tenant, public flag, physical collection) lives in a small registry
collection; see ``retrieval.registry`` for why a collection rather than collection properties.
Logical names such as "ragtune-docs" are not valid Milvus names, so each maps to a physical
``<prefix><slug>_<digest>``.

Visibility: a tenant resolves its own collection first, then a public one of that name (public
names are unique). Others' private collections → NotFoundError. Public collections are
read-only for other tenants. Every search also ANDs ``tenant == owner`` (defence in depth).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, MilvusClient, RRFRanker
from pymilvus.exceptions import MilvusException, ParamError

from cluster.errors import InvalidRequestError, NotFoundError, RagtuneError
from retrieval import milvus_lite_patches
from retrieval.config import MilvusConfig
from retrieval.doclocks import DocumentLocks
from retrieval.filters import combine_filters, eq, in_list, quote
from retrieval.registry import CollectionRegistry, create_collection
from retrieval.tenancy import check_model, own_collection, pick_collection
from retrieval.types import (
    MAX_CHUNK_TEXT_BYTES,
    MAX_DOC_ID_BYTES,
    MAX_SOURCE_BYTES,
    Chunk,
    ChunkRecord,
    CollectionInfo,
    Mode,
    check_collection_name,
    check_tenant,
)

__all__ = ["MilvusStore", "physical_name"]

logger = logging.getLogger(__name__)

_OUTPUT_FIELDS = ["doc_id", "chunk_index", "text", "source", "metadata", "content_hash"]
_TOMBSTONE = 'content_hash == ""'
_LIVE = 'content_hash != ""'
_COPIED = ["doc_id", "chunk_index", "text", "source", "metadata", "dense"]  # a tombstone's fields
_COLLECTION_NOT_FOUND = 100
_NOT_LOADED = 101
_CONNECT_FAILED = 2
_RECONNECT_BACKOFF_S, _RECONNECT_BACKOFF_MAX_S = 0.25, 2.0  # between reconnect attempts, within timeout_s
# gRPC's default reconnect backoff grows to 120 s and its subchannels are shared by every channel of
# the process, so after a few refused connects a new client to a restarted server still failed fast
# for seconds (measured: ~2 s after a 1.5 s milvus-lite restart). A channel-local pool and a 1 s cap
# make a reconnect try the server again at once.
_GRPC_OPTIONS = {"grpc.use_local_subchannel_pool": 1, "grpc.initial_reconnect_backoff_ms": 100,
                 "grpc.min_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 1000}
# Codes Milvus uses for "your expression/parameter is wrong": Lite's IllegalArgument (6), the
# server's legacy IllegalArgument (5) and ParameterInvalid (1100).
_INPUT_ERROR_CODES = frozenset({5, 6, 1100})
_DELETE_BATCH = 256  # ids per delete expression, to keep expressions small
_SWITCH_READ_BATCH = 1024  # documents per live-rows read of a switch: each read (milvus-lite) copies every unsealed row
_QUERY_LIMIT = 16_384  # Milvus's largest query limit; beyond it, query_iterator
_VERIFY_PASSES = 3  # re-checks of a switched document before the write fails (module docstring)
_MIXED_READS = 3  # reads of one search while a document shows two generations (module docstring)


def physical_name(prefix: str, owner: str, name: str) -> str:
    """The Milvus collection behind (owner, name): readable slug + digest, valid for Milvus."""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", name)[:48]
    digest = hashlib.sha256(f"{owner}/{name}".encode()).hexdigest()[:12]
    return f"{prefix}{slug}_{digest}"


class MilvusStore:
    """Chunk storage and search on Milvus; implements ``retrieval.types.ChunkStore``."""

    _lite_users: dict[str, int] = {}
    _lite_lock = threading.Lock()

    def __init__(self, config: MilvusConfig | None = None, *, rrf_k: int = 60, hybrid_candidates: int = 4):
        """Connect to Milvus.

        Args:
            config: URI, token, consistency level, index parameters.
            rrf_k: RRF constant for hybrid search.
            hybrid_candidates: Each hybrid leg fetches ``top_k * hybrid_candidates`` hits.
        """
        self.config = config or MilvusConfig()
        self._rrf_k, self._candidates = rrf_k, hybrid_candidates
        lite = self.config.uri.endswith(".db")
        if lite:  # pymilvus refuses a .db file in a missing folder
            Path(self.config.uri).parent.mkdir(parents=True, exist_ok=True)
            milvus_lite_patches.apply()  # Milvus Lite runs in this process: vectorised BM25 scoring
        token = self.config.token.get_secret_value() if self.config.token else ""
        self._client = _ReloadingClient(lambda: MilvusClient(
            uri=self.config.uri, token=token, db_name=self.config.db_name, timeout=self.config.timeout_s,
            grpc_options=_GRPC_OPTIONS,
        ), self.config.timeout_s)
        self._lite_path = self._count_lite_user(self.config.uri) if lite else None
        self.registry = CollectionRegistry(self._client, self.config)
        self.locks = DocumentLocks(self._client, f"{self.config.collection_prefix}doclocks")
        self._loaded: set[str] = set()

    @classmethod
    def _count_lite_user(cls, uri: str) -> str:
        path = os.path.abspath(uri)  # the key milvus-lite's server manager uses
        with cls._lite_lock:
            cls._lite_users[path] = cls._lite_users.get(path, 0) + 1
        return path

    def close(self) -> None:
        """Close the connection; for a Lite file, stop its in-process server when no store uses it.

        Stopping the server releases the file lock, so another process (a Serve replica) can open
        the same ``.db`` after, e.g., ``ragtune up`` has ingested the sample knowledge base.
        """
        self._client.close()
        if self._lite_path is None:
            return
        with self._lite_lock:
            self._lite_users[self._lite_path] -= 1
            last = self._lite_users[self._lite_path] == 0
        if last:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self._lite_path)
        self._lite_path = None

    def ping(self, timeout_s: float = 5.0) -> None:
        """Raise if the store does not answer within ``timeout_s`` (for health checks)."""
        self._client.list_collections(timeout=timeout_s)

    def _load(self, physical: str) -> None:
        # A reopened collection is 'released' until loaded; loading is idempotent, so once per process.
        if physical not in self._loaded:
            self._client.load_collection(physical)
            self._loaded.add(physical)

    # ---- collections ------------------------------------------------------------------------

    def resolve(self, name: str, tenant: str, *, write: bool = False) -> CollectionInfo:
        """The collection ``name`` as seen by ``tenant``: its own, else a public one (read only).

        Raises:
            NotFoundError: No such collection visible to the tenant.
            InvalidRequestError: ``write`` to another tenant's public collection, or a bad name.
        """
        check_collection_name(name)
        check_tenant(tenant)
        info = pick_collection(self.registry.visible(name, tenant), name, tenant, write=write)
        self._load(info.physical)
        return info

    def ensure_collection(
        self, name: str, tenant: str, *, dim: int, model: str, public: bool | None = None
    ) -> CollectionInfo:
        """Return ``tenant``'s collection ``name``, creating it (private unless ``public``) if needed.

        Args:
            name: Logical collection name.
            tenant: The owner.
            dim: Embedding dimension of the vectors that will be written.
            model: Embedding model name; must match the one the collection was built with.
            public: Set the public flag (None keeps the current one; new collections are private).

        Raises:
            InvalidRequestError: A public collection of this name belongs to another tenant, or the
                collection was built with a different embedding model.
        """
        check_collection_name(name)
        check_tenant(tenant)
        own = own_collection(self.registry.rows(eq("name", name)), name, tenant, public=public)
        if own is None:
            physical = physical_name(self.config.collection_prefix, tenant, name)
            own = CollectionInfo(name, tenant, bool(public), physical, model, dim)
            self._create_chunks_collection(physical, dim)
            self.registry.put(own)
            logger.info("created collection %s for tenant %s (%s)", name, tenant, physical)
        check_model(own, model, dim)
        if public is not None and public != own.public:
            own = replace(own, public=public)
            self.registry.put(own)
        self._load(own.physical)
        return own

    def list_collections(self, tenant: str) -> list[CollectionInfo]:
        """Collections ``tenant`` owns, plus public ones, sorted by name."""
        check_tenant(tenant)
        rows = self.registry.rows(f"{eq('owner', tenant)} or public == true")
        return sorted(rows, key=lambda r: (r.name, r.owner != tenant))

    def drop_collection(self, name: str, tenant: str) -> None:
        """Drop ``tenant``'s own collection ``name`` and its registry row."""
        info = self.resolve(name, tenant, write=True)
        self._client.drop_collection(info.physical)
        self.registry.remove(info)
        self._loaded.discard(info.physical)
        logger.info("dropped collection %s of tenant %s", name, tenant)

    def _create_chunks_collection(self, physical: str, dim: int) -> None:
        if self._client.has_collection(physical):
            return  # left by a crash between create and register: reuse it
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=2 * MAX_DOC_ID_BYTES)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_DOC_ID_BYTES)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_CHUNK_TEXT_BYTES, enable_analyzer=True)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("tenant", DataType.VARCHAR, max_length=256)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(name="text_bm25", function_type=FunctionType.BM25,
                     input_field_names=["text"], output_field_names=["sparse"])
        )
        index = self._client.prepare_index_params()
        index.add_index("dense", index_type="HNSW", metric_type="COSINE",
                        params={"M": self.config.hnsw_m, "efConstruction": self.config.hnsw_ef_construction})
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        create_collection(self._client, physical, schema, index, self.config.consistency_level)

    # ---- chunks -----------------------------------------------------------------------------

    def document_hashes(self, info: CollectionInfo) -> dict[str, str]:
        """``doc_id → content_hash`` of every stored document; ``""`` if its chunks disagree.

        Disagreeing hashes mean an update was interrupted between writing the new chunks and
        deleting the old ones; ``""`` never equals a real hash, so the next ingest rewrites it.
        """
        hashes: dict[str, str] = {}
        fields, level = ["doc_id", "content_hash"], self.config.consistency_level
        rows = self._client.query(info.physical, filter=_LIVE, output_fields=fields,
                                  limit=_QUERY_LIMIT, consistency_level=level)
        if len(rows) == _QUERY_LIMIT:
            rows = self._iterate(info, _LIVE, fields, level)
        for row in rows:
            known = hashes.setdefault(row["doc_id"], row["content_hash"])
            if known != row["content_hash"]:
                hashes[row["doc_id"]] = ""
        return hashes

    def row_count(self, info: CollectionInfo) -> int:
        """Rows in the collection's physical store, all tenants (Milvus's approximate ``row_count``: it
        can count rows written but not yet flushed or compacted away); sizes the ingest's writes."""
        return int(self._client.get_collection_stats(info.physical).get("row_count", 0))

    def document_rows(self, info: CollectionInfo, doc_ids: Sequence[str], fields: Sequence[str] = _OUTPUT_FIELDS
                      ) -> list[dict]:
        """The live rows (chunks) of ``doc_ids``, read as :meth:`search` reads: again while one document
        shows two versions (a read racing a flush, module docstring), at most ``_MIXED_READS`` times."""
        fields = sorted({*fields, "doc_id", "content_hash"})
        for _ in range(_MIXED_READS):
            rows = self._live_rows(info, sorted(set(doc_ids)), fields)
            if not _mixed(rows):
                break
        return rows

    def replace_documents(self, info: CollectionInfo, records: Sequence[ChunkRecord]) -> None:
        """Make each document named in ``records`` consist of exactly its records, switched in one write.

        Under the documents' locks: read the live rows of those documents, upsert the new rows plus
        a tombstone over every other live row in one request, delete the tombstones, then read the
        documents again and hide any older row the first read missed (a read racing a flush; see
        the module docstring).

        Raises:
            RagtuneError: Rows of an older generation were still live after every re-check.
        """
        docs = sorted({r.doc_id for r in records})
        if not docs:
            return
        with self.locks.hold(info.physical, docs):
            self._switch(info, docs, records)

    def _switch(self, info: CollectionInfo, docs: list[str], records: Sequence[ChunkRecord]) -> None:
        """The critical section of :meth:`replace_documents` (the caller holds ``docs``' locks)."""
        new_ids = {r.id for r in records}
        old = [row for row in self._live_rows(info, docs, batch=_SWITCH_READ_BATCH) if str(row["id"]) not in new_ids]
        self._client.upsert(info.physical, [_row(info, r) for r in records] + [_tombstone(info, o) for o in old])
        # Only documents that had old rows got tombstones: a new document's switch is the upsert
        # alone (a filtered delete scans the collection; measured ~0.1 s a group at 4k rows).
        self._delete_batched(info, sorted({str(o["doc_id"]) for o in old}), _TOMBSTONE)
        for _ in range(_VERIFY_PASSES):
            # The check costs one filtered id-only query; the write path runs on the ingest writer
            # thread, overlapped with encoding, so it does not touch search latency.
            stale_ids = [str(row["id"]) for row in self._live_rows(info, docs, ["doc_id"], batch=_SWITCH_READ_BATCH)
                         if str(row["id"]) not in new_ids]
            if not stale_ids:
                return
            fetched = self._client.get(info.physical, ids=stale_ids, output_fields=[*_COPIED, "content_hash"])
            stale = [row for row in fetched if row["content_hash"]]
            if not stale:  # the re-check itself raced a flush and saw deleted rows (case (a)): check again
                logger.info("collection %s: a re-check saw %d deleted rows as live", info.name, len(stale_ids))
                continue
            logger.warning("collection %s: %d rows of an older document version were still live after a switch "
                           "(the first read raced a flush); hiding them", info.name, len(stale))
            self._client.upsert(info.physical, [_tombstone(info, o) for o in stale])
            self._delete_batched(info, sorted({str(o["doc_id"]) for o in stale}), _TOMBSTONE)
        raise RagtuneError(f"collection {info.name!r}: rows of an older document version stayed live after "
                           f"{_VERIFY_PASSES} checks")

    def delete_documents(self, info: CollectionInfo, doc_ids: Sequence[str]) -> None:
        """Delete every chunk of the given documents (each document in one delete request, under its lock)."""
        ids = sorted(set(doc_ids))
        for start in range(0, len(ids), _DELETE_BATCH):
            batch = ids[start:start + _DELETE_BATCH]
            with self.locks.hold(info.physical, batch):
                self._client.delete(info.physical, filter=in_list("doc_id", batch))

    def sweep(self, info: CollectionInfo) -> None:
        """Delete tombstones and lock rows a crashed writer left (tombstones are invisible either way).

        Tombstones are deleted under their documents' locks: a delete by filter is "query the ids,
        then delete them", and an id can come back live in between (a document switched back to a
        version it had, e.g. A → B → A, reuses the ids), which an unlocked delete would then remove.
        """
        self.locks.sweep(info.physical)
        # A read first: the usual answer is "none", and a no-op ingest must not write.
        rows = self._client.query(info.physical, filter=_TOMBSTONE, output_fields=["doc_id"], limit=_QUERY_LIMIT,
                                  consistency_level="Strong")
        if len(rows) == _QUERY_LIMIT:
            rows = self._iterate(info, _TOMBSTONE, ["doc_id"], "Strong")
        docs = sorted({str(row["doc_id"]) for row in rows})
        for start in range(0, len(docs), _DELETE_BATCH):
            batch = docs[start:start + _DELETE_BATCH]
            with self.locks.hold(info.physical, batch):
                self._delete_batched(info, batch, _TOMBSTONE)

    def _live_rows(self, info: CollectionInfo, docs: Sequence[str], fields: list[str] = _COPIED,
                   batch: int = _DELETE_BATCH) -> list[dict]:
        found: list[dict] = []
        for start in range(0, len(docs), batch):
            expr = f"{in_list('doc_id', docs[start:start + batch])} and {_LIVE}"
            # Strong: a lagging read here would leave old chunks live (milvus-lite ignores the level;
            # its reads racing a flush are handled by _switch's re-check).
            rows = self._client.query(info.physical, filter=expr, output_fields=fields, limit=_QUERY_LIMIT,
                                      consistency_level="Strong")
            if len(rows) == _QUERY_LIMIT:  # rare (huge documents): page through them all
                rows = self._iterate(info, expr, fields, "Strong")
            found.extend(rows)
        return found

    def _iterate(self, info: CollectionInfo, expr: str, fields: list[str], consistency: str) -> list[dict]:
        out: list[dict] = []
        iterator = self._client.query_iterator(info.physical, batch_size=4096, filter=expr, output_fields=fields,
                                               consistency_level=consistency)
        try:
            while batch := iterator.next():
                out.extend(batch)
        finally:
            iterator.close()
        return out

    def _delete_batched(self, info: CollectionInfo, docs: Sequence[str], extra: str) -> None:
        for start in range(0, len(docs), _DELETE_BATCH):
            self._client.delete(info.physical, filter=f"{in_list('doc_id', docs[start:start + _DELETE_BATCH])} and {extra}")

    def flush(self, info: CollectionInfo) -> None:
        """Seal written rows (unless ``flush_after_write`` is off); unflushed rows slow Milvus Lite searches."""
        if self.config.flush_after_write:
            self._client.flush(info.physical)

    # ---- search -----------------------------------------------------------------------------

    def search(
        self,
        info: CollectionInfo,
        *,
        vector: Sequence[float],
        query: str,
        top_k: int,
        filter: str | None,
        mode: Mode,
    ) -> list[Chunk]:
        """Top ``top_k`` chunks of ``info`` for a query, dense or hybrid (dense + BM25, RRF).

        Raises:
            InvalidRequestError: The client filter is outside ``retrieval.filters``' grammar, or Milvus
                refused it (the message carries its reason).
            NotFoundError: The collection disappeared (dropped by another process).
        """
        return self.search_many(info, vectors=[vector], queries=[query], top_k=top_k, filter=filter, mode=mode)[0]

    def search_many(
        self,
        info: CollectionInfo,
        *,
        vectors: Sequence[Sequence[float]],
        queries: Sequence[str],
        top_k: int,
        filter: str | None,
        mode: Mode,
    ) -> list[list[Chunk]]:
        """:meth:`search` for several queries sharing one collection, filter, ``top_k`` and mode: one
        Milvus request with ``nq = len(queries)`` (a dense nq=16 search measured ~20 ms against
        ~9 ms for nq=1 on Milvus Lite, 10k chunks); answers in query order.

        Raises:
            ValueError: ``vectors`` and ``queries`` differ in length.
            InvalidRequestError / NotFoundError: as :meth:`search`.
        """
        if len(vectors) != len(queries):
            raise ValueError(f"search_many: {len(vectors)} vectors for {len(queries)} queries")
        if not queries:
            return []
        expr = combine_filters(eq("tenant", info.owner), filter)
        data = [list(v) for v in vectors]
        for attempt in range(1, _MIXED_READS + 1):
            try:
                results = self._dense(info, data, expr, top_k) if mode == "dense" else self._hybrid(
                    info, data, list(queries), expr, top_k)
            except MilvusException as exc:
                raise self._search_error(info, exc, bool(filter and filter.strip())) from exc
            # Two versions of one document in an answer can only be a read that raced a flush
            # (module docstring): read again. The check is a dict pass over the hits.
            if not _mixed(hit["entity"] for hits in results for hit in hits):
                break
            logger.warning("search in collection %s raced a flush (a document showed two versions, read %d of %d)",
                           info.name, attempt, _MIXED_READS)
        if len(results) != len(queries):
            raise RagtuneError(f"vector search in collection {info.name!r} returned {len(results)} result lists "
                               f"for {len(queries)} queries")
        # Tombstones rank where the row they hide did; they are never answers.
        return [[_to_chunk(hit) for hit in hits if hit["entity"].get("content_hash")] for hits in results]

    def _dense(self, info: CollectionInfo, data: list[list[float]], expr: str, top_k: int) -> list[list[Any]]:
        result = self._client.search(
            info.physical, data=data, anns_field="dense", filter=expr, limit=top_k,
            output_fields=_OUTPUT_FIELDS, consistency_level=self.config.consistency_level,
            search_params={"metric_type": "COSINE", "params": {"ef": max(self.config.search_ef, top_k)}},
        )
        return [list(hits) for hits in result]

    def _hybrid(self, info: CollectionInfo, data: list[list[float]], queries: list[str], expr: str,
                top_k: int) -> list[list[Any]]:
        limit = top_k * self._candidates
        legs = [
            AnnSearchRequest(data=data, anns_field="dense", limit=limit, expr=expr,
                             param={"metric_type": "COSINE", "params": {"ef": max(self.config.search_ef, limit)}}),
            AnnSearchRequest(data=queries, anns_field="sparse", limit=limit, expr=expr, param={"metric_type": "BM25"}),
        ]
        result = self._client.hybrid_search(
            info.physical, legs, RRFRanker(self._rrf_k), limit=top_k, output_fields=_OUTPUT_FIELDS,
            consistency_level=self.config.consistency_level,
        )
        return [list(hits) for hits in result]

    def _search_error(self, info: CollectionInfo, exc: MilvusException, client_filter: bool) -> RagtuneError:
        if exc.code == _COLLECTION_NOT_FOUND:
            self._loaded.discard(info.physical)
            self.registry.invalidate(info.name)
            return NotFoundError(f"collection {info.name!r} not found", param="collection")
        if client_filter and _is_input_error(exc):
            # Milvus echoes the whole expression: do not reveal a public collection's owner.
            reason = (exc.message or "").replace(quote(info.owner), '"<tenant>"')
            return InvalidRequestError(f"invalid filter: {reason}", param="filter")
        logger.error("search failed in collection %s (%s): code %s", info.name, info.physical, exc.code)
        return RagtuneError(f"vector search failed in collection {info.name!r}")


class _ReloadingClient:
    """A MilvusClient that survives a server restart.

    * "not loaded" (code 101): a restarted server (milvus-lite after a crash, a Milvus node after a
      release) has every indexed collection released; load it again and retry once.
    * "connect failed" (code 2): the server is down or restarting (the milvus-lite supervisor
      restarts it in ~1.5 s). Drop the client, build a fresh one and retry, with backoff (0.25 s
      doubling to 2 s), until the call's ``timeout`` (else ``milvus.timeout_s``) has passed; then
      the error is raised. A write retried this way is safe: every write here is an upsert or a
      delete by id/filter, idempotent by construction.
    """

    _READS = frozenset({"search", "hybrid_search", "query", "query_iterator", "delete", "get"})

    def __init__(self, factory: Any, timeout_s: float = 30.0):
        self._factory, self._timeout_s = factory, timeout_s
        self._client = factory()

    def _reconnect(self) -> None:
        try:
            fresh = self._factory()
        except MilvusException as exc:
            if exc.code != _CONNECT_FAILED:
                raise
            return  # still down: keep the old client, the next attempt builds again
        old, self._client = self._client, fresh
        try:
            old.close()
        except Exception:  # noqa: BLE001 - a broken client may fail to close; it is dropped either way
            logger.debug("closing the broken milvus client failed", exc_info=True)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name == "close":
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + float(kwargs.get("timeout") or self._timeout_s)
            backoff, load, loaded = _RECONNECT_BACKOFF_S, False, False
            while True:
                try:
                    if load:
                        self._client.load_collection(args[0])
                        load, loaded = False, True
                    return getattr(self._client, name)(*args, **kwargs)
                except MilvusException as exc:
                    if exc.code == _CONNECT_FAILED and time.monotonic() + backoff < deadline:
                        logger.warning("milvus unavailable (restarting?); reconnecting in %.2fs", backoff)
                        time.sleep(backoff)
                        backoff = min(2 * backoff, _RECONNECT_BACKOFF_MAX_S)
                        self._reconnect()
                    elif exc.code == _NOT_LOADED and name in self._READS and args and not loaded:
                        logger.warning("collection %s was released (server restarted?); loading it again", args[0])
                        load = True
                    else:
                        raise

        return call


def _is_input_error(exc: MilvusException) -> bool:
    message = (exc.message or "").lower()
    return (
        isinstance(exc, ParamError)
        or exc.is_input_error
        or exc.code in _INPUT_ERROR_CODES
        or any(word in message for word in ("expr", "parse", "query plan", "field"))
    )


def _mixed(entities: Any) -> bool:
    """True if the rows (or search hits' entities) hold two versions (content hashes) of one document."""
    seen: dict[str, str] = {}
    for entity in entities:
        digest = entity.get("content_hash")
        if digest and seen.setdefault(entity["doc_id"], digest) != digest:
            return True
    return False


def _row(info: CollectionInfo, r: ChunkRecord) -> dict[str, Any]:
    return {
        "id": r.id, "doc_id": r.doc_id, "chunk_index": r.chunk_index, "text": r.text, "source": r.source,
        "tenant": info.owner, "metadata": dict(r.metadata), "content_hash": r.content_hash, "dense": list(r.vector),
    }


def _tombstone(info: CollectionInfo, old: dict) -> dict[str, Any]:
    # The old row with its hash blanked (see the module docstring for why a verbatim copy).
    row = {field: old[field] for field in _COPIED}
    return {**row, "id": str(old["id"]), "tenant": info.owner, "content_hash": "", "dense": list(row["dense"])}


def _to_chunk(hit: Any) -> Chunk:
    entity = hit["entity"]
    return Chunk(
        id=str(hit["id"]),
        document=entity["doc_id"],
        source=entity["source"],
        score=float(hit["distance"]),
        text=entity["text"],
        chunk_index=int(entity["chunk_index"]),
        metadata=dict(entity.get("metadata") or {}),
    )
