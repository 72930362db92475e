"""Optional reranking: a sentence-transformers CrossEncoder rescores the fused candidates.

Off unless ``rerank.model`` is set. The retriever then fetches ``max(top_k, rerank.candidates)``
chunks (dense, or dense + BM25 fused by RRF), scores every (query, chunk text) pair with the
cross-encoder and keeps the ``top_k`` best, before the serving layer fits the context. A chunk's
``score`` becomes the cross-encoder's; its first-stage score stays in ``metadata["retrieval_score"]``.
The model is loaded by path or name like the embedder (offline: a local folder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from retrieval.config import RerankConfig
from retrieval.types import Chunk

__all__ = ["Reranker"]

logger = logging.getLogger(__name__)


class Reranker:
    """Rescores chunks for a query with a cross-encoder.

    Attributes:
        last_seconds: Wall time of the last :meth:`rerank` call (the retriever logs and reports it).
    """

    def __init__(self, config: RerankConfig, model: Any = None):
        """Load the cross-encoder.

        Args:
            config: ``model`` (required here), ``batch_size``, ``max_length``, ``device``.
            model: An already built object with ``predict(pairs, batch_size=...)`` (tests).

        Raises:
            ValueError: ``config.model`` is not set and no model is given.
        """
        self.config = config
        if model is None:
            if not config.model:
                raise ValueError("rerank.model must name a cross-encoder to rerank with")
            from sentence_transformers import CrossEncoder

            device = None if config.device == "auto" else config.device
            model = CrossEncoder(config.model, device=device, max_length=config.max_length)
            logger.info("reranker %s loaded", config.model)
        self._model = model
        self.last_seconds = 0.0

    def candidates(self, top_k: int) -> int:
        """How many first-stage chunks to fetch for a final ``top_k``."""
        return max(top_k, self.config.candidates)

    def rerank(self, query: str, chunks: Sequence[Chunk], top_k: int) -> list[Chunk]:
        """The ``top_k`` chunks best for ``query`` by cross-encoder score, best first (ties keep order)."""
        started = time.perf_counter()
        if not chunks:
            self.last_seconds = 0.0
            return []
        scores = self._model.predict([(query, c.text) for c in chunks], batch_size=self.config.batch_size,
                                     show_progress_bar=False)
        order = sorted(range(len(chunks)), key=lambda i: (-float(scores[i]), i))[:top_k]
        ranked = [replace(chunks[i], score=float(scores[i]),
                          metadata={**chunks[i].metadata, "retrieval_score": chunks[i].score}) for i in order]
        self.last_seconds = time.perf_counter() - started
        return ranked
