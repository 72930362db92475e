"""Incremental ingestion: chunk → embed → upsert, skipping what has not changed.

Each document's content hash (text, source, metadata, plus the chunking config and model name,
so a config change re-embeds) is stored on every chunk. On ingest:

* unchanged hash → skipped; new or changed → the version's chunks are written under ids of its
  generation (``doc#<hash[:12]>#i``) and switched in with one store write
  (``ChunkStore.replace_documents``: new rows plus tombstones over the old ones, writers of a
  document serialised by a lock held in the store), so a reader sees the old or the new version,
  never a mix and never a document without chunks; the ids depend only on the content, so an
  ingest interrupted anywhere re-runs to exactly the same rows;
* ``prune=True`` deletes stored documents absent from the input (ids that failed to load still
  count as present, so a parse error never deletes the previous version);
* bad items (empty, oversized, duplicate ids, invalid UTF-8, unparsable) become per-item errors
  in the summary and the rest continue.

Embedding is batched across documents (``ingest.batch_chunks``) so ingest runs close to the raw
encode rate of the model. Groups encode on ``ingest.encode_streams`` threads at once (on CPU one
torch thread each: a stream pre-empted by the store's work stalls alone, where one call on every
thread stalls whole; see ``Embedder.encoding_streams``), and the store writes run on a writer thread
while the next groups encode (the model's forward pass releases the GIL; Milvus calls wait on the
network). One writer thread
keeps the writes in input order, each one locked switch of its documents. A write carries at least
1024 rows (``_WRITE_ROWS``; the last one excepted), or an eighth of the rows this ingest has written
so far once that is more (up to 8192), and, while the previous write is still in flight, up to 4
times that: each write costs the store a few reads whose price grows with the collection, not with
the write (Milvus Lite 3.x walks every stored row in Python for any filtered query and copies every
unsealed one, vector included), so writes that grow with the collection keep the store's share of
the two cores, and the number of writes, near constant per doubling; the writer flushes every 8192
rows, as Milvus Lite reads unsealed rows slowly. The progress bar counts chunks as they are encoded
(the work), its postfix the chunks written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from cluster.errors import NotFoundError
from retrieval.chunking import Chunker
from retrieval.config import IngestConfig, RetrievalConfig
from retrieval.loaders import load_paths
from retrieval.types import (
    MAX_CHUNK_TEXT_BYTES,
    MAX_DOC_ID_BYTES,
    MAX_METADATA_BYTES,
    MAX_SOURCE_BYTES,
    ChunkRecord,
    ChunkStore,
    CollectionInfo,
    Document,
    EmbedderLike,
    ItemError,
    chunk_id,
)

__all__ = ["IngestSummary", "Ingestor", "content_hash", "validate_document"]

logger = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")

_GENERATION_CHARS = 12  # hex digits of the content hash in chunk ids: 48 bits tell versions apart
# Rows one store write carries at least (the last write excepted). Every write is one locked switch
# (lock rows, a read of the documents' live rows, the upsert, a re-check read); with Milvus Lite each
# read copies all unsealed rows in Python under the GIL, and the encoder waits for the GIL meanwhile.
# Measured (bench --scale 20000, 2 cores): 78 writes of ~256 rows cost the store's threads 18-25 s of
# CPU and the ingest ran at 0.76-0.79x the raw encode; 20 writes of ~1024 rows 9.5 s and 0.86x.
_WRITE_ROWS = 1024
# ... and at least 1/_WRITE_GROWTH of the rows in the collection (those stored before this ingest plus
# those it has written; capped at _FLUSH_ROWS): a write's reads walk every stored row (Milvus Lite), so
# at 100k chunks a write of 1024 rows cost ~1 s of the store's CPU, and ~98 of them competed with the
# encoder for the two cores; growing writes make that ~30 writes (8 while the first 8k rows go in, then
# ~8 per doubling), and an ingest into a collection that is already large starts with large writes.
_WRITE_GROWTH = 8
_MERGE_WRITES = 4  # write units (max(_WRITE_ROWS, batch_chunks) rows) one write may carry while the writer is busy
# Rows written before the writer flushes (seals) them. Milvus Lite filters unsealed rows ~30 us a row
# (measured: any filtered query on 5k unsealed rows 160-260 ms, 6-15 ms once flushed), and every
# locked switch reads the documents' live rows: without sealing, write cost grows with the collection.
_FLUSH_ROWS = 8192


@dataclass
class IngestSummary:
    """What one ingest did. ``failed == len(errors)``; ``chunks`` counts chunks written.

    ``prune_skipped`` is True when ``prune`` was asked for but some failed item had no known
    document id (e.g. an unparsable ``.jsonl`` line), so nothing was pruned. ``skipped_files``
    lists files that are no document (unsupported type) with the reason: with ``errors`` and the
    counts, every file under an ingested folder is accounted for.
    """

    collection: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    errors: list[ItemError] = field(default_factory=list)
    prune_skipped: bool = False
    skipped: int = 0
    skipped_files: list[ItemError] = field(default_factory=list)

    def fail(self, error: ItemError) -> None:
        """Record one failed item."""
        self.errors.append(error)
        self.failed += 1

    def skip(self, error: ItemError) -> None:
        """Record one file that is not a document (unsupported type): listed, not failed."""
        self.skipped_files.append(error)
        self.skipped += 1

    def to_dict(self) -> dict:
        """A JSON-ready dict (errors as ``{"item", "reason", "doc_id"}``)."""
        return asdict(self)


@dataclass
class _Pending:
    doc: Document
    hash: str
    update: bool
    chunks: list[str]
    metadata: list[dict]  # per chunk: the document's metadata + span, headings, page


def content_hash(doc: Document, fingerprint: str) -> str:
    """SHA-256 of everything that determines a document's stored chunks (64 hex characters)."""
    payload = {"text": doc.text, "source": doc.source, "metadata": doc.metadata, "config": fingerprint}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def validate_document(doc: Document, max_chars: int) -> str | None:
    """Why ``doc`` cannot be ingested, or None if it can."""
    if not isinstance(doc.id, str) or not doc.id:
        return "document id must be a non-empty string"
    if len(doc.id.encode("utf-8")) > MAX_DOC_ID_BYTES or any(ord(c) < 32 for c in doc.id):
        return f"document id must be at most {MAX_DOC_ID_BYTES} bytes of UTF-8 without control characters"
    if not isinstance(doc.text, str) or not doc.text.strip():
        return "empty document (no text)"
    if len(doc.text) > max_chars:
        return f"document too large: {len(doc.text)} characters (limit {max_chars}, ingest.max_document_chars)"
    if len(doc.source.encode("utf-8")) > MAX_SOURCE_BYTES:
        return f"source longer than {MAX_SOURCE_BYTES} bytes"
    try:
        size = len(json.dumps(dict(doc.metadata), ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        return f"metadata is not JSON-serialisable: {exc}"
    if size > MAX_METADATA_BYTES:
        return f"metadata larger than {MAX_METADATA_BYTES} bytes of JSON"
    return None


class Ingestor:
    """Writes documents into a collection through a ChunkStore and an embedder."""

    def __init__(
        self, store: ChunkStore, embedder: EmbedderLike, chunker: Chunker, config: IngestConfig | None = None
    ):
        self.store, self.embedder, self.chunker = store, embedder, chunker
        self.config = config or IngestConfig()
        self._fingerprint = json.dumps(
            {"chunking": chunker.config.model_dump(), "model": embedder.model_name}, sort_keys=True
        )

    @classmethod
    def from_config(cls, config: RetrievalConfig | None = None) -> Ingestor:
        """Build the production ingestor: sentence-transformers embedder + Milvus store."""
        from retrieval.embedder import Embedder
        from retrieval.milvus import MilvusStore

        config = config or RetrievalConfig()
        embedder = Embedder(config.embedder)
        store = MilvusStore(config.milvus, rrf_k=config.search.rrf_k, hybrid_candidates=config.search.hybrid_candidates)
        tokenizer = embedder.tokenizer if config.chunking.unit == "token" else None
        return cls(store, embedder, Chunker(config.chunking, tokenizer), config.ingest)

    def close(self) -> None:
        """Close the store (for Milvus Lite this releases the file for other processes)."""
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    def ingest_paths(
        self, collection: str, tenant: str, paths: Iterable[str | Path], *, prune: bool = False,
        public: bool | None = None, progress: bool | None = None,
    ) -> IngestSummary:
        """Ingest files and folders (Markdown, text, JSON Lines, PDF, HTML, Office); see :meth:`ingest`."""
        items = load_paths(paths, max_chars=self.config.max_document_chars, max_bytes=self.config.max_file_bytes)
        return self.ingest(collection, tenant, items, prune=prune, public=public, progress=progress)

    def ingest(
        self, collection: str, tenant: str, items: Iterable[Document | ItemError], *, prune: bool = False,
        public: bool | None = None, progress: bool | None = None,
    ) -> IngestSummary:
        """Bring ``collection`` up to date with ``items``; re-running with the same input is a no-op.

        Args:
            collection: Logical collection name; created (owned by ``tenant``) if missing.
            tenant: The writing tenant; must own the collection.
            items: Documents, and ItemErrors from loading (reported as failed).
            prune: Delete stored documents whose ids are not among ``items``.
            public: Set the collection's public flag (None keeps it; new collections are private).
            progress: Show a tqdm bar (None → ``ingest.show_progress``).

        Returns:
            Counts of added/updated/unchanged/deleted/failed documents, chunks written, seconds.

        Raises:
            NotFoundError / InvalidRequestError: The collection is not writable by ``tenant``.
        """
        started = time.perf_counter()
        summary = IngestSummary(collection)
        docs, seen = self._validate(items, summary)
        info = self.store.ensure_collection(
            collection, tenant, dim=self.embedder.dim, model=self.embedder.model_name, public=public
        )
        existing = self.store.document_hashes(info)
        pending = self._plan(docs, existing, summary)
        show = self.config.show_progress if progress is None else progress
        self._write(info, pending, summary, show)
        if prune:
            self._prune(info, existing, seen, summary)
        self.store.sweep(info)  # tombstones an interrupted run left behind
        if summary.chunks or summary.deleted:
            self.store.flush(info)
        summary.seconds = time.perf_counter() - started
        logger.info(
            "ingest %s (tenant %s): added %d, updated %d, unchanged %d, deleted %d, failed %d, %d chunks in %.2fs",
            collection, tenant, summary.added, summary.updated, summary.unchanged, summary.deleted,
            summary.failed, summary.chunks, summary.seconds,
        )
        return summary

    def delete_documents(self, collection: str, tenant: str, doc_ids: Sequence[str] | None = None) -> int:
        """Delete documents (all of them if ``doc_ids`` is None) from ``tenant``'s collection.

        Returns:
            How many of the documents existed and were deleted.
        """
        info = self.store.resolve(collection, tenant, write=True)
        existing = self.store.document_hashes(info)
        targets = sorted(existing) if doc_ids is None else sorted(set(doc_ids) & set(existing))
        if targets:
            self.store.delete_documents(info, targets)
            self.store.flush(info)
        logger.info("deleted %d documents from %s (tenant %s)", len(targets), collection, tenant)
        return len(targets)

    def delete_document(self, collection: str, tenant: str, doc_id: str) -> None:
        """Delete one document; NotFoundError if the collection has no such document."""
        if self.delete_documents(collection, tenant, [doc_id]) == 0:
            raise NotFoundError(f"document {doc_id!r} not found in collection {collection!r}", param="doc_id")

    # ---- steps ------------------------------------------------------------------------------

    def _validate(self, items: Iterable[Document | ItemError], summary: IngestSummary) -> tuple[list[Document], set[str]]:
        """Valid documents with unique ids, and every id the input mentions (for prune)."""
        docs: list[Document] = []
        seen: set[str] = set()
        for item in items:
            if isinstance(item, ItemError) and item.skipped:
                summary.skip(item)
                seen.update([item.doc_id] if item.doc_id else [])
                continue
            if isinstance(item, ItemError):
                summary.fail(item)
                seen.update([item.doc_id] if item.doc_id else [])
                continue
            seen.add(item.id)
            reason = validate_document(item, self.config.max_document_chars)
            if reason:
                summary.fail(ItemError(item.origin or str(item.id), reason, item.id))
            else:
                docs.append(item)
        counts = Counter(doc.id for doc in docs)
        for doc in (d for d in docs if counts[d.id] > 1):
            reason = f"duplicate document id {doc.id!r} ({counts[doc.id]} times in this upload); none of them ingested"
            summary.fail(ItemError(doc.origin or doc.id, reason, doc.id))
        return [d for d in docs if counts[d.id] == 1], seen

    def _plan(self, docs: list[Document], existing: dict[str, str], summary: IngestSummary) -> list[_Pending]:
        """Chunk the new and changed documents; count the unchanged ones."""
        pending = []
        for doc in docs:
            digest = content_hash(doc, self._fingerprint)
            if existing.get(doc.id) == digest:
                summary.unchanged += 1
                continue
            pieces = self.chunker.split_document(doc.text, doc.metadata)
            chunks = [piece.text for piece in pieces]
            too_big = next((len(c.encode("utf-8")) for c in chunks if len(c.encode("utf-8")) > MAX_CHUNK_TEXT_BYTES), 0)
            if too_big:
                reason = f"a chunk is {too_big} bytes of UTF-8 (limit {MAX_CHUNK_TEXT_BYTES}); lower chunking.size"
                summary.fail(ItemError(doc.origin or doc.id, reason, doc.id))
                continue
            # Each chunk's span, heading path and page ride in its metadata (returned in `sources`).
            metadata = [{**doc.metadata, **piece.metadata} for piece in pieces]
            pending.append(_Pending(doc, digest, doc.id in existing, chunks, metadata))
        return pending

    def _prune(self, info: CollectionInfo, existing: dict[str, str], seen: set[str], summary: IngestSummary) -> None:
        # An item that failed before its id was known (a broken .jsonl line) might be any stored
        # document: pruning now could delete a document the caller still has. Skip, and say so.
        if any(error.doc_id is None for error in summary.errors):
            summary.prune_skipped = True
            logger.warning("ingest %s: prune skipped, some failed items have no document id", info.name)
            return
        stale = sorted(set(existing) - seen)
        self.store.delete_documents(info, stale)
        summary.deleted = len(stale)

    def _write(self, info: CollectionInfo, pending: list[_Pending], summary: IngestSummary, show: bool) -> None:
        """Encode groups on ``streams`` encoder threads; one writer thread stores them, in input order.

        Encoded groups are written once they hold a write unit of rows (``_WRITE_ROWS``, or
        1/``_WRITE_GROWTH`` of the collection's rows, stored before or written since, once that is
        more, at most ``_FLUSH_ROWS``);
        while a write is in flight the next groups keep encoding and are then written together (up
        to ``_MERGE_WRITES`` units in one write): a store that slows down as the collection grows
        gets fewer, larger writes instead of holding up the encoder. A group whose encode fails
        fails only its documents; a failed write fails the documents written with it.
        """
        total = sum(len(p.chunks) for p in pending)
        in_flight: tuple[list[_Pending], Future[None]] | None = None
        ready: list[_Pending] = []
        records: list[ChunkRecord] = []
        floor = max(_WRITE_ROWS, self.config.batch_chunks)  # rows of the smallest write unit
        units = 0  # full units in ``records``
        collection_rows = self._stored_rows(info)  # stored before this ingest, then also those handed to the writer
        unflushed = [0]  # rows written since the last flush (writer thread only)
        groups = list(_groups(pending, self.config.batch_chunks))
        with tqdm(total=total, unit="chunk", desc=f"ingest {info.name}", disable=not show or not total) as bar, \
                self.embedder.encoding_streams(self.config.encode_streams, at_most=len(groups)) as streams, \
                ThreadPoolExecutor(max_workers=streams, thread_name_prefix="ingest-encode") as encoders, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-writer") as writer:
            for group, encoded in _in_order(encoders, self._records, groups, ahead=2 * streams):
                try:
                    records += encoded.result()
                except Exception as exc:  # one bad batch must not stop the rest
                    self._group_failed(info, group, summary, exc)
                    continue
                finally:  # encoded or failed, the group's chunks are done with
                    bar.update(sum(len(p.chunks) for p in group))
                ready += group
                unit = max(floor, min(collection_rows // _WRITE_GROWTH, _FLUSH_ROWS))
                if len(records) < (units + 1) * unit:
                    continue  # the unit is not full: encode on
                units += 1
                if in_flight is not None and not in_flight[1].done() and units < _MERGE_WRITES:
                    continue  # the writer is busy: encode on, these go with the next write
                if in_flight is not None:
                    self._collect(info, *in_flight, summary, bar)
                in_flight = (ready, writer.submit(self._store, info, records, unflushed))
                collection_rows += len(records)
                ready, records, units = [], [], 0
            if in_flight is not None:
                self._collect(info, *in_flight, summary, bar)
            if ready:
                self._collect(info, ready, writer.submit(self._store, info, records, unflushed), summary, bar)

    def _stored_rows(self, info: CollectionInfo) -> int:
        """The collection's row count before this ingest's writes (0 if the store cannot say: it only
        sizes the writes)."""
        try:
            return max(0, self.store.row_count(info))
        except Exception as exc:
            logger.warning("ingest %s: row count unavailable (%s); write sizes start small", info.name,
                           type(exc).__name__)
            return 0

    def _store(self, info: CollectionInfo, records: list[ChunkRecord], unflushed: list[int]) -> None:
        """One locked switch of the records' documents; every ``_FLUSH_ROWS`` rows, a flush (on this thread)."""
        self.store.replace_documents(info, records)
        unflushed[0] += len(records)
        if unflushed[0] >= _FLUSH_ROWS:
            unflushed[0] = 0
            try:
                self.store.flush(info)
            except Exception as exc:  # sealing is an optimisation: the rows are written
                logger.warning("ingest %s: intermediate flush failed (%s)", info.name, type(exc).__name__)

    def _collect(self, info: CollectionInfo, group: list[_Pending], write: Future[None], summary: IngestSummary,
                 bar: tqdm) -> None:
        try:
            write.result()
        except Exception as exc:  # the bar counted these chunks when they were encoded
            self._group_failed(info, group, summary, exc)
            return
        summary.added += sum(not p.update for p in group)
        summary.updated += sum(p.update for p in group)
        chunks = sum(len(p.chunks) for p in group)
        summary.chunks += chunks
        bar.set_postfix(written=summary.chunks, refresh=False)

    @staticmethod
    def _group_failed(info: CollectionInfo, group: list[_Pending], summary: IngestSummary, exc: Exception) -> None:
        # Type only: a driver's message may quote document text; the caller gets it in errors.
        logger.warning("ingest %s: batch of %d documents failed (%s)", info.name, len(group), type(exc).__name__)
        for p in group:
            summary.fail(ItemError(p.doc.origin or p.doc.id, f"embedding/write failed: {exc}", p.doc.id))

    def _records(self, group: list[_Pending]) -> list[ChunkRecord]:
        """The group's chunks embedded in one call (sentence-transformers sorts them by length inside)."""
        texts = [chunk for p in group for chunk in p.chunks]
        vectors = self.embedder.encode(texts)
        records, offset = [], 0
        for p in group:
            for index, text in enumerate(p.chunks):
                records.append(ChunkRecord(chunk_id(p.doc.id, index, p.hash[:_GENERATION_CHARS]), p.doc.id, index,
                                           text, p.doc.source, p.metadata[index], p.hash, vectors[offset + index]))
            offset += len(p.chunks)
        # Embedding is done: the store's per-document lock is held only for the switch itself.
        return records


def _in_order(pool: Executor, fn: Callable[[T], R], items: Iterable[T], *, ahead: int) -> Iterator[tuple[T, Future[R]]]:
    """``(item, pool.submit(fn, item))`` in input order, at most ``ahead`` submitted and not yet yielded
    (``Executor.map`` submits every item at once, holding every result, and raises on the first failure)."""
    window: deque[tuple[T, Future[R]]] = deque()
    for item in items:
        window.append((item, pool.submit(fn, item)))
        if len(window) >= ahead:
            yield window.popleft()
    while window:
        yield window.popleft()


def _groups(pending: list[_Pending], batch_chunks: int) -> Iterable[list[_Pending]]:
    """Whole documents grouped until a group holds at least ``batch_chunks`` chunks."""
    group: list[_Pending] = []
    size = 0
    for p in pending:
        group.append(p)
        size += len(p.chunks)
        if size >= batch_chunks:
            yield group
            group, size = [], 0
    if group:
        yield group
