"""What ragtune adds to vLLM's OpenAI protocol, and the typed seam between ingress and replica.

The request and response models themselves are vLLM's (``vllm.entrypoints.openai.*.protocol``);
whatever ``vllm serve`` accepts, ragtune accepts. Here are only the ``rag`` request field and the
two objects that travel with a vLLM request through the deployment handle.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Prelude", "RagOptions", "Route", "created", "new_id"]


def new_id() -> str:
    """A request id (vLLM prefixes it: ``chatcmpl-<id>``); also the engine's request id and the log key."""
    return uuid.uuid4().hex


def created() -> int:
    """Unix seconds for the `created` field."""
    return int(time.time())


class RagOptions(BaseModel):
    """Retrieval-augmented generation: which knowledge to put into the prompt."""

    model_config = ConfigDict(extra="forbid")

    collection: str = Field(min_length=1, max_length=255)
    top_k: int = Field(4, ge=1, le=50)
    filter: str | None = Field(None, max_length=4096, description="Filter in ragtune's allow-listed grammar (retrieval/filters.py), ANDed with the tenant scope.")
    mode: Literal["dense", "hybrid"] = "dense"


@dataclass
class Route:
    """What the ingress decided for one request (authorised, resolved): sent with the vLLM request."""

    request_id: str
    adapter: str | None = None  # registry key "name@version"; None = the base model
    context: list[str] = field(default_factory=list)  # retrieved chunk texts, best first


@dataclass(frozen=True)
class Prelude:
    """First item of every successful replica stream, before any vLLM output."""

    context_used: int  # retrieved chunks that fit the context window (best first)
