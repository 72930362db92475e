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
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from cluster.config import load_config
from cluster.models import make_random_lora, resolve_model
from cluster.processes import RagtuneServer, RawVLLMServer, free_port, scratch_stack
from loadtests.bench import BenchContext, Peer, Row, stack_vs_raw
from serve.config import EngineConfig

__all__ = ["BenchServers", "EXTRA_SECTIONS", "RAYLLM_ENV", "StackVsPeers", "prepare_bench_args", "raw_vllm_args"]

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
        data = scratch_stack(self.cfg.model_dump(mode="json"), self.workdir)
        data["serve"]["adapters"]["store_uri"] = str(store.root)
        return self._stack.enter_context(RagtuneServer(data, self.workdir, command="up")).url

    def start_raw_vllm(self, model_dir: Path) -> str:
        """The peer: vLLM's own OpenAI server with our engine settings (incl. LoRA enabled).

        It serves the same 8 bench adapters as ours (``--lora-modules``, when :meth:`start_ours`
        made them) and runs vLLM's *upstream* CPU LoRA ops: ``VLLM_PLUGINS=""`` keeps our
        grouped-LoRA plugin (``serve.vllm_patches``, an installed entry point vLLM would otherwise
        load in every process) out of it.
        """
        from serve.llm import engine_env

        e = self.cfg.serve.engine
        server = RawVLLMServer(model_dir, e.base_name, free_port(), self.workdir, raw_vllm_args(e, self.adapter_dirs()),
                               env={**engine_env(e), "VLLM_PLUGINS": ""})
        return self._stack.enter_context(server).url

    def adapter_dirs(self) -> dict[str, Path]:
        """The bench adapters' PEFT folders (those :meth:`start_ours` registered), by name."""
        dirs = {name: self.workdir / "src" / name for name in BENCH_ADAPTERS}
        return {name: path for name, path in dirs.items() if (path / "adapter_config.json").exists()}

    def close(self) -> None:
        self._stack.close()


def raw_vllm_args(e: EngineConfig, adapters: dict[str, Path]) -> list[str]:
    """vLLM CLI flags for the raw peer: our engine settings, and ``adapters`` as ``--lora-modules``."""
    args = ["--dtype", e.dtype, "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
            "--seed", str(e.seed)]
    args += ["--enforce-eager"] if e.enforce_eager else []
    if e.enable_prefix_caching is not None:
        args += ["--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching"]
    if e.enable_lora:
        args += ["--enable-lora", "--max-loras", str(e.max_loras), "--max-lora-rank", str(e.max_lora_rank),
                 "--max-cpu-loras", str(e.max_cpu_loras)]
        if adapters:
            args += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return args


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


def _ttft_ms(url: str, body: dict, api_key: str | None = None) -> float:
    """Time to the first generated token of one streamed chat request, in ms.

    That is the first chunk with delta content or a finish reason: a reply whose first token is
    end-of-turn (or a special token the detokenizer drops) is timed at its finish chunk, not lost.
    The rest of the stream is read, as a client does: hanging up at the first token would leave the
    request's remaining decode steps (and its abort) running into the next measurement.
    """
    import time

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start, first = time.perf_counter(), None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and _first_token(line[len("data: "):]):
                first = (time.perf_counter() - start) * 1000
    if first is None:
        raise RuntimeError("stream ended without a token (no content and no finish reason)")
    return first


def _first_token(event: str) -> bool:
    """An SSE chat chunk (JSON, compact or not) carrying a generated token: non-empty delta content or
    a finish reason (vLLM's opening chunk, role and empty content, is not one); an error event raises."""
    data = json.loads(event)
    if "error" in data:
        raise RuntimeError(f"stream error: {data['error']}"[:300])
    return any((choice.get("delta") or {}).get("content") or choice.get("finish_reason")
               for choice in data.get("choices") or ())


PREFIX_CACHE_METRICS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")


def prefix_cache_counters(url: str, api_key: str | None = None) -> dict[str, float] | None:
    """vLLM's prefix-cache counters (prompt tokens queried / served from cache) from ``/metrics``.

    Summed over engines and labels; ``None`` if the endpoint or the series are not there.
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:  # (the parser files colon-named counters under "<name>_total" too)
            name = sample.name.removesuffix("_total")
            if sample.name.endswith("_total") and name in PREFIX_CACHE_METRICS:
                out[name] = out.get(name, 0.0) + sample.value
    return out if len(out) == len(PREFIX_CACHE_METRICS) else None


def hit_rate(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Share (%) of the prompt tokens queried between two counter readings that hit the cache."""
    if before is None or after is None:
        return None
    queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
    hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
    return 100 * hits / queries if queries > 0 else None


SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # the packaged SmolLM2's
RAG_SYSTEM = "You answer questions about ragtune. Be brief and cite the documents you use."


def rag_overhead_section(ctx: BenchContext) -> list[Row]:
    """(c') What RAG itself adds to TTFT: the same final prompt, retrieved vs pasted in, c=1 and c=4.

    Section (c) compares RAG with a *shorter* prompt, so most of its gap is prefill of the
    retrieved text. Here the plain request carries the exact messages the server would build
    (``serve.context.with_context``: the client's system message, the fixed context header, the
    chunks, then the question), so the difference is retrieval (embed + Milvus search) plus the
    hop. Two phases per concurrency:

    * **repeated** retrieval: each prompt ran once before (warm-up), so vLLM's prefix cache holds
      it on both sides; the sides alternate their order per round;
    * **cold**: every request carries a fresh ``cache_salt`` (mixed with the tenant's salt by the
      ingress), so nothing is reused and both sides prefill the whole prompt.

    The prefix-cache hit rate is the share of prompt tokens vLLM served from cache
    (``vllm:prefix_cache_hits`` ÷ ``vllm:prefix_cache_queries`` on ``/metrics``) while that side ran.
    At c=4 four requests of one side (different questions) run at once.
    """
    import statistics
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from retrieval.sample_kb import SAMPLE_COLLECTION, SAMPLE_QUESTIONS
    from serve.context import with_context

    t, top_k, quick = ctx.targets, 3, ctx.mode == "quick"
    headers = {"Authorization": f"Bearer {t.api_key}"} if t.api_key else {}
    filler = rag_store_chunks(ctx.mode)
    collection = fill_rag_collection(t.ours_url, headers, filler, ctx.progress) if filler else SAMPLE_COLLECTION
    size = f"@{filler // 1000}k chunks " if filler else ""
    pairs, found = [], 0  # (rag body, pasted body) per question; questions whose document was retrieved
    for question, doc, _answer in SAMPLE_QUESTIONS:
        messages = [{"role": "system", "content": RAG_SYSTEM}, {"role": "user", "content": question}]
        r = httpx.post(f"{t.ours_url}/v1/retrieve", timeout=60, headers=headers,
                       json={"collection": collection, "query": question, "top_k": top_k})
        r.raise_for_status()
        hits = r.json()["data"]
        found += any(h["document"] == doc for h in hits)
        base = {"model": t.ours_model, "max_tokens": 4, "temperature": 0}
        pairs.append(({**base, "messages": messages, "rag": {"collection": collection, "top_k": top_k}},
                      {**base, "messages": with_context(messages, [h["text"] for h in hits], SPECIAL_TOKENS)}))
    rounds = 3 if quick else 10
    rows = []
    for c in (1, 4):
        pool = ThreadPoolExecutor(c)
        for phase in ("repeated", "cold"):
            times: dict[str, list[float]] = {"rag": [], "pasted": []}
            hits: dict[str, list[float]] = {"rag": [], "pasted": []}
            if phase == "repeated":
                for pair in pairs:
                    for body in pair:
                        _ttft_ms(t.ours_url, body, t.api_key)  # cache every prompt of both sides
            for n in range(rounds * len(pairs) // c or 1):
                batch = [pairs[(n * c + i) % len(pairs)] for i in range(c)]
                sides = [("pasted", 1), ("rag", 0)]
                for side, index in sides if n % 2 else sides[::-1]:
                    bodies = [p[index] if phase == "repeated" else {**p[index], "cache_salt": uuid.uuid4().hex}
                              for p in batch]
                    before = prefix_cache_counters(t.ours_url, t.api_key)
                    times[side] += pool.map(lambda b: _ttft_ms(t.ours_url, b, t.api_key), bodies)
                    rate = hit_rate(before, prefix_cache_counters(t.ours_url, t.api_key))
                    hits[side] += [] if rate is None else [rate]
            rag, pasted = statistics.median(times["rag"]), statistics.median(times["pasted"])
            goal = ("goal <= 30 ms" if c == 1 else "goal <= 1.2×") if phase == "repeated" else "no goal"
            labels = dict(ours_label="rag (retrieved)", peer_label="context pasted in")
            rows.append(Row("c2_rag_overhead", f"TTFT p50 {phase} {size}@c={c} ({len(times['rag'])} pairs)", rag, pasted,
                            "ms", better="lower", **labels, note=f"added by RAG: {rag - pasted:+.0f} ms p50 ({goal}); "
                            f"{found} of {len(pairs)} questions retrieve their document in the top {top_k}"))
            rates = {side: statistics.mean(v) if v else None for side, v in hits.items()}
            rows.append(Row("c2_rag_overhead", f"prefix-cache hit rate {phase} {size}@c={c}", rates["rag"],
                            rates["pasted"], "% prompt tokens", **labels,
                            note="vllm:prefix_cache_hits ÷ queries while that side ran"
                            + ("" if rates["rag"] is not None else "; /metrics has no prefix-cache series")))
        pool.shutdown()
    return rows + [_prefix_cache_agreement(t.ours_url, t.api_key, pairs)]


RAG_CHUNKS_ENV = "RAGTUNE_BENCH_RAG_CHUNKS"  # chunks in section c2's collection; 0 = the sample collection alone
RAG_COLLECTION = "bench-rag"


def rag_store_chunks(mode: str) -> int:
    """Synthetic chunks section c2 adds beside the sample documents: 10k in full mode, none in quick."""
    raw = os.environ.get(RAG_CHUNKS_ENV, "").strip()
    if not raw:
        return 0 if mode == "quick" else 10_000
    if not raw.isdigit():
        raise ValueError(f"{RAG_CHUNKS_ENV}={raw!r}: expected a chunk count (0 = the sample collection alone)")
    return int(raw)


def fill_rag_collection(url: str, headers: dict, chunks: int, progress: bool = False) -> str:
    """The bench tenant's own collection: the sample documents plus ``chunks`` synthetic one-chunk
    documents (~280 characters, as section d2), written through the documents API the way a client
    would, so RAG searches a store of that size. Returns the collection name."""
    import httpx
    from tqdm import tqdm

    from retrieval.bench import synthetic_documents
    from retrieval.sample_kb import SAMPLE_KB_DIR

    docs = [{"id": p.name, "text": p.read_text(encoding="utf-8"), "source": p.name}
            for p in sorted(SAMPLE_KB_DIR.glob("*.md"))]
    docs += [{"id": d.id, "text": d.text, "source": d.source} for d in synthetic_documents(chunks, 280, seed=5)]
    step = 500  # well under retrieval.requests.max_documents_per_put (1000)
    with tqdm(total=len(docs), unit="doc", desc=f"c2: fill {RAG_COLLECTION}", disable=not progress) as bar:
        for start in range(0, len(docs), step):
            part = docs[start:start + step]
            r = httpx.put(f"{url}/v1/collections/{RAG_COLLECTION}/documents", headers=headers, timeout=600,
                          json={"documents": part})
            r.raise_for_status()
            if r.json().get("failed"):
                raise RuntimeError(f"c2: filling {RAG_COLLECTION} failed for some documents: {r.text[:500]}")
            bar.update(len(part))
    return RAG_COLLECTION


def _completion_text(url: str, body: dict, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 16, "stream": False},
                   headers=headers, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"] or ""


def _prefix_cache_agreement(url: str, api_key: str | None, pairs: list[tuple[dict, dict]]) -> Row:
    """Is a reply the same from a cached prefix as from a full prefill? Greedy, 16 tokens, per question:
    the pasted prompt with a fresh ``cache_salt`` (nothing reusable) vs with none (its prefix is cached)."""
    import uuid

    same = sum(_completion_text(url, {**pasted, "cache_salt": uuid.uuid4().hex}, api_key)
               == _completion_text(url, pasted, api_key) for _rag, pasted in pairs)
    return Row("c2_rag_overhead", "greedy replies equal, cached prefix vs full prefill", same, len(pairs),
               "prompts", ours_label="identical replies", peer_label="prompts compared",
               note=f"{same} of {len(pairs)} identical (16 tokens, temperature 0): prefix caching "
                    + ("changes no reply" if same == len(pairs) else "CHANGED some replies"))


RETRIEVE_CHUNKS_ENV = "RAGTUNE_BENCH_RETRIEVE_CHUNKS"  # e.g. "10000,30000": collection sizes for d2


def retrieve_sizes(mode: str) -> list[int]:
    """Collection sizes section d2 measures: 10k (quick), 10k and 100k (full), or the env's list."""
    raw = os.environ.get(RETRIEVE_CHUNKS_ENV, "").strip()
    if not raw:
        return [10_000] if mode == "quick" else [10_000, 100_000]
    try:
        sizes = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{RETRIEVE_CHUNKS_ENV}={raw!r}: expected a comma list of chunk counts") from exc
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{RETRIEVE_CHUNKS_ENV}={raw!r}: expected positive chunk counts")
    return sizes


def retrieve_section(ctx: BenchContext) -> list[Row]:
    """(d2) ``Retriever.retrieve`` latency with 16 concurrent clients vs 1 client, dense and hybrid.

    In-process on a fresh Milvus Lite collection of short synthetic chunks (one chunk each, ~280
    characters, embedded in the ingest's big batches) per size in :func:`retrieve_sizes`. The
    Retriever batches concurrent queries into one embedder call and one multi-vector Milvus search
    per (collection, scope, filter, top_k, mode) group, in worker threads (off the event loop).
    Goal: p99 <= 100 ms at 10k, 16 clients.
    """
    import asyncio

    from retrieval.bench import _config, _load, synthetic_documents
    from retrieval.embedder import Embedder
    from retrieval.retriever import Retriever

    quick, embedder, rows = ctx.mode == "quick", Embedder(), []
    queries = [d.text[:80] for d in synthetic_documents(16 * 25, 200, seed=3)]
    for size in retrieve_sizes(ctx.mode):
        with tempfile.TemporaryDirectory(prefix="retrieve-") as tmp:
            config = _config(Path(tmp), 300)
            config = config.model_copy(update={"ingest": config.ingest.model_copy(update={"batch_chunks": 1024})})
            retriever = Retriever(config, embedder=embedder)
            try:
                summary = retriever.ingestor.ingest("bench-retrieve", "bench", synthetic_documents(size, 280, seed=2),
                                                    progress=ctx.progress)
                for mode in ("dense", "hybrid"):
                    loaded = {r["metric"]: r for r in asyncio.run(_load(retriever, queries[:16 * (10 if quick else 25)],
                                                                        16, mode))}
                    alone = {r["metric"]: r for r in asyncio.run(_load(retriever, queries[:40], 1, mode))}
                    label = f"{mode} @{summary.chunks // 1000}k chunks"
                    labels = dict(ours_label="16 clients", peer_label="1 client")
                    rows += [
                        Row("d2_retrieve", f"p50 {label}", loaded["p50_latency"]["value"],
                            alone["p50_latency"]["value"], "ms", better="lower", **labels,
                            note=f"ingest {summary.chunks} chunks in {summary.seconds:.0f} s"),
                        Row("d2_retrieve", f"p99 {label}", loaded["p99_latency"]["value"],
                            alone["p99_latency"]["value"], "ms", better="lower", **labels,
                            note="goal <= 100 ms at 10k" if size == 10_000 else ""),
                        Row("d2_retrieve", f"queries/s {label}", loaded["throughput"]["value"],
                            alone["throughput"]["value"], "queries/s", **labels,
                            note=f"{loaded['p99_latency']['queries']} queries"),
                    ]
            finally:
                retriever.close()
    return rows


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
    """(e) The Ray Train + DeepSpeed recipe (1-2 workers, ZeRO 0/2/3, packing, gradient checkpointing)
    vs a plain single-process PEFT loop; notes carry tokens/s and per-rank memory."""
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
                note=f"{r['tokens_per_s']} tok/s, peak RSS {r['peak_rss_mb_per_worker']} MB/worker, "
                     f"params {r['param_mib_per_rank']} MiB/rank")
            for r in rows[1:]]


# "a_stack_vs_raw" replaces the serving section of that name in place (loadtests.cli merges
# {**SERVING_SECTIONS, **EXTRA_SECTIONS}, which keeps its position): the same rows plus Ray Serve LLM.
EXTRA_SECTIONS = {"a_stack_vs_raw": STACK_VS_PEERS, "c2_rag_overhead": rag_overhead_section,
                  "d_ingest": ingest_section, "d2_retrieve": retrieve_section, "e_training": training_section}
