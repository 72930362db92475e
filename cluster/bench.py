"""``ragtune bench`` wiring: start our stack and its peers, add ingest/training sections.

The load-test sections live in ``loadtests/bench.py``; this module owns the server lifecycle
(the servers side by side on this machine, same model and engine settings) and adapts the
retrieval and training benchmarks to the same row format. The peers of section (a) are vLLM's
own OpenAI server (whole run) and, in full mode, Ray Serve LLM (started for section (a) only:
:class:`StackVsPeers`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from cluster.config import load_config
from cluster.models import make_random_lora, resolve_model
from cluster.processes import RagtuneServer, RawVLLMServer, free_port
from loadtests.bench import BenchContext, Peer, Row, stack_vs_raw
from serve.config import EngineConfig

__all__ = ["BenchServers", "EXTRA_SECTIONS", "RAYLLM_ENV", "StackVsPeers", "prepare_bench_args"]

BENCH_ADAPTERS = [f"bench-{i}" for i in range(1, 9)]


class BenchServers:
    """Servers ``ragtune bench`` started; ``close()`` stops them (by PID)."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="ragtune-bench-"))
        self.cfg = load_config()

    def start_ours(self, config_path: Path | None) -> str:
        """``ragtune up`` on free loopback ports with 8 random adapters registered (section b)."""
        from serve.registry import open_registry

        self.cfg = load_config(config_path).resolved()
        engine = self.cfg.serve.engine
        model_path = resolve_model(engine.model, self.cfg.models_dir)
        store = open_registry(str(self.workdir / "adapters"), base_model=engine.base_name, base_model_path=model_path,
                              max_lora_rank=engine.max_lora_rank)
        for seed, name in enumerate(BENCH_ADAPTERS, start=1):
            store.register(make_random_lora(model_path, self.workdir / "src" / name, seed=seed), name)
        data = self.cfg.model_dump(mode="json")
        data["ray"]["dashboard_port"] = free_port()
        data["serve"]["http"]["port"] = free_port()
        data["serve"]["adapters"]["store_uri"] = str(store.root)
        data["retrieval"]["milvus"]["uri"] = str(self.workdir / "milvus" / "kb.db")
        data["milvus_lite"]["port"] = free_port()
        return self._stack.enter_context(RagtuneServer(data, self.workdir, command="up")).url

    def start_raw_vllm(self, model_dir: Path) -> str:
        """The peer: vLLM's own OpenAI server with our engine settings (incl. LoRA enabled)."""
        e = self.cfg.serve.engine
        args = ["--dtype", e.dtype, "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
                "--seed", str(e.seed)]
        args += ["--enforce-eager"] if e.enforce_eager else []
        if e.enable_lora:
            args += ["--enable-lora", "--max-loras", str(e.max_loras), "--max-lora-rank", str(e.max_lora_rank),
                     "--max-cpu-loras", str(e.max_cpu_loras)]
        from serve.llm import engine_env

        server = RawVLLMServer(model_dir, e.base_name, free_port(), self.workdir, args, env=engine_env(e))
        return self._stack.enter_context(server).url

    def close(self) -> None:
        self._stack.close()


RAYLLM_ENV = "RAGTUNE_BENCH_RAYLLM"  # 1: add the Ray Serve LLM peer in quick mode too; 0: never


class StackVsPeers:
    """Section (a) with Ray Serve LLM as a second peer next to raw vLLM, measured in the same run.

    On in ``full`` mode, off in ``quick`` mode (its start alone is ~1-2 min and ~5 GB);
    ``RAGTUNE_BENCH_RAYLLM=1|0`` overrides either way. The peer runs our config's engine settings
    on the model folder the raw peer gets, starts before the first measurement of the section
    and is stopped (by PID) when the section ends. If it cannot start, the raw vLLM rows are still
    measured and one row says why.
    """

    label = "Ray Serve LLM"

    def __init__(self) -> None:
        self.engine: EngineConfig | None = None
        self.model_dir: Path | None = None

    def configure(self, engine: EngineConfig, model_dir: Path | None) -> None:
        self.engine, self.model_dir = engine, model_dir

    @staticmethod
    def enabled(mode: str) -> bool:
        flag = os.environ.get(RAYLLM_ENV, "").strip()
        return flag == "1" if flag in ("0", "1") else mode == "full"

    def _note(self, note: str) -> Row:
        return Row("a_stack_vs_raw", f"{self.label} peer", None, None, ours_label="ours", peer_label=self.label,
                   note=note)

    def __call__(self, ctx: BenchContext) -> list[Row]:
        from cluster.rayllm_peer import RayServeLLMServer

        if not self.enabled(ctx.mode):
            return [*stack_vs_raw(ctx), self._note(f"skipped in {ctx.mode} mode (full mode or {RAYLLM_ENV}=1 adds it)")]
        if self.engine is None or self.model_dir is None:
            return [*stack_vs_raw(ctx), self._note("skipped: no model folder (--model-dir) for the Ray Serve LLM peer")]
        with ExitStack() as stack:
            try:
                server = stack.enter_context(RayServeLLMServer(self.engine, self.model_dir, ctx.work_dir / "rayllm"))
            except Exception as exc:  # the raw vLLM comparison must not be lost with it
                return [*stack_vs_raw(ctx), self._note(f"failed to start: {type(exc).__name__}: {exc}"[:300])]
            peer = Peer(self.label, server.url, server.model)
            targets = dataclasses.replace(ctx.targets, extra_peers=(*ctx.targets.extra_peers, peer))
            rows = stack_vs_raw(dataclasses.replace(ctx, targets=targets))
            return [*rows, self._note(f"started in {server.started_in_s:.0f} s; log {server.log_path}")]


STACK_VS_PEERS = StackVsPeers()


def prepare_bench_args(args: argparse.Namespace, servers: BenchServers) -> None:
    """Defaults for a self-contained run: our adapters, the sample collection, the peers' model."""
    cfg = load_config(args.server_config).resolved()
    model_dir = args.model_dir
    if not args.ours:
        args.adapters = args.adapters or ",".join(BENCH_ADAPTERS)
        args.rag_collection = args.rag_collection or "ragtune-docs"
        model_dir = model_dir or Path(resolve_model(cfg.serve.engine.model, cfg.models_dir))
        if not args.peer:
            args.model_dir = model_dir
    STACK_VS_PEERS.configure(cfg.serve.engine, model_dir)


def _ttft_ms(url: str, body: dict) -> float:
    """Time to the first content chunk of one streamed chat request, in ms."""
    import time

    import httpx

    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                return (time.perf_counter() - start) * 1000
    raise RuntimeError("stream ended without content")


def rag_overhead_section(ctx: BenchContext) -> list[Row]:
    """(c') What RAG itself adds to TTFT: the same final prompt, retrieved vs pasted in (c=1).

    Section (c) compares RAG with a *shorter* prompt, so most of its gap is prefill of the
    retrieved text. Here the plain request carries the exact context block the server would build,
    so the difference is retrieval (embed + Milvus search) plus the extra hop. vLLM's prefix cache
    would favour whichever of a pair runs second, so a warm-up request caches the prompt first and
    the measured pair alternates its order: both sides are timed with a warm prefix.
    """
    import statistics

    import httpx

    from retrieval.sample_kb import SAMPLE_COLLECTION, SAMPLE_QUESTIONS
    from serve.context import context_block

    t, top_k = ctx.targets, 3
    rag_ms, pasted_ms = [], []
    for _ in range(3 if ctx.mode == "quick" else 10):
        for question, _doc, _answer in SAMPLE_QUESTIONS:
            user = [{"role": "user", "content": question}]
            base = {"model": t.ours_model, "max_tokens": 4, "temperature": 0}
            hits = httpx.post(f"{t.ours_url}/v1/retrieve", timeout=60,
                              json={"collection": SAMPLE_COLLECTION, "query": question, "top_k": top_k}).json()["data"]
            system = {"role": "system", "content": context_block([h["text"] for h in hits], ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])}
            pasted = {**base, "messages": [system, *user]}
            rag = {**base, "messages": user, "rag": {"collection": SAMPLE_COLLECTION, "top_k": top_k}}
            _ttft_ms(t.ours_url, pasted)  # warm the prefix cache for both sides
            pair = [(pasted_ms, pasted), (rag_ms, rag)]
            for times, body in pair if len(rag_ms) % 2 else pair[::-1]:
                times.append(_ttft_ms(t.ours_url, body))
    rag, pasted = statistics.median(rag_ms), statistics.median(pasted_ms)
    return [Row("c2_rag_overhead", f"TTFT p50, same prompt @c=1 ({len(rag_ms)} pairs)", rag, pasted, "ms",
                better="lower", ours_label="rag (retrieved)", peer_label="context pasted in",
                note=f"added by RAG: {rag - pasted:.0f} ms p50 (goal <= 30 ms)")]


def ingest_section(ctx: BenchContext) -> list[Row]:
    """(d) Ingest rate (chunk → embed → Milvus upsert) vs the raw embedder's encode rate."""
    from retrieval.bench import bench_ingest

    quick = ctx.mode == "quick"
    with tempfile.TemporaryDirectory(prefix="ingest-", dir=None) as tmp:
        rows = {r["metric"]: r for r in bench_ingest(Path(tmp), docs=40 if quick else 100)}
    ingest, raw = rows["ingest_rate"], rows["raw_encode_rate"]
    return [Row("d_ingest", f"chunks/s ({ingest['chunks']} chunks)", ingest["value"], raw["value"], "chunks/s",
                ours_label="ingest", peer_label="raw encode", note="goal: ratio >= 0.9")]


def training_section(ctx: BenchContext) -> list[Row]:
    """(e) The Ray Train + DeepSpeed recipe (1-2 workers, ZeRO 0/2/3) vs a plain single-process PEFT loop."""
    import ray

    from train.bench import bench
    from train.cli import start_local_ray

    start_local_ray(2)
    try:
        rows = bench(quick=ctx.mode == "quick")
    finally:
        ray.shutdown()
    plain = rows[0]
    return [Row("e_training", f"{r['run']} ({r['workers']}w, ZeRO {r['zero']})", r["samples_per_s"],
                plain["samples_per_s"], "samples/s", ours_label="recipe", peer_label=plain["run"],
                note=f"{r['tokens_per_s']} tok/s, peak RSS {r['peak_rss_mb_per_worker']} MB/worker")
            for r in rows[1:]]


# "a_stack_vs_raw" replaces the serving section of that name in place (loadtests.cli merges
# {**SERVING_SECTIONS, **EXTRA_SECTIONS}, which keeps its position): the same rows plus Ray Serve LLM.
EXTRA_SECTIONS = {"a_stack_vs_raw": STACK_VS_PEERS, "c2_rag_overhead": rag_overhead_section,
                  "d_ingest": ingest_section, "e_training": training_section}
