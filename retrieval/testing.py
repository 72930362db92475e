"""In-memory fakes of the embedder and the store, for tests without a model or Milvus.

``FakeEmbedder`` hashes words into a small unit vector (texts sharing words are similar) and
records every ``encode`` call. ``InMemoryStore`` implements ``retrieval.types.ChunkStore`` with
the same tenancy rules as ``MilvusStore`` (``retrieval.tenancy``). It does not evaluate filter
expressions: it checks and records the combined expression (``last_filter``) and ignores it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace

from retrieval.filters import combine_filters, eq
from retrieval.tenancy import check_model, own_collection, pick_collection
from retrieval.types import (
    Chunk,
    ChunkRecord,
    CollectionInfo,
    Mode,
    check_collection_name,
    check_tenant,
)

__all__ = ["FakeEmbedder", "InMemoryStore"]

_WORD = re.compile(r"\w+")


class FakeEmbedder:
    """Bag-of-hashed-words embeddings; ``calls`` holds the batch size of every ``encode`` call."""

    def __init__(self, dim: int = 64, model_name: str = "fake-embedder", streams: int = 1):
        self.dim, self.model_name, self.streams = dim, model_name, streams
        self.calls: list[int] = []

    @contextlib.contextmanager
    def encoding_streams(self, requested: int | None = None, *, at_most: int | None = None) -> Iterator[int]:
        """``requested`` concurrent calls, else the ``streams`` given at construction; at most ``at_most``."""
        yield max(1, min(requested or self.streams, at_most or 1 << 30))

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text (all-zero text → a fixed unit vector)."""
        self.calls.append(len(texts))
        return [self._one(text) for text in texts]

    def _one(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in _WORD.findall(text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector] if any(vector) else [1.0] + [0.0] * (self.dim - 1)


class InMemoryStore:
    """A dict-backed ChunkStore; ``ops`` logs writes in order (``("upsert", ids)``, ...)."""

    def __init__(self) -> None:
        self.collections: dict[tuple[str, str], CollectionInfo] = {}
        self.rows: dict[str, dict[str, ChunkRecord]] = {}  # physical → id → record
        self.ops: list[tuple[str, object]] = []
        self.last_filter: str | None = None

    def ensure_collection(
        self, name: str, tenant: str, *, dim: int, model: str, public: bool | None = None
    ) -> CollectionInfo:
        check_collection_name(name)
        check_tenant(tenant)
        own = own_collection(self.collections.values(), name, tenant, public=public)
        if own is None:
            own = CollectionInfo(name, tenant, bool(public), f"mem_{tenant}_{name}", model, dim)
            self.rows[own.physical] = {}
        check_model(own, model, dim)
        if public is not None:
            own = replace(own, public=public)
        self.collections[(tenant, name)] = own
        return own

    def resolve(self, name: str, tenant: str, *, write: bool = False) -> CollectionInfo:
        check_collection_name(name)
        check_tenant(tenant)
        return pick_collection(self.collections.values(), name, tenant, write=write)

    def document_hashes(self, info: CollectionInfo) -> dict[str, str]:
        hashes: dict[str, str] = {}
        for record in self.rows[info.physical].values():
            known = hashes.setdefault(record.doc_id, record.content_hash)
            if known != record.content_hash:
                hashes[record.doc_id] = ""
        return hashes

    def row_count(self, info: CollectionInfo) -> int:
        return len(self.rows[info.physical])

    def replace_documents(self, info: CollectionInfo, records: Sequence[ChunkRecord]) -> None:
        docs = {r.doc_id for r in records}
        self.ops.append(("replace", [r.id for r in records]))
        rows = self.rows[info.physical]
        for key in [k for k, r in rows.items() if r.doc_id in docs]:
            del rows[key]
        rows.update({r.id: r for r in records})

    def sweep(self, info: CollectionInfo) -> None:
        """Nothing to sweep: ``replace_documents`` here never leaves tombstones."""

    def delete_documents(self, info: CollectionInfo, doc_ids: Sequence[str]) -> None:
        self.ops.append(("delete", list(doc_ids)))
        rows = self.rows[info.physical]
        for key in [k for k, r in rows.items() if r.doc_id in set(doc_ids)]:
            del rows[key]

    def flush(self, info: CollectionInfo) -> None:
        self.ops.append(("flush", info.name))

    def search(
        self, info: CollectionInfo, *, vector: Sequence[float], query: str, top_k: int, filter: str | None, mode: Mode
    ) -> list[Chunk]:
        self.last_filter = combine_filters(eq("tenant", info.owner), filter)
        records = list(self.rows[info.physical].values())
        dense = sorted(records, key=lambda r: -sum(a * b for a, b in zip(vector, r.vector, strict=True)))
        if mode == "dense":
            ranked = [(r, sum(a * b for a, b in zip(vector, r.vector, strict=True))) for r in dense]
        else:
            words = set(_WORD.findall(query.lower()))
            keyword = sorted(records, key=lambda r: -len(words & set(_WORD.findall(r.text.lower()))))
            score = {r.id: 1 / (60 + i + 1) for i, r in enumerate(dense)}
            for i, r in enumerate(keyword):
                score[r.id] += 1 / (60 + i + 1)
            ranked = sorted(((r, score[r.id]) for r in records), key=lambda pair: -pair[1])
        return [
            Chunk(r.id, r.doc_id, r.source, float(s), r.text, r.chunk_index, dict(r.metadata))
            for r, s in ranked[:top_k]
        ]
