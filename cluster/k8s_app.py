"""Serve entry point for Kubernetes: ``serve.app.build_app`` after reading secrets by reference.

The RayService's ``import_path`` is ``cluster.k8s_app:build_app`` and its ``args`` are
``{"config": <RagtuneConfig dict without secrets>, "secret_files": {field: {path, format}}}``.
Secrets (API-key digests, the Milvus token) are mounted files; they are read here, in the Ray
task that builds the application, so they never appear in the RayService object.

Once ``serve.app.build_app`` applies ``secret_files`` itself (see k8s/README.md), the renderer's
``IMPORT_PATH`` becomes ``serve.app:build_app`` and this module can go.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.secret_files import apply_secret_files

__all__ = ["build_app"]


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the ragtune application from Serve ``args`` with secrets read from mounted files.

    Args:
        args: ``{"config": {...}, "secret_files": {...}}`` as the serveConfigV2 passes them.

    Raises:
        ConfigError: a referenced secret file is missing, empty or malformed.
    """
    from serve.app import build_app as build_serve_app

    args = args or {}
    config = apply_secret_files(args.get("config", {}), args.get("secret_files"))
    return build_serve_app({"config": config})
