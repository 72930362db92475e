"""Embedding prompts: config first, then the model's sentence-transformers prompts, then the family."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from retrieval.config import EmbedderConfig
from retrieval.embedder import resolve_prompts


@pytest.mark.parametrize(
    ("name", "query", "document"),
    [
        ("intfloat/e5-small-v2", "query: ", "passage: "),
        ("intfloat/multilingual-e5-base", "query: ", "passage: "),
        ("BAAI/bge-small-en-v1.5", "Represent this sentence for searching relevant passages: ", ""),
        ("nomic-ai/nomic-embed-text-v1.5", "search_query: ", "search_document: "),
        ("all-MiniLM-L6-v2", "", ""),
        ("intfloat/multilingual-e5-large-instruct", "", ""),  # needs a task instruction from the config
    ],
)
def test_family_prompts(name, query, document):
    prompts = resolve_prompts(EmbedderConfig(), {}, name)
    assert (prompts.query, prompts.document) == (query, document)


def test_model_config_then_retrieval_config_win():
    own = {"query": "Q: ", "passage": "P: "}
    assert resolve_prompts(EmbedderConfig(), own, "intfloat/e5-small-v2")[:2] == ("Q: ", "P: ")
    config = EmbedderConfig(query_prompt="", document_prompt="doc: ")
    prompts = resolve_prompts(config, own, "intfloat/e5-small-v2")
    assert (prompts.query, prompts.document) == ("", "doc: ")
    assert prompts.origin == "query from config, document from config"
    assert resolve_prompts(EmbedderConfig(), {}, "x").origin == "query from none, document from none"


def test_prompt_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="query_prompt"):
        EmbedderConfig(query_prompt="x" * 2000)
    with pytest.raises(ValidationError, match="document_prompt"):
        EmbedderConfig(document_prompt=3)


def test_cpu_threads_undo_a_forced_single_thread():
    """A Ray replica with num_cpus=0 starts on one torch thread; the embedder takes the CPUs it may use."""
    import os

    import torch

    from retrieval.embedder import _cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 leaves
        assert _cpu_threads(None) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert _cpu_threads(1) == 1 == torch.get_num_threads()  # an explicit setting wins
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm():
    """The packaged all-MiniLM-L6-v2 (local, no hub) on two torch threads."""
    from retrieval.embedder import Embedder

    return Embedder(EmbedderConfig(device="cpu", num_threads=2))


def test_encoding_streams_run_one_torch_thread_each_and_give_the_threads_back(minilm):
    import torch

    assert torch.get_num_threads() == 2
    with minilm.encoding_streams() as streams:
        assert streams == 2 and torch.get_num_threads() == 1
        with minilm.encoding_streams(3) as inner:  # a second bulk encode at the same time
            assert inner == 3 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1, "the outer bulk encode is still running"
    assert torch.get_num_threads() == 2
    with minilm.encoding_streams(1) as one:
        assert one == 1 and torch.get_num_threads() == 2, "one stream keeps every thread"
    with minilm.encoding_streams(at_most=1) as one_group:
        assert one_group == 1 and torch.get_num_threads() == 2, "one group: one call on every thread"


def test_concurrent_streams_give_the_vectors_one_call_gives(minilm):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"chunk {i}: " + "refunds are processed within thirty days " * (1 + i % 5) for i in range(48)]
    alone = minilm.encode(texts)
    with minilm.encoding_streams() as streams, ThreadPoolExecutor(streams) as pool:
        parts = list(pool.map(minilm.encode, [texts[i:i + 8] for i in range(0, len(texts), 8)]))
    together = [v for part in parts for v in part]
    assert len(together) == len(alone)
    assert max(abs(a - b) for u, w in zip(alone, together, strict=True) for a, b in zip(u, w, strict=True)) < 1e-5
