"""Token-unit chunking with a real (tiny, locally built) fast tokenizer: counts come from a private,
untruncated copy of its Rust backend, equal to what the tokenizer itself counts."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig

WORDS = ["refunds", "are", "granted", "within", "days", "of", "purchase", "the", "handbook", "says", "exceptions", "apply"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_counts_match_the_tokenizer_and_ignore_its_truncation(tokenizer):
    text = " ".join(WORDS * 30) + " unknown words, punctuation."
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    tokenizer(text, truncation=True, max_length=8)  # an embedder's encode leaves truncation on the backend
    chunker = Chunker(ChunkingConfig(unit="token", size=40, overlap=5), tokenizer)
    assert chunker._backend is not None, "a fast tokenizer is counted through its Rust backend"
    assert chunker._count(text) == expected > 8


def test_token_chunks_stay_within_budget(tokenizer):
    text = "# Refunds\n\n" + " ".join(WORDS * 20) + "\n\n## Exceptions\n\n" + " ".join(WORDS[::-1] * 3)
    chunker = Chunker(ChunkingConfig(unit="token", size=30, overlap=4), tokenizer)
    chunks = chunker.chunks(text, "md")
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert len(chunks) > 3 and all(count(c.text) <= 30 for c in chunks)
    assert chunks[-1].headings == ("Refunds", "Exceptions")
