"""Prompt sets and request bodies.

The synthetic set draws words from a list of short, common English words, each one token (with
its leading space) for typical BPE vocabularies, so ``input_tokens`` words ≈ that many prompt
tokens (plus the chat template's own). The exact count is not assumed anywhere: reports use the
server's ``usage.prompt_tokens``. Each prompt starts differently, so prefix caching cannot turn
the test into a cache benchmark.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError
from loadtests.config import LoadTestConfig, PromptSpec

__all__ = ["Prompt", "RequestFactory", "load_prompts", "read_jsonl", "synthetic_prompts"]

_TEXT = (
    "the of and to in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has "
    "look two more write go see number no way could people my than first water been call who oil its "
    "now find long down day did get come made may part over new sound take only little work know place "
    "year live me back give most very after thing our just name good man think say great where help "
    "through much before line right too mean old any same tell boy follow came want show also around "
    "form three small set put end does another well large must big even such because turn here why "
    "ask went men read need land different home us move try kind hand picture again change off play "
    "spell air away animal house point page letter mother answer found study still learn should world"
)
_WORDS = _TEXT.split()


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``text`` (completions, or a single user message) or chat ``messages``."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    max_tokens: int | None = None


def synthetic_prompts(count: int, input_tokens: int, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of ``input_tokens`` one-token words each, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [Prompt(text=" ".join(rng.choices(_WORDS, k=input_tokens))) for _ in range(count)]


def _line_prompt(obj: object, lineno: int, path: Path) -> Prompt:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}", param="prompts.path")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}",
                          param="prompts.path")
    if isinstance(obj.get("prompt"), str) and obj["prompt"]:
        return Prompt(text=obj["prompt"], max_tokens=max_tokens)
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return Prompt(messages=tuple(messages), max_tokens=max_tokens)
    raise ConfigError(f"{where}: needs a non-empty 'prompt' string or a 'messages' list", param="prompts.path")


def read_jsonl(path: Path) -> list[Prompt]:
    """Read prompts from a JSONL file: ``{"prompt": str}`` or ``{"messages": [...]}``, ``max_tokens`` optional.

    Raises:
        ConfigError: The file is missing or empty, or a line (named by number) is malformed.
    """
    if not path.is_file():
        raise ConfigError(f"prompts.path: no such file {str(path)!r}", param="prompts.path")
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON ({exc})", param="prompts.path") from None
            prompts.append(_line_prompt(obj, lineno, path))
    if not prompts:
        raise ConfigError(f"prompts.path: {str(path)!r} has no prompts", param="prompts.path")
    return prompts


def load_prompts(spec: PromptSpec, api: str, seed: int = 0) -> list[Prompt]:
    """The prompt set a config asks for; chat-only prompts are refused for the completions API."""
    if spec.source == "synthetic":
        return synthetic_prompts(spec.count, spec.input_tokens, seed)
    prompts = read_jsonl(spec.path)
    if api == "completions" and any(p.text is None for p in prompts):
        raise ConfigError("prompts.path: api='completions' needs 'prompt' lines, found 'messages'",
                          param="prompts.path")
    return prompts


class RequestFactory:
    """Makes request bodies: a prompt in turn, a model by weight, RAG by fraction (all seeded)."""

    def __init__(self, cfg: LoadTestConfig, prompts: list[Prompt]):
        self.cfg, self.prompts = cfg, prompts
        self.rng = random.Random(cfg.seed)
        self.models = [m.model for m in cfg.mix]
        self.weights = [m.weight for m in cfg.mix]
        self.next_prompt = 0
        self.encoded: dict[tuple[int, str, bool], bytes] = {}

    def make(self) -> tuple[bytes, str, bool]:
        """One request: (JSON body, model name, whether it carries ``rag``)."""
        index = self.next_prompt % len(self.prompts)
        self.next_prompt += 1
        model = self.rng.choices(self.models, self.weights)[0] if len(self.models) > 1 else self.models[0]
        rag = self.cfg.rag.fraction > 0 and self.rng.random() < self.cfg.rag.fraction
        key = (index, model, rag)
        body = self.encoded.get(key)
        if body is None:  # bodies repeat; encoding each once keeps the generator's per-request cost low
            body = self.encoded[key] = json.dumps(self.body(self.prompts[index], model, rag)).encode()
        return body, model, rag

    def body(self, prompt: Prompt, model: str, rag: bool) -> dict:
        """The OpenAI request body for one prompt."""
        spec = self.cfg.prompts
        max_tokens = prompt.max_tokens or spec.output_tokens
        body: dict = {"model": model, "max_tokens": max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}}
        if self.cfg.api == "chat":
            body["messages"] = list(prompt.messages or ({"role": "user", "content": prompt.text},))
        else:
            body["prompt"] = prompt.text
        if spec.control_output_length:
            body.update(ignore_eos=True, min_tokens=max_tokens)
        if rag:
            r = self.cfg.rag
            body["rag"] = {"collection": r.collection, "top_k": r.top_k, "mode": r.mode}
        return body
