"""Training throughput: the recipe (Ray Train + DeepSpeed, 1-2 workers, ZeRO 0/2/3) vs a plain
single-process PEFT loop on the same model, data, LoRA and micro-batch.

    python -m train.bench            # quick: tiny model, ~2 minutes on 2 cores
    python -m train.bench --full     # smollm2-135m-instruct

Each run trains ``2 * steps`` optimizer steps and measures only the second half (the first
covers worker start, DeepSpeed init, allocator warm-up). Samples/s and tokens/s are global
(all workers; tokens are real tokens, padding excluded); memory is the peak RSS of one worker
process (the max over workers) and ``param_mib_per_rank`` the parameters one rank holds after
load (``load_``) and after DeepSpeed init: under ZeRO-3 its shards only.

Packing rows use one packed row of ``8 * data.max_seq_len`` tokens per micro-batch against
8 padded examples per micro-batch elsewhere: about the same tokens per step, no padding.

    python -m train.bench --full --cases ZeRO-2,ZeRO-3   # just the per-rank memory comparison
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from train.config import TrainConfig, load_config

__all__ = ["BENCH_CASES", "bench", "format_table", "main", "plain_loop"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
_PACKED = ["data.packing=true", "run.micro_batch_size=1"]  # pack_length set from max_seq_len in bench()
# (label, workers, zero stage, threads per worker, extra overrides)
BENCH_CASES = [("recipe 1w", 1, 0, 1, []), ("recipe 1w x2 threads", 1, 0, 2, []),
               ("recipe 1w packed", 1, 0, 1, _PACKED),
               ("recipe 1w grad-ckpt", 1, 0, 1, ["run.gradient_checkpointing=true"]),
               ("recipe 1w packed+grad-ckpt", 1, 0, 1, [*_PACKED, "run.gradient_checkpointing=true"]),
               ("recipe 2w ZeRO-0", 2, 0, 1, []), ("recipe 2w ZeRO-2", 2, 2, 1, []),
               ("recipe 2w ZeRO-3", 2, 3, 1, [])]


def _base_config(quick: bool, steps: int, workdir: Path) -> TrainConfig:
    model = "tiny-llama" if quick else "smollm2-135m-instruct"
    return load_config(REPO / "train" / "configs" / "tiny-test.yaml", [
        f"base_model={model}", f"models_dir={REPO / 'data' / 'models'}",
        f"torch_extensions_dir={REPO / 'data' / 'torch_extensions'}",
        f"data.paths=[{REPO / 'train' / 'examples' / 'ragtune-style.jsonl'}]", "data.eval_fraction=0",
        "data.max_seq_len=160", "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]",
        "optim.lr=0.001", f"run.max_steps={2 * steps}", f"run.report_every_steps={steps}",
        f"run.checkpoint_every_steps={2 * steps}", f"run.storage_path={workdir}", "run.max_failures=0",
        "export.enabled=false", "run.name=bench", "export.adapter_name=bench", "tracking.mlflow=false"])


def _plain_loop_task(cfg_json: dict, model_path: str, data: dict, pad_id: int, steps: int, threads: int) -> dict:
    """A single-process PEFT loop: same model, LoRA, optimizer and micro-batch as one recipe worker."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.data import collate

    cfg = TrainConfig.model_validate(cfg_json)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    examples, bs = data["train"], cfg.run.micro_batch_size
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist() * 64
    samples = tokens = 0
    for step in range(2 * steps):
        if step == steps:  # measure the second half only, like the recipe rows
            start, samples, tokens = time.perf_counter(), 0, 0
        batch = collate([examples[i] for i in order[step * bs:(step + 1) * bs]], pad_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        optim.step()
        optim.zero_grad(set_to_none=True)
        samples, tokens = samples + len(batch["input_ids"]), tokens + int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
            "peak_rss_mb_per_worker": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_param_mb_per_rank": param_mib, "param_mb_per_rank": param_mib}


def plain_loop(cfg: TrainConfig, steps: int, threads: int) -> dict:
    """Run :func:`_plain_loop_task` in a fresh Ray worker (clean memory figures, ``threads`` CPUs)."""
    import ray

    from train.launch import prepare

    prepared = prepare(cfg)
    task = ray.remote(num_cpus=threads, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})(_plain_loop_task)
    data = {"train": prepared.train}
    return ray.get(task.remote(cfg.model_dump(mode="json"), prepared.model_path, data, prepared.pad_id, steps, threads))


def _row(label: str, workers: int, zero: str, threads: int, metrics: dict) -> dict[str, Any]:
    return {"run": label, "workers": workers, "zero": zero, "threads_per_worker": threads,
            "samples_per_s": round(metrics["samples_per_s"], 1), "tokens_per_s": round(metrics["tokens_per_s"]),
            "peak_rss_mb_per_worker": round(metrics["peak_rss_mb_per_worker"]),
            "load_param_mib_per_rank": round(metrics["load_param_mb_per_rank"], 1),
            "param_mib_per_rank": round(metrics["param_mb_per_rank"], 1)}


def bench(quick: bool = True, steps: int | None = None, workdir: Path | None = None,
          cases: list[str] | None = None) -> list[dict[str, Any]]:
    """Throughput rows (needs a connected Ray with >= 2 CPUs); ``vs_plain`` is relative to plain 2 threads.

    ``cases``: run only the BENCH_CASES whose label contains one of these strings.
    """
    from train.launch import launch

    if workdir is None:  # throwaway checkpoints: measure, then delete
        with tempfile.TemporaryDirectory(prefix="ragtune-bench-") as tmp:
            return bench(quick, steps, Path(tmp), cases)
    steps = steps or (20 if quick else 8)
    base = _base_config(quick, steps, workdir)
    rows = [_row(f"plain PEFT x{t} threads", 1, "-", t, plain_loop(base, steps, t)) for t in (2, 1)]
    for label, workers, zero, threads, extra in BENCH_CASES:
        if cases and not any(c in label for c in cases):
            continue
        if "data.packing=true" in extra:
            extra = [*extra, f"data.pack_length={8 * base.data.max_seq_len}"]
        cfg = load_config(base.model_dump(mode="json"), [
            f"run.name=bench-{workers}w-z{zero}-t{threads}-{len(rows)}-{int(time.time())}",
            f"scaling.num_workers={workers}", f"deepspeed.zero_stage={zero}", f"scaling.threads_per_worker={threads}",
            f"scaling.cpus_per_worker={threads}", *extra])
        rows.append(_row(label, workers, str(zero), threads, launch(cfg).metrics))
    reference = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_plain"] = round(row["samples_per_s"] / reference, 2)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of bench rows."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.bench [--full] [--steps N]``: start a local Ray, print the table."""
    import ray

    from train.cli import start_local_ray

    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="smollm2-135m-instruct instead of the tiny model")
    parser.add_argument("--steps", type=int, help="measured steps per run (default 20 quick, 8 full)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--cases", help="comma-separated substrings of the recipe rows to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_local_ray(args.num_cpus)
    try:
        rows = bench(quick=not args.full, steps=args.steps, cases=args.cases.split(",") if args.cases else None)
    finally:
        ray.shutdown()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
