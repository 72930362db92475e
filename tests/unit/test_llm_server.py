"""The LLM replica class keeps the whole seam the ingress calls (no engine started here)."""

import inspect

from serve.clients import LLMClient
from serve.llm import LLMServer


def test_llm_server_implements_every_client_call_and_the_health_check():
    wanted = {name for name, _ in inspect.getmembers(LLMClient, inspect.isfunction)} - {"load_adapter"}
    wanted |= {"check_health", "get_adapter", "load_adapter", "start"}
    missing = {name for name in wanted if not callable(getattr(LLMServer, name, None))}
    assert not missing, missing
    for name in ("chat", "completions", "responses"):
        assert inspect.isasyncgenfunction(getattr(LLMServer, name)), name
