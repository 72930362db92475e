"""Chunking: window sizes, overlap, word boundaries, stability, token windows, config errors."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig
from retrieval.types import chunk_id

TEXT = " ".join(f"word{i}" for i in range(400)) + ".\n\nSecond paragraph. " + "tail " * 50


def test_char_windows_respect_size_and_cover_text():
    chunker = Chunker(ChunkingConfig(size=200, overlap=40))
    chunks = chunker.split(TEXT)
    assert len(chunks) > 5
    assert all(len(c) <= 200 for c in chunks)
    # Every word of the text is in some chunk (nothing lost between windows).
    assert set(TEXT.split()) == {w for c in chunks for w in c.split()}


def test_char_windows_do_not_cut_words_and_overlap():
    chunks = Chunker(ChunkingConfig(size=200, overlap=40)).split(TEXT)
    words = set(TEXT.split())
    for chunk in chunks:
        assert set(chunk.split()) <= words, "a word was cut in half"
    for first, second in zip(chunks, chunks[1:], strict=False):
        assert first.split()[-1] in second.split()[:10], "consecutive windows should share the overlap"


def test_char_windows_prefer_paragraph_breaks():
    text = ("a" * 10 + " ") * 12 + "\n\n" + ("b" * 10 + " ") * 12
    chunks = Chunker(ChunkingConfig(size=200, overlap=0)).split(text)
    assert chunks[0].endswith("a" * 10)
    assert chunks[1].startswith("b")


def test_chunking_is_deterministic_and_ids_stable():
    config = ChunkingConfig(size=120, overlap=20)
    assert Chunker(config).split(TEXT) == Chunker(config).split(TEXT)
    assert chunk_id("docs/a.md", 3) == "docs/a.md#3"


def test_short_blank_and_unbroken_text():
    chunker = Chunker(ChunkingConfig(size=50, overlap=10))
    assert chunker.split("hello world") == ["hello world"]
    assert chunker.split("   \n\n  ") == []
    long_word = "x" * 130  # no break anywhere: hard cuts, still bounded and progressing
    chunks = chunker.split(long_word)
    assert all(len(c) <= 50 for c in chunks) and "".join(chunks).count("x") >= 130


class WhitespaceTokenizer:
    """Mimics a fast tokenizer's offsets API: one token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True, verbose=False):
        return {"offset_mapping": [m.span() for m in re.finditer(r"\S+", text)]}


def test_token_windows_use_offsets():
    chunker = Chunker(ChunkingConfig(unit="token", size=100, overlap=25), tokenizer=WhitespaceTokenizer())
    chunks = chunker.split(TEXT)
    assert all(len(c.split()) <= 100 for c in chunks)
    assert chunks[0].split()[:2] == ["word0", "word1"]
    assert chunks[1].split()[0] == "word75"  # step = size - overlap
    assert chunks[-1].split()[-1] == "tail"


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
