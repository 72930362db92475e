"""The load test's typed config and the parsers for its compact CLI specs (``--mix``, ``--slo``).

Every field carries a description (it becomes CLI help and the config reference); closed sets are
``Literal``; bounds are ``Field(ge=…)``; validator messages quote the field and the value. Spec
parsers raise :class:`cluster.errors.ConfigError` naming the offending part of the spec.
"""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from cluster.errors import ConfigError
from cluster.models import SMOLLM2
from cluster.schema import StrictModel

__all__ = [
    "ClientKind",
    "LoadShape",
    "LoadTestConfig",
    "MixEntry",
    "PromptSpec",
    "RagSpec",
    "Slo",
    "is_loopback_url",
    "parse_levels",
    "parse_mix",
    "parse_slo",
]

ClientKind = Literal["httpx", "httpx2", "aiohttp"]
ShapeKind = Literal["concurrency", "constant", "poisson"]


class MixEntry(StrictModel):
    """One model (the base model's or an adapter's name) and its share of the requests."""

    model: str = Field(min_length=1, max_length=200, description="Model name sent as `model`.")
    weight: float = Field(gt=0, le=1e6, description="Relative weight; weights are normalised.")


class RagSpec(StrictModel):
    """RAG on a fraction of requests: adds `rag: {collection, top_k, mode}` to the request body."""

    fraction: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests that carry `rag`.")
    collection: str = Field("default", min_length=1, description="Collection to retrieve from.")
    top_k: int = Field(4, ge=1, le=100, description="Chunks to retrieve per request.")
    mode: Literal["dense", "hybrid"] = Field("dense", description="Retrieval mode.")


class PromptSpec(StrictModel):
    """Where prompts come from and how long inputs and outputs are."""

    source: Literal["synthetic", "jsonl"] = Field(
        "synthetic", description="Built-in synthetic prompts, or a JSONL file (`path`).")
    path: Path | None = Field(None, description="JSONL file: one {prompt|messages, max_tokens?} per line.")
    input_tokens: int = Field(128, ge=1, le=131072,
                              description="Synthetic prompt length, in (approximately one-token) words.")
    output_tokens: int = Field(64, ge=1, le=32768,
                               description="`max_tokens` per request (JSONL lines may override it).")
    control_output_length: bool = Field(
        True, description="Also send `ignore_eos` and `min_tokens` (vLLM extensions) so outputs "
                          "run to `max_tokens`; turn off for servers that reject unknown fields.")
    count: int = Field(256, ge=1, le=1_000_000, description="Distinct synthetic prompts generated.")

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> PromptSpec:
        if self.source == "jsonl" and self.path is None:
            raise ValueError("prompts.path is required when prompts.source='jsonl'")
        return self


class LoadShape(StrictModel):
    """The load: one step per level (a sweep when there are several), each bounded in count and time."""

    kind: ShapeKind = Field(
        "concurrency", description="`concurrency`: N requests always in flight (closed loop); "
                                   "`constant`: fixed-interval arrivals; `poisson`: exponential gaps.")
    levels: list[float] = Field(
        default_factory=lambda: [1.0], min_length=1, max_length=100,
        description="Concurrencies (integers) or rates (requests/s), one step each.")
    duration_s: float = Field(30.0, gt=0, le=86400, description="Longest a step issues requests, seconds.")
    requests: int | None = Field(200, ge=1, le=10_000_000,
                                 description="Most requests a step sends; None = bounded by time only.")
    max_in_flight: int = Field(1024, ge=1, le=100_000,
                               description="Open-loop shapes: cap on requests in flight (sends slip past it).")

    @field_validator("levels")
    @classmethod
    def _positive(cls, levels: list[float]) -> list[float]:
        for value in levels:
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"shape.levels: every level must be > 0, got {value!r}")
        return levels

    @model_validator(mode="after")
    def _integer_concurrency(self) -> LoadShape:
        if self.kind == "concurrency":
            for value in self.levels:
                if value != int(value) or value > 100_000:
                    raise ValueError(f"shape.levels: a concurrency must be an integer ≤ 100000, got {value!r}")
        return self


class Slo(StrictModel):
    """Per-request service-level objectives; a request meets the SLO when it meets every one set."""

    ttft_ms: float | None = Field(None, gt=0, description="Most acceptable time to first token, ms.")
    tpot_ms: float | None = Field(None, gt=0, description="Most acceptable time per output token, ms.")
    e2e_ms: float | None = Field(None, gt=0, description="Most acceptable end-to-end latency, ms.")


class LoadTestConfig(StrictModel):
    """Everything one `ragtune loadtest` run needs."""

    base_url: str = Field("http://127.0.0.1:8000",
                          description="Server base URL; `/v1/...` is appended (a trailing `/v1` is fine).")
    allow_remote: bool = Field(
        False, description="Allow a non-loopback `base_url`. The CLI sets it only when --url is passed "
                           "explicitly: no default ever points off this machine.")
    api: Literal["chat", "completions"] = Field("chat", description="/v1/chat/completions or /v1/completions.")
    api_key: SecretStr | None = Field(None, description="Bearer token (CLI: --api-key or $RAGTUNE_API_KEY).")
    mix: list[MixEntry] = Field(default_factory=lambda: [MixEntry(model=SMOLLM2, weight=1.0)], min_length=1,
                                description="Models/adapters and their weights.")
    rag: RagSpec = Field(default_factory=RagSpec, description="RAG on a fraction of requests.")
    prompts: PromptSpec = Field(default_factory=PromptSpec, description="Prompt set and lengths.")
    shape: LoadShape = Field(default_factory=LoadShape, description="Load shape and bounds.")
    slo: Slo = Field(default_factory=Slo, description="SLOs for goodput.")
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-request time limit, seconds.")
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="After a step stops issuing, how long in-flight requests may "
                                         "finish before they are cancelled (and counted), seconds.")
    client: ClientKind = Field("httpx", description="HTTP client library (see loadtests/README.md for ceilings).")
    seed: int = Field(0, description="Seed for prompts, the mix, RAG selection and Poisson gaps.")
    progress: bool = Field(True, description="Show a tqdm progress bar.")
    plots: bool = Field(True, description="Write PNG plots next to the JSON and Markdown reports.")

    @field_validator("mix", "slo", mode="before")
    @classmethod
    def _spec_string(cls, value, info):
        """``mix``/``slo`` may also be given as their CLI spec strings (handy in YAML)."""
        if not isinstance(value, str):
            return value
        try:
            return parse_mix(value) if info.field_name == "mix" else parse_slo(value)
        except ConfigError as exc:  # pydantic reports ValueErrors with the field's location
            raise ValueError(exc.message) from None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must look like http://host:port, got {url!r}")
        return url.rstrip("/").removesuffix("/v1")

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> LoadTestConfig:
        if not self.allow_remote and not is_loopback_url(self.base_url):
            raise ValueError(f"base_url {self.base_url!r} is not a loopback address; pass it explicitly "
                             "(--url) to load-test another machine")
        return self

    def endpoint(self) -> str:
        """The full URL requests are posted to."""
        return f"{self.base_url}/v1/{'chat/completions' if self.api == 'chat' else 'completions'}"


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is ``localhost`` or a loopback IP address."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pairs(spec: str, option: str) -> list[tuple[int, str, str]]:
    if not spec or not spec.strip():
        raise ConfigError(f"{option}: empty spec", param=option)
    out = []
    for i, part in enumerate(spec.split(","), start=1):
        name, sep, value = part.strip().partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{option}: part {i} {part.strip()!r} is not NAME=VALUE", param=option)
        out.append((i, name.strip(), value.strip()))
    return out


def _number(value: str, option: str, i: int, part: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{option}: part {i} {part!r}: {value!r} is not a number", param=option) from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{option}: part {i} {part!r}: value must be > 0, got {value!r}", param=option)
    return number


def parse_mix(spec: str) -> list[MixEntry]:
    """Parse ``--mix`` like ``base=0.5,my-adapter=0.5`` into weighted entries.

    Args:
        spec: Comma-separated ``MODEL=WEIGHT`` parts; weights are positive and need not sum to 1.

    Returns:
        One :class:`MixEntry` per part, in order.

    Raises:
        ConfigError: Naming the part that is malformed, non-positive or repeated.
    """
    entries, seen = [], set()
    for i, name, value in _pairs(spec, "--mix"):
        part = f"{name}={value}"
        if name in seen:
            raise ConfigError(f"--mix: part {i} {part!r}: model {name!r} appears twice", param="--mix")
        seen.add(name)
        entries.append(MixEntry(model=name, weight=_number(value, "--mix", i, part)))
    return entries


def parse_slo(spec: str) -> Slo:
    """Parse ``--slo`` like ``ttft_ms=500,tpot_ms=50,e2e_ms=5000``.

    Raises:
        ConfigError: Naming the part with an unknown key, a repeated key or a bad number.
    """
    values: dict[str, float] = {}
    for i, key, value in _pairs(spec, "--slo"):
        part = f"{key}={value}"
        if key not in Slo.model_fields:
            known = ", ".join(Slo.model_fields)
            raise ConfigError(f"--slo: part {i} {part!r}: unknown key {key!r} (known: {known})", param="--slo")
        if key in values:
            raise ConfigError(f"--slo: part {i} {part!r}: {key!r} appears twice", param="--slo")
        values[key] = _number(value, "--slo", i, part)
    return Slo(**values)


def parse_levels(spec: str) -> list[float]:
    """Parse ``--levels`` like ``1,4,16`` (concurrencies) or ``0.5,2`` (requests/s).

    Raises:
        ConfigError: Naming the part that is not a positive number.
    """
    if not spec or not spec.strip():
        raise ConfigError("--levels: empty spec", param="--levels")
    parts = [p.strip() for p in spec.split(",")]
    return [_number(p, "--levels", i, p) for i, p in enumerate(parts, start=1)]
