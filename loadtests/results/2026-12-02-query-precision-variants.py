"""Query-embedding variants side by side in one process (issue 12 item 4; results in
2026-12-02-query-precision.md): median latency at batch 1 and 16 (the d2 queries, 80 characters)
and of 16 documents (280 characters), and the lowest cosine to the fp32 vector.

Run under the heavy lock. ``onnx`` is needed only to export the ONNX Runtime data point; it is
installed aside so the venv stays as ``make setup`` leaves it:
    pip install --no-deps --target /tmp/qe/pkgs onnx ml_dtypes
    flock /tmp/ragtune-heavy.lock .venv/bin/python loadtests/results/2026-12-02-query-precision-variants.py 4
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.append("/tmp/qe/pkgs")
warnings.filterwarnings("ignore")

from sentence_transformers import SentenceTransformer  # noqa: E402

from retrieval.bench import synthetic_documents  # noqa: E402
from retrieval.embedder import resolve_model  # noqa: E402

path = resolve_model("all-MiniLM-L6-v2")
queries = [d.text[:80] for d in synthetic_documents(16 * 25, 200, seed=3)]
qa = [json.loads(line)["question"] for line in (REPO / "cluster/evals/example/qa.jsonl").open()]
docs = [d.text for d in synthetic_documents(64, 280, seed=2)]

base = SentenceTransformer(path, device="cpu")
int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)
int8pc = torch.ao.quantization.quantize_dynamic(
    copy.deepcopy(base), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
bf16w = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.bfloat16})


def enc(model, texts, ctx=contextlib.nullcontext):
    with torch.inference_mode(), ctx():
        v = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_tensor=True,
                         show_progress_bar=False)
    return v.float().numpy()


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


variants = {
    "fp32": lambda t: enc(base, t),
    "bf16 autocast": lambda t: enc(base, t, autocast),
    "bf16 weights": lambda t: enc(bf16w, t),
    "int8 dynamic": lambda t: enc(int8, t),
    "int8 per-channel": lambda t: enc(int8pc, t),
}


def onnx_variant():
    """ONNX Runtime (fp32) on a local torch.onnx export of the same model + mean pooling + normalise."""
    import onnxruntime as ort

    tok, hf = base.tokenizer, base[0].auto_model.eval()

    class Pooled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask, types):
            hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    x = tok(["hello world"] * 2, padding=True, return_tensors="pt")
    axes = {0: "batch", 1: "tokens"}
    torch.onnx.export(Pooled(hf), (x["input_ids"], x["attention_mask"], x["token_type_ids"]),
                      "/tmp/minilm-query.onnx", input_names=["ids", "mask", "types"], output_names=["e"],
                      dynamo=False, dynamic_axes={"ids": axes, "mask": axes, "types": axes, "e": {0: "batch"}},
                      opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession("/tmp/minilm-query.onnx", options, providers=["CPUExecutionProvider"])

    def run(texts):
        x = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        return session.run(None, {"ids": x["input_ids"], "mask": x["attention_mask"], "types": x["token_type_ids"]})[0]

    return run


try:
    variants["onnxruntime fp32"] = onnx_variant()
except Exception as exc:  # noqa: BLE001 - a data point, not a dependency
    print("onnx variant skipped:", repr(exc)[:200])


def timed(fn, texts):
    started = time.perf_counter()
    fn(texts)
    return time.perf_counter() - started


sets = {"d2 queries": queries[:64], "eval questions": qa, "documents": docs}
reference = {name: enc(base, texts) for name, texts in sets.items()}
for fn in variants.values():  # warm-up at each shape
    fn(queries[:16]), fn(queries[:1]), fn(docs[:16])
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
times = {name: {"b1": [], "b16": [], "docs16": []} for name in variants}
for _ in range(rounds):
    for name, fn in variants.items():  # interleaved, so load drift hits every variant
        times[name]["b1"] += [timed(fn, queries[i:i + 1]) for i in range(8)]
        times[name]["b16"] += [timed(fn, queries[16 * i:16 * i + 16]) for i in range(4)]
        times[name]["docs16"].append(timed(fn, docs[:16]))

print("| variant | 1 query (ms) | 16 queries (ms) | 16 documents (ms) | min cosine to fp32: d2 queries / eval "
      "questions / documents |")
print("|---|---|---|---|---|")
for name, fn in variants.items():
    cos = [float(np.min(np.sum(fn(texts) * reference[key], axis=1))) for key, texts in sets.items()]
    t = {k: statistics.median(v) * 1000 for k, v in times[name].items()}
    print(f"| {name} | {t['b1']:.1f} | {t['b16']:.1f} | {t['docs16']:.1f} | "
          + " / ".join(f"{c:.5f}" for c in cos) + " |", flush=True)
