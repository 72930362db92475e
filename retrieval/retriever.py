"""The retriever: a plain class the serving layer turns into a deployment.

Holds an embedder and a store (both injectable), searches with the tenant's scope, and exposes
document upserts/deletes for the live-update endpoints.

**Batched retrieval.** Concurrent ``retrieve`` calls are collected (``retrieval.batching``: the
queries that arrive while a batch runs go together in the next; a lone query does not wait for
company) into one batch: one embedder call for every query of the batch, then one store search
per group of queries that share collection, tenant scope, filter, ``top_k`` and mode (``ChunkStore.search_many``: one Milvus request with several query vectors),
the groups concurrently. A query never shares a search with a query of another filter or scope,
so batching changes no answer. A group whose shared search fails is retried one query at a time,
so a query that breaks the search fails alone. Profiled on Milvus Lite, 10k chunks, 16 clients
(loadtests/results/2026-12-01-d2-retrieve.md): one search per query was most of the time (6 worker
threads of ~40 ms searches contending for 2 cores), while a dense nq=16 search costs ~20 ms.

Blocking work (model, Milvus client) runs in worker threads so the event loop keeps collecting
the next batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.errors import InvalidRequestError, NotFoundError
from retrieval.batching import MicroBatcher
from retrieval.chunking import Chunker
from retrieval.config import RetrievalConfig
from retrieval.filters import client_filter
from retrieval.ingest import Ingestor, IngestSummary
from retrieval.loaders import document_from_dict
from retrieval.tenancy import check_manage
from retrieval.types import Chunk, ChunkStore, CollectionInfo, Document, EmbedderLike, ItemError, Mode

__all__ = ["Retriever"]

logger = logging.getLogger(__name__)

_MODES = ("dense", "hybrid")
MAX_QUERY_CHARS = 8192


@dataclass(frozen=True)
class _Query:
    """One checked, resolved retrieve request waiting in the batch."""

    text: str
    collection: str
    tenant: str
    top_k: int  # what the store returns (the reranker's candidate count when reranking)
    filter: str | None
    mode: Mode


class Retriever:
    """Retrieval for one process: batched query embedding, tenant-scoped search, document updates."""

    def __init__(
        self,
        config: RetrievalConfig | None = None,
        *,
        embedder: EmbedderLike | None = None,
        store: ChunkStore | None = None,
    ):
        """Build the retriever; the embedder and store default to the production ones from ``config``.

        Args:
            config: Retrieval config (defaults: packaged MiniLM, Milvus Lite file under ./data).
            embedder: Anything with ``model_name``, ``dim`` and ``encode(texts)``.
            store: Anything implementing ``retrieval.types.ChunkStore``.
        """
        self.config = config or RetrievalConfig()
        if embedder is None:
            from retrieval.embedder import Embedder

            embedder = Embedder(self.config.embedder)
        if store is None:
            from retrieval.milvus import MilvusStore

            search = self.config.search
            store = MilvusStore(self.config.milvus, rrf_k=search.rrf_k, hybrid_candidates=search.hybrid_candidates)
        self.embedder, self.store = embedder, store
        tokenizer = getattr(embedder, "tokenizer", None) if self.config.chunking.unit == "token" else None
        self.ingestor = Ingestor(store, embedder, Chunker(self.config.chunking, tokenizer), self.config.ingest)
        self._embed_one = MicroBatcher(
            self._embed_batch, self.config.search.batch_max_size, self.config.search.batch_wait_timeout_s
        )
        # Queries get the embedder's query prompt (e5/bge/nomic); /v1/embeddings inputs the document one.
        self._search_one = MicroBatcher(
            self._search_batch, self.config.search.batch_max_size, self.config.search.batch_wait_timeout_s
        )
        self.reranker = None
        if self.config.rerank.model:
            from retrieval.rerank import Reranker

            self.reranker = Reranker(self.config.rerank)

    def close(self) -> None:
        """Release the store's connection (and, for Milvus Lite, its file lock)."""
        self.ingestor.close()

    async def check_health(self) -> None:
        """Ray Serve calls this periodically (and ``/health`` through the handle): raise if the store
        does not answer, so an unreachable store shows as an unhealthy replica instead of failed queries.
        """
        ping = getattr(self.store, "ping", None)
        if ping is not None:
            await asyncio.to_thread(ping)

    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        # One model call for every query of the batch.
        return await asyncio.to_thread(self.embedder.encode, texts)

    async def _search_batch(self, batch: list[_Query]) -> list[list[Chunk] | Exception]:
        """Resolve the batch's collections and embed it in one worker-thread hop, then one store search
        per group, the groups concurrently.

        The collection lookup is here, not in ``retrieve``: a thread hop per query before the batcher
        spread 16 clients' arrivals over several ms, the batch window cut them into two alternating
        cohorts of ~8, and each query waited for the other cohort's batch (compare harness, 10k chunks).

        Returns each query's chunks, or the exception its lookup or search raised (the batcher delivers
        results, and one group's bad filter or unknown collection must not fail the other queries).
        """
        infos, vectors = await asyncio.to_thread(self._resolve_and_embed, batch)
        results: list[list[Chunk] | Exception] = [info if isinstance(info, Exception) else [] for info in infos]
        groups: dict[tuple, list[int]] = {}
        for index, (query, info) in enumerate(zip(batch, infos, strict=True)):
            if not isinstance(info, Exception):
                groups.setdefault((info, query.filter, query.top_k, query.mode), []).append(index)
        answers = await asyncio.gather(*(
            asyncio.to_thread(self._search_group, [batch[i] for i in members], group[0], [vectors[i] for i in members])
            for group, members in groups.items()
        ))
        for members, answer in zip(groups.values(), answers, strict=True):
            for index, result in zip(members, answer, strict=True):
                results[index] = result
        return results

    def _resolve_and_embed(self, batch: list[_Query]) -> tuple[list[CollectionInfo | Exception], dict[int, list[float]]]:
        """Worker thread: each distinct (collection, tenant) looked up once, then one embedder call for the
        queries whose collection resolved (an unknown collection costs no embedding)."""
        seen: dict[tuple[str, str], CollectionInfo | Exception] = {}
        for query in batch:
            key = (query.collection, query.tenant)
            if key not in seen:
                try:
                    seen[key] = self.store.resolve(*key)
                except Exception as exc:  # noqa: BLE001 - handed to those queries' callers, raised there
                    seen[key] = exc
        infos = [seen[(q.collection, q.tenant)] for q in batch]
        live = [i for i, info in enumerate(infos) if not isinstance(info, Exception)]
        if not live:
            return infos, {}
        encode = getattr(self.embedder, "encode_queries", self.embedder.encode)
        vectors = encode([batch[i].text for i in live])
        if len(vectors) != len(live):
            raise RuntimeError(f"embedder returned {len(vectors)} vectors for {len(live)} queries")
        return infos, dict(zip(live, vectors, strict=True))

    def _search_group(self, queries: list[_Query], info: CollectionInfo,
                      vectors: list[list[float]]) -> list[list[Chunk] | Exception]:
        """Search queries of one group (worker thread): one ``search_many`` call, else one by one."""
        first = queries[0]
        search_many = getattr(self.store, "search_many", None)
        if search_many is not None and len(queries) > 1:
            try:
                return search_many(info, vectors=vectors, queries=[q.text for q in queries],
                                   top_k=first.top_k, filter=first.filter, mode=first.mode)
            except Exception:  # noqa: BLE001 - retried one by one below, so each query gets its own outcome
                logger.debug("shared search of %d queries failed; retrying one by one", len(queries), exc_info=True)
        results: list[list[Chunk] | Exception] = []
        for query, vector in zip(queries, vectors, strict=True):
            try:
                results.append(self.store.search(info, vector=vector, query=query.text, top_k=query.top_k,
                                                 filter=query.filter, mode=query.mode))
            except Exception as exc:  # noqa: BLE001 - handed to that query's caller, raised there
                results.append(exc)
        return results

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed texts (for ``/v1/embeddings``), batched with concurrent queries.

        Raises:
            InvalidRequestError: ``texts`` is not a list of strings.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("input must be a list of strings", param="input")
        self._check_embedding_inputs(texts)
        return list(await asyncio.gather(*(self._embed_one(text) for text in texts)))

    def _check_embedding_inputs(self, texts: Sequence[str]) -> None:
        limits = self.config.requests
        if len(texts) > limits.max_embedding_inputs:
            raise InvalidRequestError(f"input has {len(texts)} items; this server's limit is "
                                      f"{limits.max_embedding_inputs} per /v1/embeddings call", param="input")
        for index, text in enumerate(texts):
            if len(text) > limits.max_embedding_input_chars:
                raise InvalidRequestError(f"input[{index}] has {len(text)} characters; this server's limit is "
                                          f"{limits.max_embedding_input_chars} per input", param="input")

    async def retrieve(
        self,
        query: str,
        collection: str,
        tenant: str,
        top_k: int | None = None,
        filter: str | None = None,
        mode: Mode | None = None,
    ) -> list[Chunk]:
        """The ``top_k`` chunks of ``collection`` most relevant to ``query``, best first.

        Args:
            query: The question (never logged).
            collection: Logical collection name: the tenant's own, or a public one.
            tenant: The caller's tenant (from auth).
            top_k: Number of chunks (default ``search.default_top_k``, at most ``search.max_top_k``).
            filter: Optional filter in the grammar of ``retrieval.filters`` (e.g.
                ``metadata["lang"] == "en" and chunk_index < 3``), ANDed with the tenant scope.
            mode: "dense", or "hybrid" (dense + BM25 fused with RRF); default ``search.default_mode``.

        Raises:
            NotFoundError: Unknown collection, or another tenant's private one.
            InvalidRequestError: Bad query, top_k, mode or filter (naming the token and its column).
        """
        top_k, mode = self._check_request(query, top_k, mode)
        client_filter(filter)  # a bad filter is a 400 before the lookup and the embedding (the store re-checks)
        fetch = self.reranker.candidates(top_k) if self.reranker else top_k
        # The collection lookup (NotFoundError for an unknown or foreign one) runs in the batch, per batch.
        chunks = await self._search_one(_Query(query, collection, tenant, fetch, filter, mode))
        if isinstance(chunks, Exception):
            raise chunks
        if self.reranker is not None:  # inside retrieve(), so its time is part of the retrieval latency
            chunks = await asyncio.to_thread(self.reranker.rerank, query, chunks, top_k)
        logger.debug("retrieve %s (tenant %s, %s, top_k %d): %d chunks", collection, tenant, mode, top_k, len(chunks))
        return chunks

    def _check_request(self, query: str, top_k: int | None, mode: str | None) -> tuple[int, Mode]:
        search = self.config.search
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query must be a non-empty string", param="query")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidRequestError(f"query longer than {MAX_QUERY_CHARS} characters", param="query")
        top_k = search.default_top_k if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= search.max_top_k:
            raise InvalidRequestError(f"top_k must be an integer in [1, {search.max_top_k}], got {top_k!r}",
                                      param="top_k")
        mode = search.default_mode if mode is None else mode
        if mode not in _MODES:
            raise InvalidRequestError(f"mode must be one of {list(_MODES)}, got {mode!r}", param="mode")
        return top_k, mode

    async def upsert_documents(
        self,
        collection: str,
        tenant: str,
        documents: Sequence[Document | Mapping[str, Any]],
        *,
        prune: bool = False,
        public: bool | None = None,
        admin: bool = False,
    ) -> IngestSummary:
        """Add or replace documents (``PUT /v1/collections/{c}/documents[/{doc_id}]``).

        Args:
            collection: Logical collection; created as the tenant's private collection if missing.
            tenant: The caller's tenant; must own the collection.
            documents: Documents, or JSON objects with ``id``, ``text``, optional ``source``/``metadata``.
            prune: Also delete stored documents that are not in ``documents``.
            public: Set the collection's public flag (None keeps it).
            admin: The caller holds an admin key: only admins publish and change public collections.

        Returns:
            The ingest summary; bad items are in ``errors`` and do not stop the others.

        Raises:
            InvalidRequestError: More than ``requests.max_documents_per_put`` documents.
            PermissionDeniedError: A non-admin publishes, or writes to a public collection.
        """
        limit = self.config.requests.max_documents_per_put
        if len(documents) > limit:
            raise InvalidRequestError(f"{len(documents)} documents in one request; this server's limit is {limit} "
                                      "per PUT", param="documents")
        await asyncio.to_thread(self._check_write, collection, tenant, public, admin)
        items = [self._as_item(doc, index) for index, doc in enumerate(documents)]
        return await asyncio.to_thread(
            self.ingestor.ingest, collection, tenant, items, prune=prune, public=public, progress=False
        )

    @staticmethod
    def _as_item(doc: Document | Mapping[str, Any], index: int) -> Document | ItemError:
        if isinstance(doc, Document):
            return doc
        try:
            return document_from_dict(doc, f"documents[{index}]")
        except ValueError as exc:
            doc_id = doc.get("id") if isinstance(doc, Mapping) and isinstance(doc.get("id"), str) else None
            return ItemError(f"documents[{index}]", str(exc), doc_id)

    def _check_write(self, collection: str, tenant: str, public: bool | None, admin: bool) -> None:
        """Public collections are an admin's (retrieval.tenancy.check_manage); checked before any work."""
        if admin:
            return
        try:
            own = self.store.resolve(collection, tenant, write=True)
        except NotFoundError:
            own = None  # created private by this write (or a 404 from the delete that follows)
        check_manage(own, public=public, admin=admin)

    async def delete_document(self, collection: str, tenant: str, doc_id: str, admin: bool = False) -> None:
        """Delete one document (``DELETE /v1/collections/{c}/documents/{doc_id}``).

        Raises:
            NotFoundError: No such collection for the tenant, or no such document in it.
            PermissionDeniedError: A non-admin deletes from a public collection.
        """
        await asyncio.to_thread(self._check_write, collection, tenant, None, admin)
        await asyncio.to_thread(self.ingestor.delete_document, collection, tenant, doc_id)

    async def delete_documents(self, collection: str, tenant: str, doc_ids: Sequence[str] | None = None,
                               admin: bool = False) -> int:
        """Delete the given documents, or all (``DELETE /v1/collections/{c}/documents``); returns the count."""
        await asyncio.to_thread(self._check_write, collection, tenant, None, admin)
        return await asyncio.to_thread(self.ingestor.delete_documents, collection, tenant, doc_ids)
