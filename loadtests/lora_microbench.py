"""Micro-benchmark of vLLM's CPU multi-LoRA ops: upstream, the masked gather (before), and grouped (now).

What is timed is exactly what vLLM's CPU punica wrapper runs for one LoRA linear layer: a real
``PunicaWrapperCPU.add_lora_linear`` call with metadata from a real ``LoRAMapping`` (vLLM V1 marks
every step ``is_prefill=True``, so decode steps take the ``sgmv_*`` ops too), once with each
implementation of the ops bound into ``vllm.lora.punica_wrapper.punica_cpu``:

- ``upstream``: vLLM 0.32 as shipped (``weights[indices]`` per token row + einsum; wrong for base rows).
- ``masked``: ragtune's first fix (commit 80db0c5, copied below): the same per-row gather, with the
  index clamped and base rows multiplied by 0.
- ``grouped``: ``serve/vllm_patches.py`` now: one matmul per adapter present, and the whole layer
  (all its slices) in one pass where the plugin replaces ``add_lora_linear`` (``lora_linear``).

Shapes are SmolLM2-135M's (``data/models/smollm2-135m-instruct/config.json``: hidden 576, 9 query
heads and 3 KV heads of 64 → q 576, k/v 192, MLP 1536, 30 layers), vLLM's merged layers: ``qkv``
(3 slices 576/192/192), ``o`` (576→576), ``gate_up`` (2 slices of 1536), ``down`` (1536→576).
Batches: 16 requests, 8 adapters loaded (max_loras=8), request ``i`` uses slot ``i % 8``; decode =
1 token per request, prefill = 256 tokens per request, mixed = 15 decoding + one 256-token prefill
(the steady state of a closed-loop load). ``base`` is the layer's own dense matmul
(``x @ W.T``), for scale: LoRA should cost a fraction of it.

Times are milliseconds per call of the calling thread's CPU time (``time.thread_time``, torch on
one thread like vLLM's single compute core here), the median of ``--repeats`` blocks — CPU time,
not wall time, so another process on this shared machine does not inflate them. Run::

    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.lora_microbench            # ~1 min CPU
    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.lora_microbench --ranks 8 --dtype bfloat16
    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.lora_microbench --ranks 16 --baseline HEAD~1  # before/after
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIG = Path(__file__).resolve().parents[1] / "data" / "models" / "smollm2-135m-instruct" / "config.json"
OP_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


# --- "before": the masked-gather ops of serve/vllm_patches.py at 80db0c5, verbatim ----------------------


def _masked_lora_product(inputs, weights, indices, dtype):
    valid = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)
    return outputs * valid.to(dtype=dtype).unsqueeze(-1)


def masked_bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _masked_lora_product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def masked_bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _masked_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def masked_bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                             slice_size, add_inputs=True):
    outputs = _masked_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


# The masked fix patched only bgmv_*; upstream's sgmv_* looked them up in their module's globals,
# i.e. repeat_interleave'd the segments into per-token indices and called the masked bgmv.
def masked_sgmv_shrink(inputs, a, out, starts, lengths, slots, batches, max_len, token_nums, scaling):
    masked_bgmv_shrink(inputs, a, out, torch.repeat_interleave(slots, lengths), scaling)


def masked_sgmv_expand(inputs, b, out, starts, lengths, slots, batches, max_len, token_nums, add_inputs=False):
    masked_bgmv_expand(inputs, b, out, torch.repeat_interleave(slots, lengths), add_inputs)


def masked_sgmv_expand_slice(inputs, b, out, starts, lengths, slots, batches, max_len, token_nums, slice_offset,
                             slice_size, add_inputs=False):
    masked_bgmv_expand_slice(inputs, b, out, torch.repeat_interleave(slots, lengths), slice_offset, slice_size,
                             add_inputs)


MASKED = {name: globals()[f"masked_{name}"] for name in OP_NAMES}


def implementations(baseline: str | None = None) -> dict[str, dict[str, Callable]]:
    import importlib.util

    from serve import vllm_patches

    # A pristine copy of vLLM's op module (its sgmv_* call its own, unpatched bgmv_*), even if the
    # ragtune plugin already patched the live one in this process.
    origin = importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops").origin
    spec = importlib.util.spec_from_file_location("_pristine_vllm_lora_ops", origin)
    upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream)
    return {
        "upstream": {name: getattr(upstream, name) for name in OP_NAMES},
        "masked": MASKED,
        "grouped": _grouped(vllm_patches),
    } | ({"baseline": _ops_at_revision(baseline)} if baseline else {})


def _grouped(module: Any) -> dict[str, Callable]:
    """The ops of a ``vllm_patches`` module, plus its whole-layer ``lora_linear`` where it has one."""
    return {name: getattr(module, name) for name in OP_NAMES} | (
        {"lora_linear": module.lora_linear} if hasattr(module, "lora_linear") else {})


def _ops_at_revision(rev: str) -> dict[str, Callable]:
    """The grouped ops as ``serve/vllm_patches.py`` was at git revision ``rev`` (before/after in one run)."""
    import subprocess
    import types

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:serve/vllm_patches.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"_vllm_patches_at_{rev}")
    exec(compile(source, f"{rev}:serve/vllm_patches.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return _grouped(module)


def layer_shapes() -> dict[str, tuple[int, tuple[int, ...]]]:
    """vLLM's LoRA-wrapped linear layers of one decoder layer: name → (input width, output slices)."""
    cfg = json.loads(CONFIG.read_text())
    hidden, head = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, mlp = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head, cfg["intermediate_size"]
    return {"qkv": (hidden, (q, kv, kv)), "o": (q, (hidden,)), "gate_up": (hidden, (mlp, mlp)), "down": (mlp, (hidden,))}


def _cpu_ms(fn: Callable[[], None], repeats: int, budget_s: float) -> float:
    """Median over ``repeats`` blocks of the thread CPU time per call, in ms (block size from a probe)."""
    start = time.thread_time()
    fn()  # warm-up, also sizes the blocks
    probe = max(time.thread_time() - start, 1e-6)
    if probe * repeats > 4 * budget_s:  # seconds-long upstream prefill calls: 3 blocks of 1 call suffice
        repeats = min(repeats, 3)
    per_block = max(1, min(200, int(budget_s / repeats / probe)))
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(per_block):
            fn()
        samples.append((time.thread_time() - start) / per_block * 1e3)
    return statistics.median(samples)


# Tokens per request in one forward step. ``mixed`` is the steady state of a closed-loop load test:
# 15 requests decoding (one token each) while a new one's 256-token prompt is prefilled in the same
# step (vLLM V1's chunked prefill schedules both together).
SCENARIOS = {"decode": [1] * 16, "prefill": [256] * 16, "mixed": [1] * 15 + [256]}


def run(ranks: list[int], dtype: torch.dtype, repeats: int, budget_s: float,
        baseline: str | None = None) -> list[dict]:
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper import punica_cpu

    impls = implementations(baseline)
    bound = {name: getattr(punica_cpu, name) for name in OP_NAMES}
    slots, requests = 8, 16
    lora_ids = list(range(1, slots + 1))
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for scenario, tokens in SCENARIOS.items():
            per_request = [lora_ids[i % slots] for i in range(requests)]
            index_mapping = [rid for rid, count in zip(per_request, tokens, strict=True) for _ in range(count)]
            n = len(index_mapping)
            wrapper = punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=n, max_batches=requests, device="cpu")
            wrapper.update_metadata(LoRAMapping(index_mapping, per_request, is_prefill=True), lora_ids, slots, 49152)
            for rank in ranks:
                for layer, (width_in, slices) in layer_shapes().items():
                    x = torch.randn(n, width_in, generator=gen).to(dtype)
                    base_w = torch.randn(sum(slices), width_in, generator=gen).to(dtype)
                    a = tuple(torch.randn(slots, 1, rank, width_in, generator=gen).to(dtype) / 24 for _ in slices)
                    b = tuple(torch.randn(slots, 1, size, rank, generator=gen).to(dtype) / 4 for size in slices)
                    y = torch.zeros(n, sum(slices), dtype=dtype)
                    row = {"scenario": scenario, "tokens": n, "rank": rank, "layer": layer,
                           "base": _cpu_ms(lambda x=x, w=base_w: torch.mm(x, w.T), repeats, budget_s)}
                    results = {}
                    for impl, ops in impls.items():
                        for name in OP_NAMES:
                            setattr(punica_cpu, name, ops[name])
                        fused = ops.get("lora_linear")

                        def wrapper_call(w=wrapper, y=y, x=x, a=a, b=b, s=slices, fused=fused):
                            # vLLM's add_lora_linear (unpatched here), or the plugin's replacement of it
                            if fused is None or not fused(w, y, x, a, b, 1.0, s):
                                w.add_lora_linear(y, x, a, b, 1.0, s)

                        row[impl] = _cpu_ms(wrapper_call, repeats, budget_s)
                        y.zero_()
                        wrapper_call()
                        results[impl] = y.clone()
                    # Sanity: every slot >= 0 here, so all of them must agree.
                    for impl in results:
                        torch.testing.assert_close(results[impl], results["masked"], rtol=2e-2, atol=2e-2)
                    rows.append(row)
                    print(_format_row(row), flush=True)
    finally:
        for name, fn in bound.items():
            setattr(punica_cpu, name, fn)
    return rows


HEADER = (f"{'scenario':<8} {'tokens':>6} {'rank':>4} {'layer':<8} {'base mm':>9} {'upstream':>10} {'masked':>10} "
          f"{'grouped':>9} {'vs masked':>9} {'vs upstr.':>9} {'LoRA/base':>9}")
BASELINE_HEADER = f" {'baseline':>9} {'vs basel.':>9}"


def _format_row(row: dict) -> str:
    return (f"{row['scenario']:<8} {row['tokens']:>6} {row['rank']:>4} {row['layer']:<8} {row['base']:>9.3f} "
            f"{row['upstream']:>10.3f} {row['masked']:>10.3f} {row['grouped']:>9.3f} "
            f"{row['masked'] / row['grouped']:>8.1f}x {row['upstream'] / row['grouped']:>8.1f}x "
            f"{row['grouped'] / row['base']:>8.2f}x"
            + (f" {row['baseline']:>9.3f} {row['baseline'] / row['grouped']:>8.1f}x" if "baseline" in row else ""))


def summarize(rows: list[dict], layers: int) -> list[str]:
    """Per (scenario, rank): one decoder layer's four LoRA layers summed, and × the model's layers."""
    lines = [f"\nPer forward step ({layers} decoder layers × the 4 LoRA layers above; ms of CPU):",
             f"{'scenario':<8} {'rank':>4} {'base mm':>9} {'upstream':>10} {'masked':>10} {'grouped':>9} "
             f"{'vs masked':>9}" + (BASELINE_HEADER if rows and "baseline" in rows[0] else "")]
    keys = sorted({(r["scenario"], r["rank"]) for r in rows}, key=lambda k: (list(SCENARIOS).index(k[0]), k[1]))
    for scenario, rank in keys:
        group = [r for r in rows if (r["scenario"], r["rank"]) == (scenario, rank)]
        total = {k: layers * sum(r[k] for r in group) for k in group[0] if k not in ("scenario", "tokens", "rank",
                                                                                     "layer")}
        lines.append(f"{scenario:<8} {rank:>4} {total['base']:>9.1f} {total['upstream']:>10.1f} "
                     f"{total['masked']:>10.1f} {total['grouped']:>9.1f} {total['masked'] / total['grouped']:>8.1f}x"
                     + (f" {total['baseline']:>9.1f} {total['baseline'] / total['grouped']:>8.1f}x"
                        if "baseline" in total else ""))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per cell (median reported)")
    parser.add_argument("--budget", type=float, default=0.5, help="target CPU seconds per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (vLLM here: 1)")
    parser.add_argument("--baseline", metavar="REV", help="also time the grouped ops of this git revision "
                        "(column 'baseline'; 'vs basel.' = its time / now's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = json.loads(CONFIG.read_text())["num_hidden_layers"]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}; ms of thread CPU time per "
          f"add_lora_linear call (median of {args.repeats}); 16 requests over 8 adapters\n")
    print(HEADER + (BASELINE_HEADER if args.baseline else ""))
    rows = run(args.ranks, getattr(torch, args.dtype), args.repeats, args.budget, args.baseline)
    print("\n".join(summarize(rows, layers)))


if __name__ == "__main__":
    main()
