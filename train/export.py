"""Adapter export: the trained LoRA as a PEFT folder, registered as the next adapter version.

Two halves, because they run in different processes:

* :func:`save_adapter` runs on **every** training worker at the end (rank 0 writes). Under
  ZeRO-3 each rank holds only a shard of every parameter (an empty tensor locally), so the LoRA
  parameters are gathered with ``deepspeed.zero.GatheredParameters`` — a collective, hence on all
  ranks — before rank 0 copies them out; without it the saved tensors are empty.
* :func:`register_adapter` runs on the driver after ``trainer.fit()``: it copies the folder from
  the final Ray Train checkpoint into the adapter store via ``AdapterRegistry.register`` with a
  manifest (base model, dataset hash, config, metrics).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from serve.registry import AdapterRef, AdapterRegistry

__all__ = ["ADAPTER_DIR", "build_manifest", "gather_lora_state", "register_adapter", "save_adapter", "write_adapter"]

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # sub-folder of the final checkpoint that holds the PEFT adapter


def _trainable(module) -> dict[str, Any]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def gather_lora_state(engine, *, rank: int, zero_stage: int) -> dict[str, Any] | None:
    """The trainable (LoRA) parameters as full fp32 CPU tensors on rank 0, ``None`` elsewhere.

    Must be called on all ranks: under ZeRO-3 the gather is a collective.
    """
    import deepspeed
    import torch

    params = _trainable(engine.module)
    gather = (deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
              if zero_stage == 3 else nullcontext())
    with gather:
        # fp32 whatever the training precision: serving casts to its own dtype anyway.
        state = ({name: p.detach().to(torch.float32).cpu().clone() for name, p in params.items()}
                 if rank == 0 else None)
    if state is not None:
        empty = [name for name, t in state.items() if t.numel() == 0]
        if empty:
            raise RuntimeError(f"adapter export: {len(empty)} LoRA tensors are empty (e.g. {empty[0]}); "
                               "ZeRO-3 parameters were not gathered")
    return state


def write_adapter(engine, state: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``state`` (from :func:`gather_lora_state`) as a PEFT adapter folder (safetensors)."""
    out = Path(out_dir)
    # peft filters the adapter's keys out of this state dict and strips the adapter name.
    engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    return out


def save_adapter(engine, out_dir: str | Path, *, rank: int, zero_stage: int) -> Path | None:
    """Write the engine's current LoRA weights as a PEFT adapter folder from rank 0 (all ranks call).

    Returns:
        The folder on rank 0, ``None`` elsewhere.
    """
    state = gather_lora_state(engine, rank=rank, zero_stage=zero_stage)
    return write_adapter(engine, state, out_dir) if state is not None else None


def build_manifest(config, *, metrics: dict, data_stats: dict, dataset_hash: str,
                   base_model_path: str, checkpoint: str | None, tracking: dict | None = None) -> dict:
    """What the store records with a version: enough to reproduce and audit the adapter.

    ``exported`` says which weights the folder holds (``best``: the step with the lowest eval
    loss; ``last``: the final step) with that step and its eval loss; ``tracking`` is the MLflow
    run (id, tracking URI, experiment) the version came from.
    """
    return {
        "exported": {"select": metrics.get("exported_select"), "step": metrics.get("exported_step"),
                     "eval_loss": metrics.get("exported_eval_loss")},
        "tracking": tracking,
        "base_model_path": base_model_path,
        "dataset_hash": dataset_hash,
        "dataset": data_stats,
        "train_config": config.model_dump(mode="json"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)},
        "run_name": config.run.name,
        "checkpoint": checkpoint,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _registered_from(registry: AdapterRegistry, name: str, checkpoint: str | None) -> AdapterRef | None:
    """The version already registered from ``checkpoint``, if any (export is idempotent)."""
    if checkpoint is None:
        return None
    for entry in registry.list():
        if entry["name"] != name:
            continue
        for version in entry["versions"]:
            ref = registry.resolve(f"{name}@{version}")
            if registry.manifest(ref).get("checkpoint") == checkpoint:
                return ref
    return None


def register_adapter(config, adapter_dir: str | Path, manifest: dict, base_model_path: str) -> AdapterRef:
    """Register ``adapter_dir`` as the next version of ``config.export.adapter_name``.

    A run resubmitted after it finished ends on the same final checkpoint; that checkpoint's
    version is returned instead of registering a duplicate.
    """
    registry = AdapterRegistry(config.export.store, base_model=config.base_model,
                               base_model_path=base_model_path, max_lora_rank=config.export.max_lora_rank)
    name = config.export.adapter_name
    ref = _registered_from(registry, name, manifest.get("checkpoint"))
    if ref is not None:
        logger.info("run %s: checkpoint already registered as %s", config.run.name, ref.key)
        return ref
    ref = registry.register(adapter_dir, name, owner=config.export.owner, promote=config.export.promote,
                            manifest=manifest)
    logger.info("run %s: registered adapter %s (lora_id %s) in %s", config.run.name, ref.key, ref.lora_id,
                config.export.store)
    return ref
