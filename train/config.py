"""``TrainConfig``: every knob of a fine-tuning run, validated before any worker starts.

One YAML file (see ``train/configs/*.yaml``) plus ``--set section.key=value`` overrides. Field
errors name the dotted field (pydantic's ``loc``); cross-field rules raise :class:`ConfigError`
whose ``param`` is the offending field, e.g. ``deepspeed.offload_params``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.config import apply_overrides, format_validation_error
from cluster.errors import ConfigError
from cluster.schema import StrictModel

__all__ = [
    "DataSettings",
    "DebugSettings",
    "DeepSpeedSettings",
    "EvalSettings",
    "ExportSettings",
    "LoraSettings",
    "OptimSettings",
    "RunSettings",
    "ScalingSettings",
    "TrackingSettings",
    "TrainConfig",
    "check_context",
    "load_config",
]

# The adapter registry's name rule (serve/registry.py): checked here so a bad name fails before
# hours of training rather than at export.
_ADAPTER_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# vLLM serves LoRA only on linear projections; the registry rejects these targets.
_UNSERVABLE_TARGETS = {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out"}


class DataSettings(StrictModel):
    """Where the examples come from and how they become token sequences."""

    paths: list[str] = Field(min_length=1, description="JSONL training files (relative to the working directory).")
    format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca"] = Field(
        "auto", description="Record format; 'auto' picks per line from its keys (messages / conversations / "
                            "prompt+completion / instruction+output). chat includes tool calls (tool_calls, role tool).")
    max_seq_len: int = Field(512, ge=16, le=131072, description="Token cap per example; longer ones are truncated (counted).")
    skip_bad_lines: bool = Field(False, description="Skip and count malformed lines instead of failing at the first one.")
    eval_path: str | None = Field(None, description="Held-out JSONL file for eval loss (exclusive with eval_fraction).")
    eval_fraction: float = Field(0.0, ge=0.0, le=0.5, description="Fraction of the training examples held out for eval.")
    packing: bool = Field(False, description="Pack several examples into one row (position ids restart per example, "
                                             "attention stays inside it); run.micro_batch_size then counts packed rows.")
    pack_length: int | None = Field(
        None, ge=16, description="Tokens per packed row (None = data.max_seq_len); must fit the base model's context.")


class LoraSettings(StrictModel):
    """The LoRA adapter (peft ``LoraConfig``)."""

    r: int = Field(8, ge=1, le=256, description="LoRA rank; must not exceed export.max_lora_rank (the server's).")
    alpha: int = Field(16, ge=1, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="Linear module names to adapt (Llama: q/k/v/o_proj, gate/up/down_proj).")


class DeepSpeedSettings(StrictModel):
    """DeepSpeed engine: ZeRO stage, precision, offload, accumulation, clipping."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 plain DDP, 1 optimizer, 2 +gradients, 3 +parameters sharded.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision (bf16 keeps fp32 master weights).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (ZeRO 1-3; useful on GPUs only).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO-3 only).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    gradient_clipping: float = Field(1.0, ge=0.0, description="Global gradient-norm clip; 0 disables.")
    stage3_param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: parameters smaller than this many elements stay unsharded (None = DeepSpeed default).")
    optimizer_impl: Literal["torch", "deepspeed"] = Field(
        "torch", description="'torch' = torch.optim.AdamW (no C++ build); 'deepspeed' = FusedAdam/CPUAdam, JIT-compiled on first use (minutes).")


class OptimSettings(StrictModel):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup, to 0 at the last step.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over this many optimizer steps.")


class EvalSettings(StrictModel):
    """Eval loss on the held-out split and early stopping."""

    every_steps: int = Field(50, ge=1, description="Run eval every N optimizer steps (and at the end).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evals without improvement (None = never stop early).")
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="An eval loss must drop by more than this to count as better.")


class ScalingSettings(StrictModel):
    """Ray Train workers and their resources."""

    num_workers: int = Field(2, ge=1, le=4096, description="Data-parallel workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); False trains on CPU (gloo).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend; auto = nccl on GPU, gloo on CPU.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs reserved per worker when use_gpu.")
    memory_per_worker_gb: float | None = Field(None, gt=0.0, description="Heap memory reserved per worker in GiB (None = no reservation).")
    threads_per_worker: int = Field(1, ge=1, le=256, description="Torch/OpenMP threads per worker (1 per core is right on CPU).")
    check_resources: bool = Field(True, description="Fail early if the cluster lacks the CPUs/GPUs asked for (turn off with an autoscaler).")


class RunSettings(StrictModel):
    """Run identity, storage, fault tolerance, reporting."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Run name; a resubmitted run with the same name and storage resumes.")
    storage_path: str = Field("data/ray_results", description="Ray Train storage (local path, NFS, or s3://...); shared on multi-node.")
    micro_batch_size: int = Field(4, ge=1, le=4096, description="Examples per worker per micro-batch.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train; overrides epochs.")
    seed: int = Field(0, description="Seed for LoRA init, shuffling and the eval split.")
    report_every_steps: int = Field(10, ge=1, description="ray.train.report metrics + a progress log line every N steps.")
    checkpoint_every_steps: int = Field(100, ge=1, description="DeepSpeed checkpoint (LoRA + optimizer + step) every N steps and at the end.")
    num_to_keep: int | None = Field(2, ge=1, description="Checkpoints kept in storage (None = all).")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = unlimited).")
    tensorboard_dir: str | None = Field(None, description="TensorBoard event dir written by rank 0 (None = off).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less activation memory, ~30% more compute.")


class ExportSettings(StrictModel):
    """Where the finished adapter goes."""

    enabled: bool = Field(True, description="Save the adapter and register it in the store when training succeeds.")
    adapter_name: str = Field(pattern=_ADAPTER_NAME, description="Adapter name in the store; each run adds the next version.")
    store: str = Field("data/adapters", description="Adapter store folder (serve's adapters.store_uri).")
    promote: bool | None = Field(None, description="Promote the new version (None = only if it is the first).")
    owner: str | None = Field(None, description="Tenant that owns the adapter (None = shared).")
    max_lora_rank: int = Field(16, ge=1, description="The server's max_lora_rank; lora.r above it fails before training.")
    select: Literal["best", "last"] = Field(
        "best", description="Which weights become the adapter: 'best' = the lowest eval loss seen (what early "
                            "stopping kept), 'last' = the final step. Without an eval split 'best' is the last.")


class TrackingSettings(StrictModel):
    """Experiment tracking (MLflow): params, per-step metrics, data hash, the adapter as an artifact."""

    mlflow: bool = Field(True, description="Track the run in MLflow (rank 0 logs metrics; the driver logs the rest).")
    uri: str | None = Field(
        None, description="MLflow tracking URI (http://HOST:5000, sqlite:///path.db); None = a SQLite store "
                          "<run.storage_path>/mlflow/mlflow.db with artifacts beside it (local storage only).")
    experiment: str = Field("ragtune-train", min_length=1, description="MLflow experiment name.")


class DebugSettings(StrictModel):
    """Fault injection for tests."""

    fail_at_step: int | None = Field(
        None, ge=1, description="Raise on rank fail_rank when this step is reached, unless the run resumed from a checkpoint.")
    fail_rank: int = Field(0, ge=0, description="Worker rank that raises for fail_at_step.")


class TrainConfig(StrictModel):
    """A whole fine-tuning run. Sections mirror the YAML layout."""

    base_model: str = Field(description="Packaged model name (smollm2-135m-instruct, tiny-llama), a local folder or an HF id.")
    models_dir: str = Field("data/models", description="Where packaged base models are built and found.")
    torch_extensions_dir: str = Field("data/torch_extensions", description="Cache for DeepSpeed's JIT-compiled C++ ops.")
    data: DataSettings = Field(description="Dataset files and tokenisation.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter shape.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="DeepSpeed engine.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimizer and schedule.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Eval and early stopping.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Workers and resources.")
    run: RunSettings = Field(description="Run identity, storage, checkpoints.")
    export: ExportSettings = Field(description="Adapter export.")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="Experiment tracking.")
    debug: DebugSettings = Field(default_factory=DebugSettings, description="Fault injection (tests).")

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        for check in (_check_deepspeed, _check_scaling, _check_eval, _check_lora, _check_debug, _check_data,
                      _check_tracking):
            check(self)
        return self

    @property
    def has_eval(self) -> bool:
        """Whether a held-out split exists."""
        return self.data.eval_path is not None or self.data.eval_fraction > 0

    @property
    def pack_length(self) -> int:
        """Tokens per packed row (``data.pack_length`` or ``data.max_seq_len``)."""
        return self.data.pack_length or self.data.max_seq_len

    @property
    def backend(self) -> str:
        """The resolved torch.distributed backend."""
        if self.scaling.backend != "auto":
            return self.scaling.backend
        return "nccl" if self.scaling.use_gpu else "gloo"


def _fail(param: str, message: str) -> None:
    raise ConfigError(f"train config: {param}: {message}", param=param)


def _check_deepspeed(c: TrainConfig) -> None:
    ds = c.deepspeed
    if ds.offload_params and ds.zero_stage != 3:
        _fail("deepspeed.offload_params", f"needs deepspeed.zero_stage=3 (got {ds.zero_stage})")
    if ds.offload_optimizer and ds.zero_stage == 0:
        _fail("deepspeed.offload_optimizer", "needs deepspeed.zero_stage 1, 2 or 3 (got 0)")
    if ds.stage3_param_persistence_threshold is not None and ds.zero_stage != 3:
        _fail("deepspeed.stage3_param_persistence_threshold", f"applies to zero_stage=3 only (got {ds.zero_stage})")


def _check_scaling(c: TrainConfig) -> None:
    if c.scaling.backend == "nccl" and not c.scaling.use_gpu:
        _fail("scaling.backend", "nccl needs scaling.use_gpu=true; CPU training uses gloo")


def _check_eval(c: TrainConfig) -> None:
    if c.data.eval_path is not None and c.data.eval_fraction > 0:
        _fail("data.eval_fraction", "set either data.eval_path or data.eval_fraction, not both")
    if c.eval.early_stopping_patience is not None and not c.has_eval:
        _fail("eval.early_stopping_patience", "needs a held-out split (data.eval_path or data.eval_fraction > 0)")


def _check_lora(c: TrainConfig) -> None:
    bad = sorted(_UNSERVABLE_TARGETS & set(c.lora.target_modules))
    if bad:
        _fail("lora.target_modules", f"{bad} cannot be served as LoRA by vLLM; adapt linear projections only")
    if c.export.enabled and c.lora.r > c.export.max_lora_rank:
        _fail("lora.r", f"r={c.lora.r} exceeds export.max_lora_rank={c.export.max_lora_rank} (the server would refuse it)")


def _check_debug(c: TrainConfig) -> None:
    if c.debug.fail_rank >= c.scaling.num_workers:
        _fail("debug.fail_rank", f"{c.debug.fail_rank} is not a rank of {c.scaling.num_workers} workers")


def _check_data(c: TrainConfig) -> None:
    if c.data.pack_length is not None and not c.data.packing:
        _fail("data.pack_length", "applies to data.packing=true only")
    if c.data.packing and c.pack_length < c.data.max_seq_len:
        _fail("data.pack_length", f"{c.pack_length} is shorter than data.max_seq_len={c.data.max_seq_len}: "
                                  "a full-length example would not fit a packed row")


def _check_tracking(c: TrainConfig) -> None:
    if c.tracking.mlflow and c.tracking.uri is None and "://" in c.run.storage_path:
        _fail("tracking.uri", f"run.storage_path={c.run.storage_path!r} is remote; give an MLflow server URI "
                              "(the default SQLite store needs a local path) or set tracking.mlflow=false")


def check_context(c: TrainConfig, max_positions: int | None) -> None:
    """Sequence lengths against the base model's context (``max_position_embeddings``), on the driver.

    Raises:
        ConfigError: naming ``data.pack_length`` or ``data.max_seq_len``.
    """
    if max_positions is None:
        return
    if c.data.packing and c.pack_length > max_positions:
        field = "data.pack_length" if c.data.pack_length else "data.max_seq_len"
        _fail(field, f"packed rows of {c.pack_length} tokens exceed the base model's context of "
                     f"{max_positions} positions (max_position_embeddings)")
    if c.data.max_seq_len > max_positions:
        _fail("data.max_seq_len", f"{c.data.max_seq_len} exceeds the base model's context of {max_positions} "
                                  "positions (max_position_embeddings)")


# ---- loading -------------------------------------------------------------------------------
def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML file (or a dict), apply ``section.key=value`` overrides, validate.

    Raises:
        ConfigError: the message lists every invalid field; ``param`` is the first one.
    """
    if isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # deep copy: overrides must not mutate the caller's dict
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"train config {path} does not exist", param="config")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"train config {path}: the top level must be a mapping", param="config")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "config"
        raise ConfigError(f"train config:\n{format_validation_error(exc, '  ')}", param=first) from None
