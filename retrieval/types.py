"""Plain data shared by the retrieval modules, and the two interfaces they are wired through.

``EmbedderLike`` and ``ChunkStore`` are the seams: the ingestor and the retriever only talk to
these, so unit tests pass small fakes and production passes ``Embedder`` and ``MilvusStore``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from cluster.errors import InvalidRequestError

__all__ = [
    "Chunk",
    "ChunkRecord",
    "ChunkStore",
    "CollectionInfo",
    "Document",
    "EmbedderLike",
    "ItemError",
    "MAX_CHUNK_TEXT_BYTES",
    "MAX_DOC_ID_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_SOURCE_BYTES",
    "Mode",
    "chunk_id",
    "check_collection_name",
    "check_tenant",
]

Mode = Literal["dense", "hybrid"]

# Field limits of the chunk schema (Milvus VARCHAR/JSON sizes are in bytes of UTF-8).
MAX_DOC_ID_BYTES = 256  # the primary key "doc_id#index" has 512
MAX_SOURCE_BYTES = 2048
MAX_CHUNK_TEXT_BYTES = 65_535
MAX_METADATA_BYTES = 65_536

# Logical names are what clients see; Milvus's own rules (letters/digits/_) apply only to the
# physical names the store derives from them, so "ragtune-docs" is a valid collection name here.
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# Tenants come from the auth layer, but they also end up inside filter expressions: keep them plain.
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}\Z")


def check_collection_name(name: str) -> str:
    """Return ``name`` if it is a valid collection name, else raise InvalidRequestError."""
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name):
        raise InvalidRequestError(
            f"invalid collection name {name!r}: 1-128 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
            param="collection",
        )
    return name


def check_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant id, else raise InvalidRequestError."""
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise InvalidRequestError(f"invalid tenant id {tenant!r}", param="tenant")
    return tenant


def chunk_id(doc_id: str, index: int, generation: str = "") -> str:
    """The primary key of chunk ``index`` of ``doc_id`` (of one ``generation``): stable across runs."""
    return f"{doc_id}#{generation}#{index}" if generation else f"{doc_id}#{index}"


@dataclass(frozen=True)
class Document:
    """One source document. ``origin`` (a path, ``file:line`` or request item) is only for errors."""

    id: str
    text: str
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    origin: str = ""


@dataclass(frozen=True)
class ItemError:
    """Why one input item (file, line, request item) was not ingested.

    ``skipped`` marks a file that is not a document at all (unsupported type): listed in the
    summary's ``skipped_files``, not counted as failed.
    """

    item: str
    reason: str
    doc_id: str | None = None
    skipped: bool = False


@dataclass(frozen=True)
class ChunkRecord:
    """One row to write: a chunk with its embedding and the hash of the document version."""

    id: str
    doc_id: str
    chunk_index: int
    text: str
    source: str
    metadata: Mapping[str, Any]
    content_hash: str
    vector: Sequence[float]


@dataclass(frozen=True)
class Chunk:
    """One retrieved chunk, as the HTTP layer returns it in ``sources``."""

    id: str
    document: str
    source: str
    score: float
    text: str
    chunk_index: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return asdict(self)


@dataclass(frozen=True)
class CollectionInfo:
    """A resolved knowledge base: logical name, owner, visibility and where it physically lives."""

    name: str
    owner: str
    public: bool
    physical: str
    model: str
    dim: int


class EmbedderLike(Protocol):
    """What the ingestor and retriever need from an embedder."""

    model_name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-normalised embeddings, one per text, in order."""
        ...

    def encoding_streams(self, requested: int | None = None, *, at_most: int | None = None
                         ) -> AbstractContextManager[int]:
        """While open: how many ``encode`` calls to run at once for a bulk encode (``requested``, or
        the embedder's own choice when None; 1 = one call at a time), never more than ``at_most``
        (the groups there are)."""
        ...


class ChunkStore(Protocol):
    """What the ingestor and retriever need from a vector store (see ``MilvusStore``)."""

    def ensure_collection(
        self, name: str, tenant: str, *, dim: int, model: str, public: bool | None = None
    ) -> CollectionInfo: ...

    def resolve(self, name: str, tenant: str, *, write: bool = False) -> CollectionInfo: ...

    def document_hashes(self, info: CollectionInfo) -> dict[str, str]: ...

    def row_count(self, info: CollectionInfo) -> int: ...

    def replace_documents(self, info: CollectionInfo, records: Sequence[ChunkRecord]) -> None: ...

    def delete_documents(self, info: CollectionInfo, doc_ids: Sequence[str]) -> None: ...

    def sweep(self, info: CollectionInfo) -> None: ...

    def flush(self, info: CollectionInfo) -> None: ...

    def search(
        self,
        info: CollectionInfo,
        *,
        vector: Sequence[float],
        query: str,
        top_k: int,
        filter: str | None,
        mode: Mode,
    ) -> list[Chunk]: ...
