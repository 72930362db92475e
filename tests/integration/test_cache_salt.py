"""Prefix-cache isolation through the served stack, read from vLLM's own counters.

vLLM hashes a prompt's KV blocks in a chain whose first link mixes in the request's ``cache_salt``
(``vllm/v1/core/kv_cache_utils.py``, ``generate_block_hash_extra_keys``) and, for LoRA requests,
the adapter's name and path in every block. The ingress sets a per-tenant salt on every request
(``serve/auth.py``), so a prompt tenant A has cached is a hit for A and a miss for B; and two
adapters never share KV blocks for the same prompt. Measured with ``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries`` (tokens) on ``/metrics``: prefix caching is on by default for this
model on the CPU build (vLLM turns it off only for MLA models).
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer admin-key"}
# ~300 tokens of the tiny model's (nearly character-level) tokenizer, + ~40 for the nonce: several
# full KV blocks (only full blocks are cached), within the test server's 512-token window.
FILLER = " ".join("alpha beta gamma delta" for _ in range(20))


def _counters(server) -> tuple[float, float]:
    """(queried, hit) prompt tokens of the engine's prefix cache so far."""
    totals = {"vllm:prefix_cache_queries": 0.0, "vllm:prefix_cache_hits": 0.0}
    for line in server.get("/metrics", headers=ADMIN).text.splitlines():
        name, _, value = line.partition("{") if "{" in line else line.partition(" ")
        name = name.removesuffix("_total")
        if name in totals and not line.startswith("#"):
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prefix_cache_queries"], totals["vllm:prefix_cache_hits"]


def _cached_tokens(server, key: str, model: str, prompt: str, **extra) -> int:
    """Run ``prompt`` as ``key`` on ``model``; the prompt tokens the prefix cache supplied."""
    queried, hits = _counters(server)
    r = httpx.post(f"{server.url}/v1/completions", timeout=120, headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 10  # the engine's stats reach the logger just after the answer
    while time.monotonic() < deadline:
        now_queried, now_hits = _counters(server)
        if now_queried - queried >= prompt_tokens:
            return int(now_hits - hits)
        time.sleep(0.2)
    raise AssertionError(f"prefix-cache counters did not move (queried {queried} → {now_queried})")


def _prompt() -> str:
    return f"[{uuid.uuid4().hex}] {FILLER}"  # never seen by the engine before this test


def test_a_prefix_cached_by_one_tenant_is_a_miss_for_another(server):
    prompt = _prompt()
    assert _cached_tokens(server, "acme-key", "tiny-llama", prompt) == 0
    acme_again = _cached_tokens(server, "acme-key", "tiny-llama", prompt)
    assert acme_again > 0  # A's own prefix: a hit (whole blocks)
    assert _cached_tokens(server, "globex-key", "tiny-llama", prompt) == 0  # B: a miss, same prompt
    assert _cached_tokens(server, "globex-key", "tiny-llama", prompt) == acme_again  # B's own entry now
    assert _cached_tokens(server, "acme-key", "tiny-llama", prompt) == acme_again  # A's is still there
    # The salt is what separates them: A's own client salt is a partition of its own (miss, then hit).
    assert _cached_tokens(server, "acme-key", "tiny-llama", prompt, cache_salt="user-1") == 0
    assert _cached_tokens(server, "acme-key", "tiny-llama", prompt, cache_salt="user-1") == acme_again


def test_two_adapters_never_share_kv_for_the_same_prompt(server):
    prompt = _prompt()
    assert _cached_tokens(server, "admin-key", "alpha", prompt) == 0
    assert _cached_tokens(server, "admin-key", "alpha", prompt) > 0
    assert _cached_tokens(server, "admin-key", "beta", prompt) == 0  # same tenant, other adapter: a miss
    assert _cached_tokens(server, "admin-key", "tiny-llama", prompt) == 0  # nor the base model
