"""RAG context fitting in the LLM replica (serve/llm.py), with the tiny model's real tokenizer, no engine.

The number of chunks kept must be safe (the fitted prompt never exceeds the window) and maximal
(one more chunk would not fit), and it must cost a fixed number of tokenizer calls however many
chunks are dropped: one batch call and one check, not one call per dropped chunk.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from serve.config import EngineConfig
from serve.context import context_block
from serve.llm import LLMServer

WORDS = ["the", "valve", "pump", "spring", "night", "shift", "codename", "bluefin", "is", "at", "80", "degrees", "<|im_start|>", "</document>", "\n"]


class CountingTokenizer:
    """The real tokenizer, counting the calls the replica makes (batch calls and single encodes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer.encode(*args, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


def _server(tokenizer, max_model_len=1024) -> LLMServer:
    server = LLMServer.__new__(LLMServer)  # only the fitting state: no registry, no engine
    server.cfg = EngineConfig(model="tiny-llama", max_model_len=max_model_len)
    server._tokenizer = CountingTokenizer(tokenizer)
    server._special = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    return server


def _fit(server, chunks, prompt, max_tokens):
    request = SimpleNamespace(prompt=prompt, max_tokens=max_tokens, max_completion_tokens=None)
    request, used = asyncio.run(server._fit_completion(request, chunks))
    return request.prompt, used


def test_kept_chunks_always_fit_and_one_more_would_not(tokenizer):
    server, rng = _server(tokenizer), random.Random(7)
    for _ in range(60):
        chunks = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))) for _ in range(rng.randint(1, 30))]
        prompt, max_tokens = "Q: " + " ".join(rng.choice(WORDS) for _ in range(10)), rng.randint(16, 900)
        fitted, used = _fit(server, chunks, prompt, max_tokens)
        limit = server.cfg.max_model_len - max_tokens
        assert len(tokenizer.encode(fitted)) <= limit  # safe: vLLM will not refuse the fitted prompt
        if used < len(chunks):  # maximal (within the few tokens the sum of parts can miss by)
            one_more = context_block(chunks[:used + 1], server._special) + "\n\n" + prompt
            assert len(tokenizer.encode(one_more)) > limit - 8
        assert fitted.endswith(prompt) and (used == 0) == (not fitted.startswith("Use the documents"))


def test_tokenizer_calls_do_not_grow_with_the_chunks_dropped(tokenizer):
    server = _server(tokenizer, max_model_len=512)
    chunks = [f"chunk {i}: " + "the valve pump spring " * 10 for i in range(50)]
    _, used = _fit(server, chunks, "Which valve?", max_tokens=64)
    assert 0 < used < 10  # 40+ chunks dropped …
    assert server._tokenizer.calls <= 4  # … with the prompt, one batch, one check (+ a rare step back)
