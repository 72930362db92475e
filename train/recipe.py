"""The LoRA fine-tuning recipe: what each Ray Train worker runs, top to bottom.

    setup (threads, seed, PEFT model, DeepSpeed engine) → resume from the last checkpoint
    → train (micro-batches, accumulation, progress) → eval + early stopping (+ a copy of the best
    LoRA weights) → checkpoint (DeepSpeed state + step + best weights) → export the best (or
    last) adapter with the final checkpoint

No trainer framework: one loop, plain functions. The same code runs on CPUs (gloo) and GPUs
(NCCL): Ray Train has already initialised ``torch.distributed`` and DeepSpeed joins that group.

Data arrives already tokenised (the driver validated it before any worker started); every rank
reads its shard through a ``DistributedSampler``, whose padding gives all ranks the same number
of micro-batches — required, since ZeRO collectives run on every forward/backward.

ZeRO-3 partitions at load: an ``HfDeepSpeedConfig`` alive before ``from_pretrained`` makes
transformers build the model under ``deepspeed.zero.Init``, so no rank ever holds the whole
model; the LoRA parameters are gathered (a collective) whenever the best or final adapter is
copied out.

Elastic resume: a ZeRO checkpoint holds one optimizer partition per data-parallel rank. When
the run resumes on a different number of workers (a cluster that lost a node), every rank
converts its copy to DeepSpeed's *universal* checkpoint (``ds_to_universal``: one fp32 + Adam
moments file per parameter, no partitioning) and loads that with ``checkpoint.load_universal``,
which re-partitions for the new world size. Same world size: the native files, no conversion.

Steps are optimizer steps. The data position is a pure function of the step (micro-batch
``step * grad_accum`` of a seeded, per-epoch shuffle), so a resumed run continues with exactly
the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from train.config import TrainConfig
from train.data import collate, collate_packed
from train.export import ADAPTER_DIR, gather_lora_state, save_adapter, write_adapter
from train.tracking import MetricLogger

__all__ = ["deepspeed_config", "lr_lambda", "train_loop"]

logger = logging.getLogger("train.recipe")
_TAG = "state"  # DeepSpeed checkpoint tag: one per Ray checkpoint folder, so no "latest" lookups
_BEST = "best_lora.safetensors"  # rank 0's copy of the best-eval LoRA weights, in every checkpoint


# ---- setup ---------------------------------------------------------------------------------
def deepspeed_config(cfg: TrainConfig, world_size: int, universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (``universal``: load a universal checkpoint)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if ds.stage3_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
    torch_adam = ds.optimizer_impl == "torch"
    return {
        "train_micro_batch_size_per_gpu": cfg.run.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": cfg.run.micro_batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        # torch_adam: torch.optim.AdamW instead of FusedAdam/CPUAdam, which JIT-compile C++ (minutes).
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": torch_adam}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": not torch_adam,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,  # our own progress lines replace DeepSpeed's
        **({"checkpoint": {"load_universal": True}} if universal else {}),
    }


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak LR at optimizer step ``s``: linear warmup, then constant/linear/cosine."""
    warmup, schedule = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _setup_worker(cfg: TrainConfig) -> tuple[int, int]:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    torch.manual_seed(cfg.run.seed)  # identical LoRA init on every rank
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _param_mb(module) -> float:
    """MiB of parameters this rank holds: under ZeRO-3 its shard (``ds_tensor``) plus any full copy
    still materialised (persistent small parameters, or one not released), else everything."""
    total = 0
    for p in module.parameters():
        shard = getattr(p, "ds_tensor", None)
        total += p.data.numel() * p.element_size() + (shard.numel() * shard.element_size() if shard is not None else 0)
    return total / 2**20


def _build_engine(cfg: TrainConfig, model_path: str, world: int, total_steps: int, universal: bool = False):
    """``(engine, load_stats)``; the engine owns the HfDeepSpeedConfig it was built under."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = deepspeed_config(cfg, world, universal)
    # Join Ray Train's process group now (deepspeed.initialize would later): HfDeepSpeedConfig
    # checks the batch arithmetic against DeepSpeed's view of the world size.
    deepspeed.init_distributed(dist_backend=cfg.backend)
    # Kept alive (transformers holds only a weak reference) until deepspeed.initialize is done.
    hf_ds = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.zero_stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    load = {"load_param_mb_per_rank": _param_mb(model), "load_peak_rss_mb_per_worker": _peak_rss_mb()}
    # No KV cache in training; packed rows also need it off (transformers derives the per-example
    # attention boundaries from position ids only when no cache is passed).
    model.config.use_cache = False
    if cfg.run.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(cfg, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    engine.ragtune_hf_ds_config = hf_ds
    return engine, {**load, "param_mb_per_rank": _param_mb(engine.module)}


def _plan_steps(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """``(micro-batches per epoch per rank, total optimizer steps)``."""
    per_rank = math.ceil(n_train / world)  # DistributedSampler pads every rank to this
    micro_per_epoch = math.ceil(per_rank / cfg.run.micro_batch_size)
    if cfg.run.max_steps is not None:
        return micro_per_epoch, cfg.run.max_steps
    ga = cfg.deepspeed.gradient_accumulation_steps
    return micro_per_epoch, max(1, math.ceil(cfg.run.epochs * micro_per_epoch / ga))


def _collate(items: list, cfg: TrainConfig, pad_id: int) -> tuple[dict, int, int]:
    """``(batch, examples, real tokens)``; ``items`` are examples, or packs of them with packing."""
    if cfg.data.packing:
        flat = [e for pack in items for e in pack]
        return collate_packed(items, pad_id), len(flat), sum(len(e.input_ids) for e in flat)
    batch = collate(items, pad_id)
    return batch, len(items), int(batch["attention_mask"].sum())


def _micro_batches(examples, cfg: TrainConfig, rank: int, world: int, start_micro: int, pad_id: int):
    """Endless ``(epoch, (batch, examples, tokens))`` stream starting at global micro-batch ``start_micro``."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(examples)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.run.seed, drop_last=False)
    bs = cfg.run.micro_batch_size
    per_epoch = math.ceil(len(sampler) / bs)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for b in range(skip, per_epoch):
            yield epoch, _collate([examples[i] for i in order[b * bs:(b + 1) * bs]], cfg, pad_id)
        epoch, skip = epoch + 1, 0


# ---- checkpoint / resume -------------------------------------------------------------------
_CLIENT_KEYS = ("step", "best_eval", "bad_evals", "best_step", "world_size")


def _saved_world(checkpoint) -> int | None:
    """How many ZeRO optimizer partitions ``checkpoint`` holds (None: unpartitioned, e.g. ZeRO-0)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return len(list((Path(path) / _TAG).glob("*_optim_states.pt"))) or None


def _to_universal(state_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint tag folder (in-process, single worker)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(state_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # our checkpoints lack the Megatron-style universal_checkpoint_info: LoRA
                              # parameters are plain (not tensor-parallel), which the injected default says.
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # progress bars and prints, not log lines
        ds_to_universal(args)


def _resume(engine, run: str, rank: int, universal: bool = False) -> dict[str, Any]:
    """Load the latest Ray Train checkpoint of this run, if any; return its client state.

    ``universal``: the checkpoint was written by another number of workers; convert, then load.
    ``best_weights`` (rank 0 only) is the best-eval LoRA copy the checkpoint carried.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "best_eval": None, "bad_evals": 0, "best_step": None, "best_weights": None,
                "resumed": False}
    with checkpoint.as_directory() as path, tempfile.TemporaryDirectory(prefix="ragtune-universal-") as tmp:
        load_dir = path
        if universal:
            _to_universal(Path(path) / _TAG, Path(tmp) / _TAG)
            load_dir = tmp
        # Frozen base weights are not in the checkpoint (exclude_frozen_parameters), hence not strict.
        _, client = engine.load_checkpoint(load_dir, tag=_TAG, load_module_strict=False)
        best = Path(path) / _BEST
        weights = None
        if rank == 0 and best.is_file():
            from safetensors.torch import load_file

            weights = load_file(str(best))
    logger.info("run %s: resumed from %s at step %s%s", run, checkpoint.path, client["step"],
                f" (written by {client.get('world_size')} workers, universal checkpoint)" if universal else "")
    return {"best_step": None, **client, "best_weights": weights, "resumed": True}


def _checkpoint(engine, cfg: TrainConfig, state: dict, metrics: dict, rank: int, final: bool) -> None:
    """All ranks: save DeepSpeed state, the best LoRA copy (rank 0), the adapter when final; report."""
    with tempfile.TemporaryDirectory(prefix="ragtune-ckpt-") as tmp:
        client = {k: state[k] for k in _CLIENT_KEYS}
        engine.save_checkpoint(tmp, tag=_TAG, client_state=client, exclude_frozen_parameters=True)
        if rank == 0 and state["best_weights"] is not None:
            from safetensors.torch import save_file

            save_file(state["best_weights"], str(Path(tmp) / _BEST))
        if final and cfg.export.enabled:
            _export(engine, cfg, state, Path(tmp) / ADAPTER_DIR, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state['step']:07d}")


def _export_choice(cfg: TrainConfig, state: dict, eval_loss: float | None) -> dict[str, Any]:
    """Which weights the adapter gets: the best-eval copy (``export.select=best``) or the last step."""
    if cfg.export.select == "best" and state["best_step"] is not None:
        return {"exported_select": "best", "exported_step": state["best_step"],
                "exported_eval_loss": state["best_eval"]}
    return {"exported_select": "last", "exported_step": state["step"], "exported_eval_loss": eval_loss}


def _export(engine, cfg: TrainConfig, state: dict, out: Path, rank: int) -> None:
    if cfg.export.select == "best" and state["best_step"] is not None:
        # The same decision on every rank (best_step comes from the all-reduced eval loss).
        if rank == 0:
            write_adapter(engine, state["best_weights"], out)
        return
    save_adapter(engine, out, rank=rank, zero_stage=cfg.deepspeed.zero_stage)


# ---- eval and progress ---------------------------------------------------------------------
def _all_reduce(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


@torch.no_grad()
def _evaluate(engine, examples, cfg: TrainConfig, rank: int, world: int, pad_id: int) -> float:
    """Token-weighted mean loss over the held-out split (all ranks, same number of batches)."""
    from torch.utils.data import DistributedSampler

    engine.eval()
    order = list(DistributedSampler(range(len(examples)), num_replicas=world, rank=rank, shuffle=False))
    loss_sum = tokens = 0.0
    # Eval stays unpacked: the same padded batches whatever data.packing says, so eval losses
    # compare across runs.
    for b in range(0, len(order), cfg.run.micro_batch_size):
        batch = collate([examples[i] for i in order[b:b + cfg.run.micro_batch_size]], pad_id)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        n = float((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        loss_sum += float(engine(**batch).loss) * n
        tokens += n
    engine.train()
    loss_sum, tokens = _all_reduce([loss_sum, tokens], engine.device)
    return loss_sum / max(tokens, 1.0)


class _Window:
    """Loss and throughput since the last report."""

    def __init__(self):
        self.start, self.loss, self.micro, self.samples, self.tokens = time.perf_counter(), 0.0, 0, 0, 0

    def add(self, loss: float, samples: int, tokens: int) -> None:
        self.loss += loss
        self.micro += 1
        self.samples += samples
        self.tokens += tokens

    def summary(self, device) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss, micro, samples, tokens = _all_reduce([self.loss, self.micro, self.samples, self.tokens], device)
        (peak_mb,) = _all_reduce([_peak_rss_mb()], device, op=dist.ReduceOp.MAX)
        return {"loss": loss / max(micro, 1), "samples_per_s": samples / elapsed,
                "tokens_per_s": tokens / elapsed, "peak_rss_mb_per_worker": peak_mb, "window_s": elapsed}


def _log_progress(run: str, step: int, total: int, metrics: dict, step_s: float) -> None:
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0, total - step) * step_s))
    logger.info("run %s step %d/%d loss %.4f lr %.2e %.1f samples/s %.0f tok/s eta %s", run, step, total,
                metrics["loss"], metrics["lr"], metrics["samples_per_s"], metrics["tokens_per_s"], eta)


def _tensorboard(cfg: TrainConfig, rank: int):
    if rank != 0 or cfg.run.tensorboard_dir is None:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(Path(cfg.run.tensorboard_dir) / cfg.run.name))


def _inject_failure(cfg: TrainConfig, step: int, rank: int, resumed: bool) -> None:
    if cfg.debug.fail_at_step == step and rank == cfg.debug.fail_rank and not resumed:
        raise RuntimeError(f"debug.fail_at_step: injected failure on rank {rank} at step {step}")


def _early_stop(state: dict, eval_loss: float, cfg: TrainConfig) -> bool:
    """Track the best eval loss (``best_step`` marks a new best); True once ``patience`` evals in a
    row failed to beat it."""
    best = state["best_eval"]
    if best is None or eval_loss < best - cfg.eval.early_stopping_min_delta:
        state["best_eval"], state["bad_evals"], state["best_step"] = eval_loss, 0, state["step"]
    else:
        state["bad_evals"] += 1
    patience = cfg.eval.early_stopping_patience
    return patience is not None and state["bad_evals"] >= patience


def _publish(cfg: TrainConfig, rank: int, writer, tracker: MetricLogger, metrics: dict, total: int,
             steps_done: int) -> None:
    """Rank 0: the progress log line, MLflow metrics and TensorBoard scalars."""
    if rank != 0:
        return
    _log_progress(cfg.run.name, metrics["step"], total, metrics, metrics["train_s"] / max(steps_done, 1))
    tracker.log(metrics, metrics["step"])
    if writer is not None:
        for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "eval_loss"):
            if metrics[key] is not None:
                writer.add_scalar(f"train/{key}", metrics[key], metrics["step"])


# ---- the loop ------------------------------------------------------------------------------
def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    ``loop_config`` holds ``config`` (a ``TrainConfig`` dump), ``model_path`` (the resolved base
    model folder), ``pad_id``, ``data`` (an ObjectRef to ``{"train": [...], "eval": [...]}``; with
    packing the train items are packs of examples) and ``tracking`` (the MLflow run, or None).
    """
    cfg = TrainConfig.model_validate(loop_config["config"])
    run = cfg.run.name
    rank, world = _setup_worker(cfg)
    data = ray.get(loop_config["data"])
    train_set, eval_set, pad_id = data["train"], data["eval"], loop_config["pad_id"]
    micro_per_epoch, total = _plan_steps(cfg, len(train_set), world)
    ga = cfg.deepspeed.gradient_accumulation_steps

    saved_world = _saved_world(ray.train.get_checkpoint())
    universal = saved_world is not None and saved_world != world
    engine, load_stats = _build_engine(cfg, loop_config["model_path"], world, total, universal)
    load_stats = dict(zip(load_stats, _all_reduce(list(load_stats.values()), engine.device, dist.ReduceOp.MAX),
                          strict=True))
    state = _resume(engine, run, rank, universal)
    state["world_size"] = world
    (has_best,) = _all_reduce([float(state["best_weights"] is not None)], engine.device, dist.ReduceOp.MAX)
    if cfg.export.select == "best" and not has_best:
        state["best_step"] = None  # no best copy in the checkpoint (export.select was last): the next eval sets one
    start = state["step"]
    if rank == 0:
        logger.info("run %s: %d workers, zero %d, %d train / %d eval %s, steps %d→%d (%.1f epochs), "
                    "%.0f MiB of parameters per rank", run, world, cfg.deepspeed.zero_stage, len(train_set),
                    len(eval_set), "packs" if cfg.data.packing else "examples", start, total,
                    total * ga / micro_per_epoch, load_stats["param_mb_per_rank"])
    if start >= total:
        # A resubmitted run that already finished: nothing to train; the driver's export finds
        # this final checkpoint already registered and returns that version.
        logger.info("run %s: already at step %d of %d, nothing to train", run, start, total)
        return
    writer, tracker = _tensorboard(cfg, rank), MetricLogger(loop_config.get("tracking") if rank == 0 else None)
    stream = _micro_batches(train_set, cfg, rank, world, start * ga, pad_id)
    window, step, stop, eval_loss, t_begin = _Window(), start, False, None, time.perf_counter()

    while step < total and not stop:
        for _ in range(ga):
            epoch, (batch, n_samples, n_tokens) = next(stream)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer/scheduler only at the accumulation boundary
            window.add(loss.item(), n_samples, n_tokens)
        step += 1
        state["step"] = step
        _inject_failure(cfg, step, rank, state["resumed"])

        if eval_set and (step % cfg.eval.every_steps == 0 or step == total):
            eval_loss = _evaluate(engine, eval_set, cfg, rank, world, pad_id)
            stop = _early_stop(state, eval_loss, cfg)  # the same on every rank: eval loss is all-reduced
            if state["best_step"] == step and cfg.export.enabled and cfg.export.select == "best":
                state["best_weights"] = gather_lora_state(engine, rank=rank, zero_stage=cfg.deepspeed.zero_stage)
        final = stop or step == total
        is_ckpt = final or step % cfg.run.checkpoint_every_steps == 0
        if not (final or is_ckpt or step % cfg.run.report_every_steps == 0):
            continue

        metrics = {"step": step, "epoch": epoch, "lr": engine.get_lr()[0], **window.summary(engine.device),
                   "resumed_from_step": start if state["resumed"] else None, "done": final,
                   "resumed_from_workers": saved_world if universal else None,
                   "stopped_early": stop, "eval_loss": eval_loss, "best_eval_loss": state["best_eval"],
                   "best_step": state["best_step"], "train_s": time.perf_counter() - t_begin, **load_stats,
                   **(_export_choice(cfg, state, eval_loss) if final and cfg.export.enabled else {})}
        _publish(cfg, rank, writer, tracker, metrics, total, step - start)
        if is_ckpt:
            _checkpoint(engine, cfg, state, metrics, rank, final)
        else:
            ray.train.report(metrics)
        window = _Window()

    if writer is not None:
        writer.close()
    tracker.close()
    if rank == 0:
        logger.info("run %s: finished at step %d%s", run, step, " (early stop)" if stop else "")
