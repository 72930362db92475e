"""Fakes for unit tests, implementing the same interface as the real parts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from vllm.sampling_params import RequestOutputKind

__all__ = ["FakeEngine"]


class FakeEngine:
    """The subset of vLLM ``AsyncLLM`` that ``LLMServer`` uses, with scripted tokens.

    Choice ``i`` emits ``max_tokens`` tokens " w0", " w1", … (adapter name prefixed), honouring
    ``n`` and the output kind (DELTA streams, FINAL_ONLY returns once). ``delay_s`` per token.
    """

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.loaded: dict[int, str] = {}
        self.requests: list[str] = []

    async def add_lora(self, lora) -> bool:
        if lora.lora_name.startswith("broken@"):
            raise RuntimeError("corrupt adapter weights")
        self.loaded[lora.lora_int_id] = lora.lora_name
        return True

    async def generate(self, prompt, params, request_id, *, lora_request=None):
        self.requests.append(request_id)
        prefix = f"{lora_request.lora_name}:" if lora_request else ""
        texts = {i: [] for i in range(params.n)}
        for step in range(params.max_tokens):
            await asyncio.sleep(self.delay_s)
            last = step == params.max_tokens - 1
            outs = []
            for i in range(params.n):
                token = f" {prefix}w{step}"
                texts[i].append(token)
                outs.append(SimpleNamespace(index=i, text=token, token_ids=[step], finish_reason="length" if last else None))
            if params.output_kind == RequestOutputKind.DELTA:
                yield SimpleNamespace(outputs=outs)
        if params.output_kind != RequestOutputKind.DELTA:
            yield SimpleNamespace(outputs=[SimpleNamespace(index=i, text="".join(t), token_ids=list(range(len(t))),
                                                           finish_reason="length") for i, t in texts.items()])

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
