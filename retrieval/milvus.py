"""The Milvus store: one collection per knowledge base, plus a small registry collection.

The same code runs against a Milvus Lite file (``./data/milvus.db``), a milvus-lite server
(``http://127.0.0.1:P``) and a production Milvus (URI + token).

**Chunk collections** have an explicit schema (no dynamic fields): ``id`` (primary key,
``doc_id#chunk_index``), ``doc_id``, ``chunk_index``, ``text`` (analyzer on), ``source``,
``tenant``, ``metadata`` (JSON), ``content_hash``, ``dense`` (HNSW, COSINE) and ``sparse``
(filled from ``text`` by a BM25 ``Function``), so dense and hybrid (dense + BM25, RRF) search
both work.

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
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, MilvusClient, RRFRanker
from pymilvus.exceptions import MilvusException, ParamError

from cluster.errors import InvalidRequestError, NotFoundError, RagtuneError
from retrieval.config import MilvusConfig
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

_OUTPUT_FIELDS = ["doc_id", "chunk_index", "text", "source", "metadata"]
_COLLECTION_NOT_FOUND = 100
# Codes Milvus uses for "your expression/parameter is wrong": Lite's IllegalArgument (6), the
# server's legacy IllegalArgument (5) and ParameterInvalid (1100).
_INPUT_ERROR_CODES = frozenset({5, 6, 1100})
_DELETE_BATCH = 256  # ids per delete expression, to keep expressions small


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
        token = self.config.token.get_secret_value() if self.config.token else ""
        self._client = MilvusClient(
            uri=self.config.uri, token=token, db_name=self.config.db_name, timeout=self.config.timeout_s
        )
        self._lite_path = self._count_lite_user(self.config.uri) if lite else None
        self.registry = CollectionRegistry(self._client, self.config)
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
        iterator = self._client.query_iterator(
            info.physical, batch_size=4096, filter="chunk_index >= 0",
            output_fields=["doc_id", "content_hash"], consistency_level=self.config.consistency_level,
        )
        try:
            while batch := iterator.next():
                for row in batch:
                    known = hashes.setdefault(row["doc_id"], row["content_hash"])
                    if known != row["content_hash"]:
                        hashes[row["doc_id"]] = ""
        finally:
            iterator.close()
        return hashes

    def upsert_chunks(self, info: CollectionInfo, records: Sequence[ChunkRecord]) -> None:
        """Write chunk rows (same id → replaced)."""
        rows = [
            {
                "id": r.id, "doc_id": r.doc_id, "chunk_index": r.chunk_index, "text": r.text,
                "source": r.source, "tenant": info.owner, "metadata": dict(r.metadata),
                "content_hash": r.content_hash, "dense": list(r.vector),
            }
            for r in records
        ]
        if rows:
            self._client.upsert(info.physical, rows)

    def delete_stale_chunks(self, info: CollectionInfo, keep: Mapping[str, str]) -> None:
        """For each ``doc_id → hash`` in ``keep``, delete that document's chunks of any other hash."""
        items = list(keep.items())
        for start in range(0, len(items), _DELETE_BATCH):
            expr = " or ".join(
                f"({eq('doc_id', doc)} and content_hash != {quote(h)})" for doc, h in items[start:start + _DELETE_BATCH]
            )
            self._client.delete(info.physical, filter=expr)

    def delete_documents(self, info: CollectionInfo, doc_ids: Sequence[str]) -> None:
        """Delete every chunk of the given documents."""
        ids = list(doc_ids)
        for start in range(0, len(ids), _DELETE_BATCH):
            self._client.delete(info.physical, filter=in_list("doc_id", ids[start:start + _DELETE_BATCH]))

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
        expr = combine_filters(eq("tenant", info.owner), filter)
        try:
            hits = self._dense(info, vector, expr, top_k) if mode == "dense" else self._hybrid(
                info, vector, query, expr, top_k)
        except MilvusException as exc:
            raise self._search_error(info, exc, bool(filter and filter.strip())) from exc
        return [_to_chunk(hit) for hit in hits]

    def _dense(self, info: CollectionInfo, vector: Sequence[float], expr: str, top_k: int) -> list[Any]:
        result = self._client.search(
            info.physical, data=[list(vector)], anns_field="dense", filter=expr, limit=top_k,
            output_fields=_OUTPUT_FIELDS, consistency_level=self.config.consistency_level,
            search_params={"metric_type": "COSINE", "params": {"ef": max(self.config.search_ef, top_k)}},
        )
        return list(result[0])

    def _hybrid(self, info: CollectionInfo, vector: Sequence[float], query: str, expr: str, top_k: int) -> list[Any]:
        limit = top_k * self._candidates
        legs = [
            AnnSearchRequest(data=[list(vector)], anns_field="dense", limit=limit, expr=expr,
                             param={"metric_type": "COSINE", "params": {"ef": max(self.config.search_ef, limit)}}),
            AnnSearchRequest(data=[query], anns_field="sparse", limit=limit, expr=expr, param={"metric_type": "BM25"}),
        ]
        result = self._client.hybrid_search(
            info.physical, legs, RRFRanker(self._rrf_k), limit=top_k, output_fields=_OUTPUT_FIELDS,
            consistency_level=self.config.consistency_level,
        )
        return list(result[0])

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


def _is_input_error(exc: MilvusException) -> bool:
    message = (exc.message or "").lower()
    return (
        isinstance(exc, ParamError)
        or exc.is_input_error
        or exc.code in _INPUT_ERROR_CODES
        or any(word in message for word in ("expr", "parse", "query plan", "field"))
    )


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
