"""Shared fixtures: offline mode, the tiny model, random adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.processes import free_port  # noqa: F401 (re-exported for the test modules)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "data" / "models"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The 2-layer random Llama (built once by `make setup`, rebuilt here if missing)."""
    from cluster.models import TINY_LLAMA, build_model

    return build_model(TINY_LLAMA, MODELS)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three random LoRA adapters for the tiny model (PEFT folders, not yet registered)."""
    from cluster.models import make_random_lora

    root = tmp_path_factory.mktemp("adapters-src")
    return {name: make_random_lora(tiny_model, root / name, seed=seed)
            for seed, name in enumerate(["alpha", "beta", "gamma", "delta"], start=1)}
