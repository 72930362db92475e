"""Launch: validate and tokenise on the driver, run the recipe on a ``TorchTrainer``, export.

Everything that can fail without a worker fails here first: the config (pydantic), the base
model, every dataset line, the cluster's CPUs/GPUs. Workers then get the tokenised data through
the object store and never open the JSONL files.

Resume is by name: ``RunConfig(name, storage_path)`` of a run that already has checkpoints makes
Ray Train V2 restore it, and ``ray.train.get_checkpoint()`` in the recipe returns the latest one —
after a worker dies (``FailureConfig.max_failures``) or when the same config is submitted again.
A run folder records what its checkpoints were trained with (``ragtune-run.json``: base model,
LoRA shape); a resubmission whose config would load them into a different model is refused
before anything starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import ConfigError
from cluster.models import resolve_model
from serve.registry import AdapterRef
from train import tracking
from train.config import TrainConfig, check_context
from train.data import DataStats, Example, dataset_hash, load_examples, pack_examples, split_eval
from train.export import ADAPTER_DIR, build_manifest, register_adapter

__all__ = ["Prepared", "TrainOutcome", "build_trainer", "check_resources", "check_resume_compatible", "launch",
           "prepare", "resolve_paths", "run_fingerprint"]

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Driver-side results handed to the workers."""

    model_path: str
    pad_id: int
    train: list[Example] | list[list[Example]]  # packs of examples with data.packing
    eval: list[Example]
    stats: DataStats
    dataset_hash: str


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    run_name: str
    metrics: dict
    checkpoint: str | None
    adapter: AdapterRef | None
    data_stats: dict = field(default_factory=dict)
    tracking: dict | None = None  # the MLflow run: run_id, tracking_uri, experiment, experiment_id


def _absolute(value: str, base: Path) -> str:
    return value if "://" in value or Path(value).is_absolute() else str((base / value).resolve())


def resolve_paths(cfg: TrainConfig, base: Path | None = None) -> TrainConfig:
    """Make local paths absolute against ``base`` (default: cwd): workers run in other directories."""
    base = base or Path.cwd()
    raw = cfg.model_dump()
    for key in ("models_dir", "torch_extensions_dir"):
        raw[key] = _absolute(raw[key], base)
    raw["data"]["paths"] = [_absolute(p, base) for p in raw["data"]["paths"]]
    for section, key in (("data", "eval_path"), ("run", "storage_path"), ("run", "tensorboard_dir"),
                         ("export", "store")):
        if raw[section][key] is not None:
            raw[section][key] = _absolute(raw[section][key], base)
    if (base / cfg.base_model).is_dir():  # a local folder rather than a packaged name or HF id
        raw["base_model"] = str((base / cfg.base_model).resolve())
    return TrainConfig.model_validate(raw)


def prepare(cfg: TrainConfig) -> Prepared:
    """Resolve the base model and tokenise every dataset line (fails with ``file:line``)."""
    from transformers import AutoConfig, AutoTokenizer

    model_path = resolve_model(cfg.base_model, Path(cfg.models_dir))
    check_context(cfg, getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        raise ConfigError(f"base_model {cfg.base_model!r} has no chat template to format examples with",
                          param="base_model")
    opts = {"fmt": cfg.data.format, "max_seq_len": cfg.data.max_seq_len, "skip_bad_lines": cfg.data.skip_bad_lines}
    examples, stats = load_examples(cfg.data.paths, tokenizer, **opts)
    if cfg.data.eval_path:
        train, (held, _) = examples, load_examples([cfg.data.eval_path], tokenizer, **opts)
    else:
        train, held = split_eval(examples, cfg.data.eval_fraction, cfg.run.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    paths = [*cfg.data.paths, *([cfg.data.eval_path] if cfg.data.eval_path else [])]
    logger.info("run %s: %d train / %d eval examples, %d truncated, %d bad lines skipped, %d dropped",
                cfg.run.name, len(train), len(held), stats.truncated, stats.skipped_bad_lines, stats.dropped_no_target)
    if cfg.data.packing:
        train = pack_examples(train, cfg.pack_length, cfg.run.seed)
        logger.info("run %s: packed into %d rows of <= %d tokens", cfg.run.name, len(train), cfg.pack_length)
    return Prepared(str(model_path), pad_id, train, held, stats, dataset_hash(paths))


# ---- resume compatibility ------------------------------------------------------------------
_FINGERPRINT = "ragtune-run.json"


def run_fingerprint(cfg: TrainConfig) -> dict:
    """What a run's checkpoints depend on: loading them into anything else is wrong or fails."""
    return {"base_model": cfg.base_model, "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
            "lora.target_modules": sorted(cfg.lora.target_modules)}


def _run_dir(cfg: TrainConfig):
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(cfg.run.storage_path)  # local absolute paths, s3://, gs://…
    return filesystem, f"{root.rstrip('/')}/{cfg.run.name}"


def check_resume_compatible(cfg: TrainConfig) -> None:
    """Refuse a resubmission whose base model or LoRA shape differs from its checkpoints'; record
    the fingerprint of a new run.

    Raises:
        ConfigError: naming the first field that differs and both values.
    """
    from pyarrow import fs

    filesystem, run_dir = _run_dir(cfg)
    path, mine = f"{run_dir}/{_FINGERPRINT}", run_fingerprint(cfg)
    if filesystem.get_file_info(path).type == fs.FileType.File:
        with filesystem.open_input_stream(path) as fh:
            theirs = json.loads(fh.read())
        for key, value in mine.items():
            if key in theirs and theirs[key] != value:
                raise ConfigError(f"train config: {key}={value!r}, but run {cfg.run.name!r} in {cfg.run.storage_path} "
                                  f"has checkpoints trained with {key}={theirs[key]!r}; resuming would load them into "
                                  "a different model. Use a new run.name, or the original value", param=key)
        return
    filesystem.create_dir(run_dir, recursive=True)
    with filesystem.open_output_stream(path) as fh:
        fh.write(json.dumps(mine, indent=2).encode())


def check_resources(cfg: TrainConfig) -> None:
    """Fail now, naming the field, if the connected cluster cannot ever place the workers."""
    import ray

    if not (cfg.scaling.check_resources and ray.is_initialized()):
        return
    have = ray.cluster_resources()
    n = cfg.scaling.num_workers
    need_cpu = n * cfg.scaling.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise ConfigError(f"train config: scaling.num_workers={n} x scaling.cpus_per_worker="
                          f"{cfg.scaling.cpus_per_worker} needs {need_cpu:g} CPUs; the cluster has "
                          f"{have.get('CPU', 0):g}", param="scaling.num_workers")
    if cfg.scaling.use_gpu and n * cfg.scaling.gpus_per_worker > have.get("GPU", 0):
        raise ConfigError(f"train config: scaling.use_gpu=true needs {n * cfg.scaling.gpus_per_worker:g} GPUs; "
                          f"the cluster has {have.get('GPU', 0):g}", param="scaling.use_gpu")


def build_trainer(cfg: TrainConfig, prepared: Prepared, run: tracking.TrackedRun | None = None):
    """The ``TorchTrainer`` for ``cfg``; data goes through the object store."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from train.recipe import train_loop

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    if s.memory_per_worker_gb:
        resources["memory"] = int(s.memory_per_worker_gb * 2**30)
    env = {"OMP_NUM_THREADS": str(s.threads_per_worker), "TORCH_EXTENSIONS_DIR": cfg.torch_extensions_dir}
    loop_config = {"config": cfg.model_dump(mode="json"), "model_path": prepared.model_path,
                   "pad_id": prepared.pad_id, "data": ray.put({"train": prepared.train, "eval": prepared.eval}),
                   "tracking": run.as_dict() if run is not None else None}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=cfg.backend),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            worker_runtime_env={"env_vars": env}),
    )


def launch(cfg: TrainConfig) -> TrainOutcome:
    """Run ``cfg`` on the connected Ray cluster and register the adapter; returns the outcome.

    Raises:
        ConfigError / DatasetError: before any worker starts.
        ray.train.TrainingFailedError: when the workers fail more than ``run.max_failures`` times.
    """
    cfg = resolve_paths(cfg)
    check_resume_compatible(cfg)  # first: cheap, and a refused resubmission should not tokenise anything
    prepared = prepare(cfg)
    check_resources(cfg)
    run = tracking.start_run(cfg, dataset_hash=prepared.dataset_hash, data_stats=prepared.stats.as_dict(),
                             base_model_path=prepared.model_path)
    try:
        result = build_trainer(cfg, prepared, run).fit()
    except BaseException:
        tracking.finish_run(run, status="FAILED")
        raise
    metrics = dict(result.metrics or {})
    checkpoint = result.checkpoint.path if result.checkpoint else None
    outcome = TrainOutcome(cfg.run.name, metrics, checkpoint, None, prepared.stats.as_dict(),
                           run.as_dict() if run else None)
    if not cfg.export.enabled:
        tracking.finish_run(run, status="FINISHED")
        return outcome
    with result.checkpoint.as_directory() as path:
        manifest = build_manifest(cfg, metrics=metrics, data_stats=outcome.data_stats,
                                  dataset_hash=prepared.dataset_hash, base_model_path=prepared.model_path,
                                  checkpoint=checkpoint, tracking=outcome.tracking)
        outcome.adapter = register_adapter(cfg, Path(path) / ADAPTER_DIR, manifest, prepared.model_path)
        tracking.finish_run(run, status="FINISHED", adapter_dir=Path(path) / ADAPTER_DIR,
                            adapter_key=outcome.adapter.key, summary=manifest["exported"])
    return outcome
