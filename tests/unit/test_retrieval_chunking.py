"""Chunking: sections by heading, blocks kept whole, budgets, spans, pages, stability, config errors."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig
from retrieval.types import chunk_id

TEXT = " ".join(f"word{i}" for i in range(400)) + ".\n\nSecond paragraph. " + "tail " * 50

TABLE = "| Item | Days |\n|---|---|\n" + "".join(f"| Item {i} | {i} days |\n" for i in range(8))
HANDBOOK = (
    "# Handbook\n\nIntro for everyone.\n\n## Refunds\n\nRefunds are paid within 14 days.\n\n"
    + TABLE
    + "\n### Exceptions\n\n"
    + " ".join(f"Sentence {i} about exceptions." for i in range(80))
    + "\n\n## Shipping\n\nParcels ship in two days.\n"
)


def chunker(size=300, overlap=40, **kw):
    return Chunker(ChunkingConfig(size=size, overlap=overlap, **kw))


def test_heading_paths_and_spans():
    chunks = chunker().chunks(HANDBOOK, "md")
    sections = [c.metadata.get("section") for c in chunks]
    assert sections[0] == "Handbook" and sections[-1] == "Handbook › Shipping"
    assert "Handbook › Refunds › Exceptions" in sections
    for chunk in chunks:
        assert len(chunk.text) <= 300
        body = HANDBOOK[chunk.start:chunk.end]
        assert chunk.text == body and body.strip() == body
    # A new section starts a new chunk: no chunk mixes Refunds and Shipping.
    assert not any("Refunds are paid" in c.text and "Parcels ship" in c.text for c in chunks)


def test_table_that_fits_stays_whole():
    chunks = chunker(size=300).chunks(HANDBOOK, "md")
    holding = [c for c in chunks if "| Item 0 |" in c.text]
    assert len(holding) == 1 and TABLE.strip() in holding[0].text
    assert not any("| Item 7 |" in c.text for c in chunks if c is not holding[0])


def test_long_section_is_split_with_overlap_and_heading_context():
    chunks = [c for c in chunker(size=200, overlap=40, heading_context=True).chunks(HANDBOOK, "md")
              if c.metadata.get("section") == "Handbook › Refunds › Exceptions"]
    assert len(chunks) > 3
    assert chunks[0].text.startswith("### Exceptions")
    for chunk in chunks[1:]:
        assert chunk.text.startswith("Handbook › Refunds › Exceptions\n\n") and len(chunk.text) <= 200
    # Consecutive pieces share text (overlap) and together cover every sentence.
    assert chunks[1].start < chunks[0].end
    covered = " ".join(c.text for c in chunks)
    assert all(f"Sentence {i} " in covered for i in range(80))


def test_heading_context_off_keeps_pure_spans():
    for chunk in chunker(size=200).chunks(HANDBOOK, "md"):
        assert chunk.text == HANDBOOK[chunk.start:chunk.end]


def test_pdf_pages_from_form_feeds_never_crossed():
    text = "# Guide\n\nPage one text.\f## Part two\n\nPage two text.\fMore text on page three."
    chunks = chunker().chunks(text, "pdf")
    assert [(c.metadata["page"], c.metadata.get("section")) for c in chunks] == [
        (1, "Guide"), (2, "Guide › Part two"), (3, "Guide › Part two")]
    assert all("\f" not in c.text for c in chunks)
    assert "page" not in chunker().chunks("no pages\fhere", "md")[0].metadata


def test_plain_text_reads_no_markdown():
    text = "Title\n=====\n\nfirst paragraph\n\n# not a heading in a .txt"
    chunks = chunker().chunks(text, "txt")
    assert all("headings" not in c.metadata for c in chunks)


def test_every_word_kept_and_deterministic():
    chunks = chunker(size=200, overlap=40).split(TEXT)
    assert set(TEXT.split()) == {w for c in chunks for w in c.split()}
    assert all(len(c) <= 200 for c in chunks)
    words = set(TEXT.split())
    assert all(set(c.split()) <= words for c in chunks), "a word was cut in half"
    config = ChunkingConfig(size=120, overlap=20)
    assert Chunker(config).chunks(HANDBOOK) == Chunker(config).chunks(HANDBOOK)
    assert chunk_id("docs/a.md", 3) == "docs/a.md#3"


def test_short_blank_and_unbroken_text():
    c = chunker(size=50, overlap=10)
    assert c.split("hello world") == ["hello world"]
    assert c.split("   \n\n  ") == []
    long_word = "x" * 130  # no break anywhere: hard cuts, still bounded
    chunks = c.split(long_word)
    assert all(len(x) <= 50 for x in chunks) and "".join(chunks).count("x") >= 130


class WhitespaceTokenizer:
    """Mimics a fast tokenizer's offsets API: one token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True, verbose=False):
        return {"offset_mapping": [m.span() for m in re.finditer(r"\S+", text)]}


def test_token_budget_uses_the_tokenizer():
    c = Chunker(ChunkingConfig(unit="token", size=60, overlap=10), tokenizer=WhitespaceTokenizer())
    chunks = c.chunks(HANDBOOK, "md")
    assert all(len(x.text.split()) <= 60 for x in chunks)
    assert len(chunks) < len(chunker(size=60, overlap=10).chunks(HANDBOOK, "md"))  # tokens > chars per unit


def test_token_unit_requires_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        Chunker(ChunkingConfig(unit="token", size=100, overlap=10))


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match=r"chunking.overlap=800 must be smaller than chunking.size=800"):
        ChunkingConfig(size=800, overlap=800)
    with pytest.raises(ValidationError, match="unit"):
        ChunkingConfig(unit="sentence")
    with pytest.raises(ValidationError, match="extra"):
        ChunkingConfig(sise=100)
    with pytest.raises(ValidationError, match="heading_context"):
        ChunkingConfig(heading_context="sometimes")
