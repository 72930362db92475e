"""Locust users for ragtune (or any OpenAI-compatible server): streaming chat with TTFT.

For people who prefer locust's UI and distributed mode. ``ragtune loadtest`` is the primary tool
(exact TTFT/TPOT/ITL definitions, goodput, per-request JSON); this file measures the same chat
request. Headless, 16 users, 60 s::

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 60s \\
        --host http://127.0.0.1:8000 --model smollm2-135m-instruct --max-tokens 64

Entries in locust's stats:

* ``POST chat`` — one per request; its response time is the **end-to-end** latency (request sent →
  ``data: [DONE]``), not locust's default time-to-headers.
* ``TTFT chat`` — a custom metric: request sent → first chunk with non-empty content, ms.
* ``TPOT chat`` — (e2e − TTFT)/(completion_tokens − 1) from the final ``usage`` chunk, ms.

It uses ``HttpUser`` (requests), whose chunked-stream reads return each chunk as it arrives;
``FastHttpUser``'s ``read(n)`` waits for ``n`` bytes, which would delay the TTFT reading.
"""

from __future__ import annotations

import json
import os
import time

from locust import HttpUser, constant, events, task

__all__ = ["ChatUser"]


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model or adapter name.")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request.")
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.", help="User message.")
    parser.add_argument("--ignore-eos", choices=["true", "false"], default="true",
                        help="Send ignore_eos/min_tokens (vLLM extensions) to fix the output length.")
    parser.add_argument("--rag-collection", default="", help="If set, every request carries rag: {collection}.")
    parser.add_argument("--api-key", default=os.environ.get("RAGTUNE_API_KEY", ""), is_secret=True,
                        help="Bearer key (default $RAGTUNE_API_KEY).")


def _fire(name: str, value_ms: float) -> None:
    events.request.fire(request_type=name, name="chat", response_time=value_ms, response_length=0,
                        exception=None, context={})


def _content(obj: dict) -> bool:
    return any((c.get("delta") or {}).get("content") for c in obj.get("choices") or ())


class ChatUser(HttpUser):
    """One closed-loop user: streams a chat completion, then the next (no think time)."""

    wait_time = constant(0)

    def _body(self) -> dict:
        o = self.environment.parsed_options
        body = {"model": o.model, "messages": [{"role": "user", "content": o.prompt}],
                "max_tokens": o.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        if o.ignore_eos == "true":
            body.update(ignore_eos=True, min_tokens=o.max_tokens)
        if o.rag_collection:
            body["rag"] = {"collection": o.rag_collection}
        return body

    @task
    def chat(self) -> None:
        """Stream one chat completion; record e2e (POST), TTFT and TPOT."""
        key = self.environment.parsed_options.api_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self._body(), headers=headers, stream=True,
                              catch_response=True, name="chat") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            ttft, tokens, done = None, None, False
            for line in resp.iter_lines():  # read to the end, past [DONE], to keep the connection
                if done or not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(payload)
                if ttft is None and _content(obj):
                    ttft = time.perf_counter() - start
                tokens = (obj.get("usage") or {}).get("completion_tokens", tokens)
            e2e = time.perf_counter() - start
            resp.request_meta["response_time"] = e2e * 1000
            if not done or ttft is None:
                resp.failure("stream ended without content or data: [DONE]")
                return
        _fire("TTFT", ttft * 1000)
        if tokens and tokens > 1:
            _fire("TPOT", (e2e - ttft) / (tokens - 1) * 1000)
