"""The sample knowledge base: short Markdown notes about ragtune's own components.

``ragtune up`` ingests this folder into the public collection ``ragtune-docs``. A few facts
exist only here (the codename, the mascot, release names, the second-stack port), so a demo
can ask a question the base model cannot answer without retrieval: see ``SAMPLE_QUESTIONS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.config import RetrievalConfig
    from retrieval.ingest import Ingestor, IngestSummary

__all__ = [
    "SAMPLE_COLLECTION",
    "SAMPLE_KB_DIR",
    "SAMPLE_OWNER",
    "SAMPLE_QUESTIONS",
    "ingest_sample_kb",
    "ingest_sample_kb_from_config",
]

SAMPLE_KB_DIR = Path(__file__).resolve().parent
SAMPLE_COLLECTION = "ragtune-docs"
SAMPLE_OWNER = "ragtune"

# (question, the document that answers it, a phrase the answer contains) — only these files know.
SAMPLE_QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("What is the internal codename of ragtune?", "codename.md", "Quillwort"),
    ("What animal is the ragtune mascot and what is it called?", "mascot.md", "Marlo"),
    ("Which port does a second local ragtune stack use?", "ports.md", "8008"),
    ("What is the name of ragtune release 0.1?", "release-names.md", "Wren"),
)


def ingest_sample_kb(ingestor: Ingestor, *, owner: str = SAMPLE_OWNER,
                     collection: str = SAMPLE_COLLECTION) -> IngestSummary:
    """Ingest the sample documents into a public collection (incremental; prunes removed files).

    Args:
        ingestor: Where to write (``Ingestor.from_config(cfg)`` or ``retriever.ingestor``).
        owner: Owner tenant of the collection; every tenant can read it because it is public.
        collection: Collection name.

    Returns:
        The ingest summary (a second run reports everything unchanged).
    """
    return ingestor.ingest_paths(collection, owner, [SAMPLE_KB_DIR], prune=True, public=True)


def ingest_sample_kb_from_config(config: RetrievalConfig | None = None, *, owner: str = SAMPLE_OWNER) -> IngestSummary:
    """Build an ingestor from ``config``, ingest the sample, and close it.

    Closing releases a Milvus Lite file, so the serving process can open it afterwards.
    """
    from retrieval.ingest import Ingestor

    ingestor = Ingestor.from_config(config)
    try:
        return ingest_sample_kb(ingestor, owner=owner)
    finally:
        ingestor.close()
