"""``ragtune eval``: ask base, rag, ft and ft+rag the same questions through the served API.

    ragtune eval --docs DIR --qa QA.jsonl [--train TRAIN.jsonl | --adapter NAME]
                 [--updates UPDATES.jsonl] [--style-regex RE] [--arms base,rag,ft,ft+rag]
                 [--url URL] --out DIR

Without ``--url`` it starts the local stack (``ragtune serve`` on free loopback ports, a scratch
Milvus under ``--out``, the configured adapter store) and stops it by PID at the end. With
``--url`` it evaluates that deployment (key from ``RAGTUNE_API_KEY``). Either way the documents go
into a scratch collection through ``PUT /v1/collections/{c}/documents`` — the path a live update
takes — and the updates are applied the same way after the first round of questions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cluster.errors import ConfigError, InvalidRequestError, RagtuneError
from cluster.evals.arms import ARM_NAMES, Arm, ArmRun, Asker, Judge
from cluster.evals.inputs import Question, check_gold, load_qa, load_updates
from cluster.evals.report import arm_scores, recommend, write_report

__all__ = ["add_cli", "cmd_eval"]

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRAIN_CONFIG = REPO / "train" / "configs" / "example-cpu.yaml"
DEFAULT_SYSTEM = ("Answer the question in one or two sentences. If the answer is not in the documents "
                  "you were given, say \"I don't know\".")
_PUT_BATCH = 32


def add_cli(sub) -> None:
    p = sub.add_parser("eval", help="measure base vs RAG vs fine-tuned vs both on your documents and questions")
    p.add_argument("--config", "-c", help="stack config for the local run (default: embedded local defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stack config field for the local run (repeatable)")
    p.add_argument("--docs", required=True, help="folder (or file) of documents, ingested as `ragtune ingest` does")
    p.add_argument("--qa", required=True, help="QA.jsonl: {id, question, answers, documents, kind?} per line")
    p.add_argument("--train", help="TRAIN.jsonl for the ft arms (any format `ragtune train` accepts)")
    p.add_argument("--train-config", default=str(DEFAULT_TRAIN_CONFIG),
                   help="training recipe config used with --train (default: %(default)s)")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config field with --train, e.g. run.max_steps=20 (repeatable)")
    p.add_argument("--adapter", help="an existing adapter for the ft arms (instead of --train)")
    p.add_argument("--updates", help="UPDATES.jsonl: {document, text, questions: [{question, answers}]} per line")
    p.add_argument("--style-regex", help="the answer format fine-tuning should teach (Python regex, searched)")
    p.add_argument("--arms", default=",".join(ARM_NAMES), help="comma-separated subset of %(default)s")
    p.add_argument("--url", help="evaluate this running deployment (key from RAGTUNE_API_KEY)")
    p.add_argument("--out", required=True, help="output folder: report.json, report.md, report.png, answers.jsonl")
    p.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question in the rag arms")
    p.add_argument("--mode", choices=["dense", "hybrid"], default="hybrid", help="retrieval mode of the rag arms")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per arm")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system message sent on every arm ('' for none)")
    p.add_argument("--judge-url", help="optional LLM judge: any OpenAI-compatible base URL (key: RAGTUNE_JUDGE_API_KEY)")
    p.add_argument("--judge-model", help="the judge's model name (with --judge-url)")
    p.add_argument("--price-per-replica-hour", type=float, default=1.0, help="for cost per 1,000 requests")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas the price applies to")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_eval)


# ---- inputs ----------------------------------------------------------------------------------
def _arms(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown or not names:
        raise ConfigError(f"--arms: unknown arm(s) {unknown} (choose from {', '.join(ARM_NAMES)})", param="--arms")
    return list(dict.fromkeys(names))


def _style(spec: str | None) -> re.Pattern | None:
    if not spec:
        return None
    try:
        return re.compile(spec, re.MULTILINE)
    except re.error as exc:
        raise ConfigError(f"--style-regex: not a valid regular expression: {exc}", param="--style-regex") from exc


def _documents(docs: str) -> tuple[list[dict], list[str]]:
    """The documents as the ingest loaders read them (same ids), and the files that failed."""
    from retrieval.config import IngestConfig
    from retrieval.loaders import load_paths
    from retrieval.types import ItemError

    out, failed = [], []
    for item in load_paths([docs], max_chars=IngestConfig().max_document_chars):
        if isinstance(item, ItemError):
            failed.append(f"{item.item}: {item.reason}")
        else:
            out.append({"id": item.id, "text": item.text, "source": item.source, "metadata": dict(item.metadata)})
    return out, failed


# ---- the stack -------------------------------------------------------------------------------
class Api:
    """The served API's non-OpenAI routes the eval needs (documents, retrieve, models)."""

    def __init__(self, url: str, key: str | None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url, self.key = url.rstrip("/"), key
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=600)

    def _json(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise RagtuneError(f"{response.request.method} {response.request.url.path} → {response.status_code}: "
                               f"{response.text[:500]}")
        return response.json()

    def models(self) -> list[dict]:
        return self._json(self.http.get("/v1/models"))["data"]

    def put(self, collection: str, documents: list[dict]) -> dict:
        totals: dict[str, int] = {}
        for i in range(0, len(documents), _PUT_BATCH):
            summary = self._json(self.http.put(f"/v1/collections/{collection}/documents",
                                               json={"documents": documents[i:i + _PUT_BATCH]}))
            if summary.get("failed"):
                raise RagtuneError(f"ingest into {collection!r} failed for some documents: {summary.get('errors')}")
            for key in ("added", "updated", "unchanged", "chunks"):
                totals[key] = totals.get(key, 0) + int(summary.get(key, 0))
        return totals

    def delete(self, collection: str, ids: list[str]) -> None:
        self._json(self.http.request("DELETE", f"/v1/collections/{collection}/documents", json={"ids": ids}))

    def retrieve(self, collection: str, query: str, top_k: int, mode: str) -> list[dict]:
        body = {"collection": collection, "query": query, "top_k": top_k, "mode": mode}
        return self._json(self.http.post("/v1/retrieve", json=body))["data"]


def _local_config(args, out: Path) -> dict:
    """The stack config for a local run: free loopback ports and a scratch knowledge store under ``out``."""
    from cluster.config import load_config
    from cluster.processes import scratch_stack

    cfg = load_config(args.config, args.overrides).resolved()
    if cfg.serve.auth.keys:
        raise ConfigError("the local eval stack runs open on loopback; remove serve.auth.keys or use --url",
                          param="serve.auth.keys")
    return scratch_stack(cfg.model_dump(mode="json"), out / "work")


@contextmanager
def _stack(args, cfg, out: Path) -> Iterator[tuple[str, str | None]]:
    """(url, key) of ``--url``, or of a local stack started from ``cfg`` for this run and stopped after."""
    if args.url:
        yield args.url, os.environ.get("RAGTUNE_API_KEY")
        return
    from cluster.processes import RagtuneServer

    (out / "work" / "milvus").mkdir(parents=True, exist_ok=True)
    print(f"starting the local stack (log: {out / 'work' / 'ragtune-serve.log'}) …", flush=True)
    with RagtuneServer(cfg, out / "work") as server:
        yield server.url, None


def _train(args, store: str | None, out: Path) -> tuple[str | None, str | None]:
    """Train (or reuse) the adapter for ``--train``; returns (adapter name, why not)."""
    import yaml

    # Named by what determines it (data, recipe, overrides), so a re-run reuses a finished adapter.
    digest = hashlib.sha256(Path(args.train).read_bytes() + Path(args.train_config).read_bytes()
                            + "\0".join(args.train_overrides).encode()).hexdigest()[:10]
    name = f"eval-ft-{digest}"
    with open(args.train_config) as f:
        recipe = yaml.safe_load(f)
    store = store or recipe["export"]["store"]
    from serve.registry import open_registry

    def registered() -> bool:
        try:
            index = open_registry(store, base_model=recipe["base_model"])
            return any(a["name"] == name for a in index.list())
        except (RagtuneError, OSError, KeyError):
            return False

    if registered():
        print(f"adapter {name} (trained from this exact file) is already in {store}; reusing it")
        return name, None
    cmd = [sys.executable, "-m", "cluster.cli", "train", args.train_config,
           "--set", f"data.paths=[{Path(args.train).resolve()}]", "--set", f"export.adapter_name={name}",
           "--set", f"export.store={store}", "--set", f"run.name={name}-{int(time.time())}",
           "--set", f"run.storage_path={(out / 'work' / 'ray_results').resolve()}",
           *(x for o in args.train_overrides for x in ("--set", o))]
    print(f"training {name} with {args.train_config} (log: {out / 'work' / 'train.log'}) …", flush=True)
    (out / "work").mkdir(parents=True, exist_ok=True)
    with open(out / "work" / "train.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if rc != 0 or not registered():
        return None, f"training failed (exit {rc}); see {out / 'work' / 'train.log'}"
    return name, None


# ---- the run ---------------------------------------------------------------------------------
def _retrieval(api: Api, collection: str, questions: list[Question], top_k: int, mode: str) -> dict[str, dict]:
    """Per answerable question: hit@k, MRR@k and nDCG@k of ``/v1/retrieve`` against the gold documents
    (ranx, through ``retrieval.quality``), plus the ranked documents for the per-question file."""
    from retrieval.quality import retrieval_metrics

    labelled = [q for q in questions if q.answerable]
    if not labelled:
        return {}
    ranked = {q.id: list(dict.fromkeys(hit["document"] for hit in api.retrieve(collection, q.question, top_k, mode)))
              for q in labelled}
    scores = retrieval_metrics(ranked, {q.id: set(q.documents) for q in labelled}, k=top_k, per_question=True)
    return {qid: {"hit": s[f"hit@{top_k}"], "rr": s[f"mrr@{top_k}"], "ndcg": s[f"ndcg@{top_k}"], "ranked": ranked[qid]}
            for qid, s in scores["per_question"].items()}


async def _ask(args, url: str, key: str | None, collection: str, arms: list[Arm], questions: list[Question],
               updates: list, by_id: dict[str, Question], apply_updates) -> list[ArmRun]:
    """Every arm on the questions; then, if there are updates, apply them and ask their questions."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=key or "none", max_retries=0,
                                  timeout=600) as client:
        asker = Asker(client, collection=collection, top_k=args.top_k, mode=args.mode, max_tokens=args.max_tokens,
                      concurrency=args.concurrency, system=args.system or None, progress=args.progress)
        runs = [await asker.run(arm, questions) for arm in arms]
        if updates:
            await asyncio.to_thread(apply_updates)
            fresh = [q for u in updates for q in u.questions]
            for run in runs:
                extra = await asker.run(run.arm, fresh, phase="fresh")
                run.answers += extra.answers
    if args.judge_url:
        async with openai.AsyncOpenAI(base_url=args.judge_url, api_key=os.environ.get("RAGTUNE_JUDGE_API_KEY", "none"),
                                      max_retries=0, timeout=600) as judge_client:
            verdicts = await Judge(judge_client, args.judge_model, args.concurrency).grade_all(
                [a for run in runs for a in run.answers], by_id)
        for run in runs:
            for a in run.answers:
                a.judge = verdicts.get((a.arm, a.question_id, a.phase))
    for run in runs:  # cost per request from the first round's throughput
        qa_count = sum(a.phase == "qa" for a in run.answers)
        run.wall_s = run.wall_s * len(run.answers) / max(qa_count, 1)
    return runs


def cmd_eval(args) -> int:
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    wanted, style = _arms(args.arms), _style(args.style_regex)
    if bool(args.judge_url) != bool(args.judge_model):
        raise ConfigError("--judge-url and --judge-model go together", param="--judge-model")
    questions = load_qa(args.qa)
    updates = load_updates(args.updates) if args.updates else []
    documents, failed_docs = _documents(args.docs)
    if not documents:
        raise InvalidRequestError(f"--docs {args.docs}: no documents could be loaded ({failed_docs[:5]})")
    check_gold(questions, updates, {d["id"] for d in documents})
    for line in failed_docs:
        print(f"warning: not ingested: {line}", file=sys.stderr)
    skipped: dict[str, str] = {} if args.adapter or args.train else {
        arm: "no --adapter and no --train: nothing fine-tuned to evaluate" for arm in ("ft", "ft+rag") if arm in wanted}
    out.mkdir(parents=True, exist_ok=True)
    by_id = {q.id: q for q in questions} | {q.id: q for u in updates for q in u.questions}
    collection = f"eval-{uuid.uuid4().hex[:8]}"

    cfg = None if args.url else _local_config(args, out)
    adapter = args.adapter
    needs_ft = any(a in wanted and a not in skipped for a in ("ft", "ft+rag"))
    if needs_ft and not adapter:  # before the stack starts: the two would share 2 cores otherwise
        adapter, why = _train(args, cfg["serve"]["adapters"]["store_uri"] if cfg else None, out)
        if why:
            skipped.update({a: why for a in ("ft", "ft+rag") if a in wanted})

    with _stack(args, cfg, out) as (url, key):
        api = Api(url, key)
        models = api.models()
        base = next((m["id"] for m in models if not m.get("parent")), None)
        if base is None:
            raise RagtuneError(f"{url}/v1/models lists no base model")
        if adapter and needs_ft and adapter.split("@")[0] not in {m["id"].split("@")[0] for m in models}:
            skipped.update({a: f"adapter {adapter!r} is not served at {url}" for a in ("ft", "ft+rag") if a in wanted})
        arms = [Arm(n, adapter if n.startswith("ft") else base, n.endswith("rag")) for n in wanted if n not in skipped]

        ingest = api.put(collection, documents)
        print(f"ingested {len(documents)} documents into {collection}: {ingest}", flush=True)
        try:
            retrieval = _retrieval(api, collection, questions, args.top_k, args.mode) if any(a.rag for a in arms) else {}
            runs = asyncio.run(_ask(args, url, key, collection, arms, questions, updates, by_id,
                                    lambda: api.put(collection, [{**next(d for d in documents if d["id"] == u.document),
                                                                  "text": u.text} for u in updates])))
        finally:
            api.delete(collection, [d["id"] for d in documents])

    scored = {run.arm.name: arm_scores(run, by_id, style=style, retrieval=retrieval,
                                       price_per_replica_hour=args.price_per_replica_hour, replicas=args.replicas)
              for run in runs}
    arms_report = {name: row for name, (row, _) in scored.items()}
    items = {name: per_item for name, (_, per_item) in scored.items()}
    report = {
        "arms": arms_report,
        "skipped": skipped,
        "recommendation": recommend(arms_report, items, skipped),
        "settings": {"url": url, "base_model": base, "adapter": adapter, "collection": collection,
                     "documents": len(documents), "not_ingested": failed_docs, "questions": len(questions),
                     "update_questions": sum(len(u.questions) for u in updates), "top_k": args.top_k,
                     "mode": args.mode, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "system": args.system, "style_regex": args.style_regex,
                     "price_per_replica_hour": args.price_per_replica_hour, "replicas": args.replicas},
    }
    write_report(out, report, [a for run in runs for a in run.answers], by_id)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}, chart: {out / 'report.png'}, per question: {out / 'answers.jsonl'}")
    return 0

