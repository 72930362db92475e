"""Retrieval over HTTP: ``/v1/retrieve``, ``/v1/embeddings``, the documents API, and the RAG step.

The retriever is a Ray Serve deployment in production (a ``DeploymentHandle``) and the
``retrieval.Retriever`` object itself in tests; :class:`RetrieverClient` hides the difference.
"""

from __future__ import annotations

import base64
import logging
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from serve.body import check_json_body
from serve.protocol import RagOptions

__all__ = ["RetrieverClient", "add_retrieval_routes", "retrieve_context"]

logger = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrieveRequest(_Body):
    collection: str = Field(min_length=1, max_length=255)
    query: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    filter: str | None = Field(None, max_length=4096, description="Filter in the grammar of retrieval.filters "
                               "(document, source, chunk_index, metadata[\"key\"]), ANDed with the tenant scope.")
    mode: Literal["dense", "hybrid"] | None = None


class EmbeddingRequest(_Body):
    input: str | list[str] = Field(min_length=1)
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"  # the openai SDK asks for base64 by default
    user: str | None = None


class DocumentsPut(_Body):
    documents: list[dict[str, Any]] = Field(min_length=1, description="Validated per item: a bad one is reported, the rest land.")
    prune: bool = False
    public: bool | None = None


class DocumentPut(_Body):
    text: str
    source: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsDelete(_Body):
    ids: list[str] | None = Field(None, description="Documents to delete; omitted = every document.")


class RetrieverClient:
    """Awaitable calls on a retriever deployment handle or a local ``Retriever``."""

    def __init__(self, target: Any, remote: bool):
        self._target, self._remote = target, remote

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self._target, method)
        return await (fn.remote(*args, **kwargs) if self._remote else fn(*args, **kwargs))


async def retrieve_context(client: RetrieverClient, rag: RagOptions, query: str, tenant: str) -> list[dict]:
    """Chunks for the prompt, best first, as ``sources`` dicts (id, document, source, score, text)."""
    chunks = await client.call("retrieve", query, rag.collection, tenant, rag.top_k, rag.filter, rag.mode)
    return [c.to_dict() for c in chunks]


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    """``base64`` is little-endian float32 bytes, as the OpenAI API defines it."""
    if fmt == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


_CHECKED = [Depends(check_json_body)]  # hostile JSON (depth, digits, surrogates) is a 400, not a 500


def add_retrieval_routes(app: FastAPI, client: RetrieverClient, principal_of) -> None:
    """Register the retrieval endpoints; ``principal_of(request)`` authenticates (a ``serve.auth.Principal``).

    Reads and writes act as the caller's tenant (``owner``); ``admin`` decides who may publish
    and change public collections (``retrieval.tenancy.check_manage``).
    """

    def tenant_of(request: Request) -> str:
        return principal_of(request).owner

    @app.post("/v1/retrieve", dependencies=_CHECKED)
    async def retrieve(body: RetrieveRequest, request: Request) -> dict:
        chunks = await client.call("retrieve", body.query, body.collection, tenant_of(request), body.top_k,
                                   body.filter, body.mode)
        return {"object": "list", "collection": body.collection, "data": [c.to_dict() for c in chunks]}

    @app.post("/v1/embeddings", dependencies=_CHECKED)
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
        tenant_of(request)
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = await client.call("embed", texts)
        # Approximate: whitespace-separated words (the embedder's tokenizer stays in its replica).
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "model": body.model or "embedder",
                "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.put("/v1/collections/{collection}/documents", dependencies=_CHECKED)
    async def put_documents(collection: str, body: DocumentsPut, request: Request) -> dict:
        caller = principal_of(request)
        summary = await client.call("upsert_documents", collection, caller.owner, body.documents,
                                    prune=body.prune, public=body.public, admin=caller.admin)
        logger.info("collection %s: upserted %d documents", collection, len(body.documents))
        return summary.to_dict()

    @app.put("/v1/collections/{collection}/documents/{doc_id}", dependencies=_CHECKED)
    async def put_document(collection: str, doc_id: str, body: DocumentPut, request: Request) -> dict:
        doc = {"id": doc_id, **body.model_dump()}
        caller = principal_of(request)
        summary = await client.call("upsert_documents", collection, caller.owner, [doc], admin=caller.admin)
        return summary.to_dict()

    @app.delete("/v1/collections/{collection}/documents/{doc_id}")
    async def delete_document(collection: str, doc_id: str, request: Request) -> dict:
        caller = principal_of(request)
        await client.call("delete_document", collection, caller.owner, doc_id, admin=caller.admin)
        return {"deleted": 1}

    @app.delete("/v1/collections/{collection}/documents", dependencies=_CHECKED)
    async def delete_documents(collection: str, request: Request, body: DocumentsDelete | None = None) -> dict:
        ids = body.ids if body else None
        caller = principal_of(request)
        return {"deleted": await client.call("delete_documents", collection, caller.owner, ids, admin=caller.admin)}
