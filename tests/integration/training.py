"""The tiny training recipe the training tests share (tests/integration/test_train*.py, tests/faults/test_train*.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "train" / "configs" / "tiny-test.yaml"


def tiny_config(workdir: Path, name: str, *overrides: str) -> TrainConfig:
    """The tiny recipe as run ``name``, writing under ``workdir``, with ``overrides`` (``key=value``) last."""
    return load_config(TINY_YAML, [
        f"run.name={name}", f"run.storage_path={workdir}/results", f"export.store={workdir}/adapters",
        f"models_dir={REPO}/data/models", f"torch_extensions_dir={REPO}/data/torch_extensions",
        f"data.paths=[{REPO}/train/examples/ragtune-style.jsonl]", "export.adapter_name=" + name, *overrides])


def checkpoint_metrics(run_dir: Path, missing_ok: bool = False) -> dict[int, dict]:
    """Step → reported metrics of the run's kept checkpoints, in step order (Ray Train's snapshot in
    storage). ``missing_ok``: ``{}`` while the snapshot is not written yet or being rewritten (polling)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        if missing_ok:
            return {}
        raise
    metrics = sorted((c["metrics"] for c in snapshot["checkpoint_results"]), key=lambda m: m["step"])
    return {m["step"]: m for m in metrics}


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 600, every_s: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} within {timeout_s:.0f}s")
