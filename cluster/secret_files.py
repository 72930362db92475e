"""Secrets by reference: config fields filled from mounted files at application build time.

A rendered Kubernetes manifest must not carry API-key digests or the Milvus token, so the Serve
``args`` name *files* instead (Kubernetes Secrets mounted into every Ray pod)::

    {"config": {...}, "secret_files": {
        "serve.auth.keys":        {"path": "/var/run/secrets/ragtune/api-keys/keys.yaml", "format": "yaml"},
        "retrieval.milvus.token": {"path": "/var/run/secrets/ragtune/milvus/token", "format": "text"}}}

:func:`apply_secret_files` reads each file and sets the dotted config field before pydantic
validation, so a missing or malformed Secret fails the build with the field and file named.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from cluster.errors import ConfigError
from cluster.schema import StrictModel

__all__ = ["SecretFile", "apply_secret_files", "parse_secret_files"]


class SecretFile(StrictModel):
    """One config field whose value is the content of a mounted file."""

    path: str = Field(min_length=1, description="Absolute path of the mounted Secret key (a file).")
    format: Literal["text", "yaml"] = Field("text", description="text: the stripped file content; yaml: parsed YAML.")


def parse_secret_files(raw: Mapping[str, Any] | None) -> dict[str, SecretFile]:
    """Validate the ``secret_files`` mapping of dotted field → :class:`SecretFile`."""
    out: dict[str, SecretFile] = {}
    for field, spec in (raw or {}).items():
        try:
            out[field] = SecretFile.model_validate(spec)
        except ValidationError as exc:
            raise ConfigError(f"secret_files.{field}: {exc.errors()[0]['msg']}", param=f"secret_files.{field}") from None
    return out


def _read(field: str, spec: SecretFile) -> Any:
    path = Path(spec.path)
    if not path.is_file():
        raise ConfigError(f"secret_files.{field}: {path} does not exist (is the Secret mounted on this pod?)",
                          param=field)
    text = path.read_text()
    if spec.format == "text":
        value = text.strip()
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"secret_files.{field}: {path} is not valid YAML: {exc}", param=field) from None
    if value in (None, "", []):
        raise ConfigError(f"secret_files.{field}: {path} is empty", param=field)
    return value


def _set(data: dict[str, Any], field: str, value: Any) -> None:
    node = data
    *parents, leaf = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"secret_files.{field}: config section {part} is not a mapping", param=field)
    node[leaf] = value


def apply_secret_files(config: Mapping[str, Any], secret_files: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of the config dict with every referenced field set from its file.

    Args:
        config: the raw config dict (as in Serve ``args["config"]``).
        secret_files: dotted field → ``{"path", "format"}``.

    Raises:
        ConfigError: a spec is invalid, a file is missing, empty or not valid YAML.
    """
    data = copy.deepcopy(dict(config))
    for field, spec in parse_secret_files(secret_files).items():
        _set(data, field, _read(field, spec))
    return data
