"""Retrieval: chunking, embedding, the Milvus store, incremental ingestion and the retriever.

The serving layer needs only:

* ``Retriever(config)`` — ``retrieve``, ``embed``, ``upsert_documents``, ``delete_document(s)``;
* ``ingest_sample_kb_from_config(config)`` — the sample knowledge base for ``ragtune up``;
* ``Ingestor.from_config(config)`` — for ``ragtune ingest``.

Heavy imports (torch, pymilvus) happen when these are used, not on ``import retrieval``.
"""

from __future__ import annotations

from retrieval.config import (
    ChunkingConfig,
    EmbedderConfig,
    IngestConfig,
    MilvusConfig,
    RequestLimitsConfig,
    RetrievalConfig,
    SearchConfig,
)
from retrieval.ingest import Ingestor, IngestSummary
from retrieval.retriever import Retriever
from retrieval.sample_kb import SAMPLE_COLLECTION, ingest_sample_kb, ingest_sample_kb_from_config
from retrieval.types import Chunk, CollectionInfo, Document, ItemError

__all__ = [
    "SAMPLE_COLLECTION",
    "Chunk",
    "ChunkingConfig",
    "CollectionInfo",
    "Document",
    "EmbedderConfig",
    "IngestConfig",
    "IngestSummary",
    "Ingestor",
    "ItemError",
    "MilvusConfig",
    "RequestLimitsConfig",
    "RetrievalConfig",
    "Retriever",
    "SearchConfig",
    "ingest_sample_kb",
    "ingest_sample_kb_from_config",
]
