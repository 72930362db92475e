"""The one YAML config file: composition of every component's model, plus CLI overrides.

``load_config("ragtune.yaml", ["serve.engine.dtype=bfloat16"])`` reads the file (or embedded
defaults when no file is given), applies ``--set`` overrides, validates, and resolves relative
paths against the current directory. Errors name the field, the value and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.errors import ConfigError
from cluster.schema import StrictModel
from retrieval.config import RetrievalConfig
from serve.config import ServeConfig

__all__ = ["RagtuneConfig", "RayConfig", "apply_overrides", "format_validation_error", "load_config"]


class RayConfig(StrictModel):
    """Where Ray runs. No address: a local single-node Ray started by ``ragtune``."""

    address: str | None = Field(None, description="Existing cluster: 'auto', 'ray://host:10001' or a GCS 'host:6379'. None starts a local one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray advertises (None: all).")
    dashboard_host: str = Field("127.0.0.1", description="Dashboard/Jobs API bind address for a local Ray (loopback unless you mean it).")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Dashboard/Jobs API port for a local Ray.")


class MilvusLiteServerConfig(StrictModel):
    """Local knowledge store shared by several processes (retriever replicas, ``ragtune ingest``)."""

    enabled: bool = Field(True, description="When retrieval.milvus.uri is a Lite file path, `ragtune up` runs milvus-lite's server mode instead and every client connects by URI.")
    port: int = Field(19530, ge=1, le=65535, description="Loopback port of the milvus-lite server.")


class RagtuneConfig(StrictModel):
    """Everything ``ragtune up`` runs. Training jobs have their own config (``train/config.py``)."""

    data_dir: str = Field("./data", description="Models, adapter store and Milvus Lite files (local setup).")
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    milvus_lite: MilvusLiteServerConfig = Field(default_factory=MilvusLiteServerConfig)

    @model_validator(mode="after")
    def _dashboard_exposure(self) -> RagtuneConfig:
        # The dashboard serves Ray's Jobs API (run any command): beyond loopback only on purpose,
        # with keys configured for the API beside it (Ray's own token auth stays on, DESIGN.md).
        from cluster.exposure import resolves_to_loopback

        if self.ray.address is None and not self.serve.auth.keys and not resolves_to_loopback(self.ray.dashboard_host):
            raise ValueError(
                f"ray.dashboard_host={self.ray.dashboard_host!r} exposes the Ray dashboard and Jobs API beyond "
                "loopback while serve.auth.keys is empty; bind it to 127.0.0.1 or configure keys")
        return self

    @property
    def models_dir(self) -> Path:
        return Path(self.data_dir) / "models"

    def resolved(self, base: Path | None = None) -> RagtuneConfig:
        """A copy with relative local paths made absolute (Ray workers may run elsewhere)."""
        base = base or Path.cwd()
        cfg = self.model_copy(deep=True)
        cfg.data_dir = str((base / cfg.data_dir).resolve())
        store = cfg.serve.adapters.store_uri
        if "://" not in store:
            cfg.serve.adapters.store_uri = str((base / store).resolve())
        if self.uses_milvus_lite_file:
            cfg.retrieval.milvus.uri = str((base / cfg.retrieval.milvus.uri).resolve())
        return cfg

    @property
    def uses_milvus_lite_file(self) -> bool:
        """True when the knowledge store is a local Milvus Lite file (not a server URI)."""
        return "://" not in self.retrieval.milvus.uri

    @property
    def milvus_lite_data_dir(self) -> Path:
        """Where the milvus-lite server keeps its data: next to the configured ``.db`` file."""
        lite = Path(self.retrieval.milvus.uri)
        return lite.with_name(f"{lite.stem}-server")


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: reason (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = f" (got {err['input']!r})" if err.get("type") != "missing" and not isinstance(err.get("input"), dict) else ""
        lines.append(f"{prefix}{loc}: {err['msg']}{got}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value", param="--set")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section", param=key)
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RagtuneConfig:
    """Read, override and validate the config; raise ``ConfigError`` naming the field on failure."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return RagtuneConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"invalid config:\n{format_validation_error(exc, where)}") from None
