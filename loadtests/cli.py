"""The ``loadtest`` and ``bench`` subcommands, for ``cluster/cli.py`` (or ``python -m loadtests.cli``).

Each registered parser gets ``func``: ``args.func(args) -> int`` runs it and returns the exit code
(0 = report written with at least one success, 1 = no request succeeded, 2 = bad options).
Environment variables are read only here: ``RAGTUNE_API_KEY`` (else ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from cluster.errors import ConfigError
from cluster.models import SMOLLM2
from loadtests.bench import RESULTS_DIR, SERVING_SECTIONS, BenchContext, BenchTargets, Section, run_bench
from loadtests.config import LoadTestConfig, parse_levels, parse_mix, parse_slo

__all__ = ["add_cli", "main"]


def _spec(parser: Callable):
    """Wrap a spec parser so argparse reports its ConfigError as a usage error naming the part."""

    @functools.wraps(parser)
    def parse(text: str):
        try:
            return parser(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return parse


def _loadtest_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--config", type=Path, help="YAML file of LoadTestConfig fields; the options below override it.")
    a("--url", help="Server base URL (default http://127.0.0.1:8000). Passing it allows non-loopback hosts.")
    a("--api", choices=["chat", "completions"], help="Endpoint (default chat).")
    a("--api-key", help="Bearer key (default $RAGTUNE_API_KEY, else $OPENAI_API_KEY).")
    a("--mix", type=_spec(parse_mix), help=f"Models/adapters with weights, e.g. base=0.5,my-adapter=0.5 "
                                           f"(default {SMOLLM2}=1).")
    a("--rag-fraction", type=float, help="Share of requests that carry `rag` (0..1).")
    a("--rag-collection", help="Collection for RAG requests.")
    a("--rag-top-k", type=int, help="top_k for RAG requests.")
    a("--rag-mode", choices=["dense", "hybrid"], help="Retrieval mode for RAG requests.")
    a("--prompts", help="'synthetic' (default) or a JSONL file of {prompt|messages, max_tokens?}.")
    a("--input-tokens", type=int, help="Synthetic prompt length in ~1-token words (default 128).")
    a("--output-tokens", type=int, help="max_tokens per request (default 64).")
    a("--no-output-control", action="store_true", help="Do not send ignore_eos/min_tokens (vLLM extensions).")
    a("--shape", choices=["concurrency", "constant", "poisson"], help="Load shape (default concurrency).")
    a("--levels", type=_spec(parse_levels), help="Comma list: concurrencies or req/s; several = a sweep.")
    a("--duration", type=float, help="Seconds each step may issue requests (default 30).")
    a("--requests", type=int, help="Most requests per step (default 200; 0 = bounded by --duration only).")
    a("--max-in-flight", type=int, help="Open-loop cap on requests in flight (default 1024).")
    a("--slo", type=_spec(parse_slo), help="Goodput SLOs, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=10000.")
    a("--timeout", type=float, help="Per-request limit, seconds (default 120).")
    a("--drain-timeout", type=float, help="Seconds in-flight requests may finish after a step (default 30).")
    a("--client", choices=["httpx", "httpx2", "aiohttp"], help="HTTP client (default httpx).")
    a("--seed", type=int, help="Seed for prompts, mix, RAG choice and Poisson gaps.")
    a("--out", type=Path, help="Report folder (default data/loadtests/<UTC time>).")
    a("--no-plots", action="store_true", help="Skip the PNG plots.")
    a("--no-progress", action="store_true", help="No progress bar.")


def _put(data: dict, path: str, value) -> None:
    if value is None:
        return
    *parents, leaf = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


_OPTION_FIELDS = {"api": "api", "mix": "mix", "rag_fraction": "rag.fraction",
                  "rag_collection": "rag.collection", "rag_top_k": "rag.top_k", "rag_mode": "rag.mode",
                  "input_tokens": "prompts.input_tokens", "output_tokens": "prompts.output_tokens",
                  "shape": "shape.kind", "levels": "shape.levels", "duration": "shape.duration_s",
                  "max_in_flight": "shape.max_in_flight", "slo": "slo", "timeout": "request_timeout_s",
                  "drain_timeout": "drain_timeout_s", "client": "client", "seed": "seed"}


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> LoadTestConfig:
    """Build the config: ``--config`` YAML, then every option given, then the API key from ``env``."""
    data = (yaml.safe_load(args.config.read_text()) or {}) if args.config else {}
    for option, path in _OPTION_FIELDS.items():
        value = getattr(args, option)
        if option == "mix" and value is not None:
            value = [m.model_dump() for m in value]
        elif option == "slo" and value is not None:
            value = value.model_dump(exclude_none=True)
        _put(data, path, value)
    if args.url:
        data.update(base_url=args.url, allow_remote=True)  # an explicit URL may point anywhere
    if args.requests is not None:
        data.setdefault("shape", {})["requests"] = args.requests or None  # 0: bounded by time only
    if args.prompts and args.prompts != "synthetic":
        _put(data, "prompts.source", "jsonl")
        _put(data, "prompts.path", args.prompts)
    if args.no_output_control:
        _put(data, "prompts.control_output_length", False)
    _put(data, "api_key", args.api_key or env.get("RAGTUNE_API_KEY") or env.get("OPENAI_API_KEY"))
    data.update({k: False for k, flag in (("plots", args.no_plots), ("progress", args.no_progress)) if flag})
    return LoadTestConfig.model_validate(data)


def _explain(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
                         for e in exc.errors())
    return exc.message if isinstance(exc, ConfigError) else str(exc)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtests.runner import run_loadtest  # heavy imports only when the command runs

    try:
        cfg = config_from_args(args)
        out = args.out or Path("data/loadtests") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        report = run_loadtest(cfg, out)
    except (ValidationError, ConfigError, OSError) as exc:
        print(f"ragtune loadtest: error: {_explain(exc)}", file=sys.stderr)
        return 2
    print(Path(report.files["markdown"]).read_text())
    print("reports: " + ", ".join(report.files.values()))
    return 0 if any(s.ok for s in report.steps) else 1


def _bench_args(p: argparse.ArgumentParser, sections: Mapping[str, Section]) -> None:
    a = p.add_argument
    a("--ours", help="Base URL of our running stack (else the injected start_ours starts one).")
    a("--peer", help="Base URL of a raw vLLM server (else start_raw_vllm with --model-dir, if injected).")
    a("--ours-model", default=SMOLLM2, help=f"Base model name on our stack (default {SMOLLM2}).")
    a("--peer-model", help="Model name on the peer (default: --ours-model).")
    a("--adapters", default="", help="Comma list of ≥8 adapter names on our stack, for section b.")
    a("--rag-collection", help="Collection with documents, for section c.")
    a("--mode", choices=["quick", "full"], default="quick", help="quick: CI-sized; full: minutes per section.")
    a("--sections", default=",".join(sections), help=f"Comma list of sections (default all: {', '.join(sections)}).")
    a("--results-dir", type=Path, default=RESULTS_DIR, help="Where <date>-<machine>.md/.json go.")
    a("--work-dir", type=Path, help="Raw per-run reports (default data/bench/<UTC time>).")
    a("--api-key", help="Bearer key for our stack (default $RAGTUNE_API_KEY).")
    a("--client", choices=["httpx", "httpx2", "aiohttp"], default="httpx", help="HTTP client.")
    a("--server-config", type=Path, help="Passed to the injected start_ours(config).")
    a("--model-dir", type=Path, help="Passed to the injected start_raw_vllm(model_dir).")
    a("--progress", action="store_true", help="Show progress bars.")


def _targets(args: argparse.Namespace, start_ours, start_raw_vllm) -> BenchTargets:
    ours = args.ours or (start_ours(args.server_config) if start_ours else None)
    if not ours:
        raise ConfigError("bench: pass --ours URL (no server lifecycle was injected)", param="--ours")
    peer = args.peer or (start_raw_vllm(args.model_dir) if start_raw_vllm and args.model_dir else None)
    return BenchTargets(ours_url=ours, ours_model=args.ours_model, peer_url=peer, peer_model=args.peer_model,
                        adapters=tuple(a for a in args.adapters.split(",") if a),
                        rag_collection=args.rag_collection,
                        api_key=args.api_key or os.environ.get("RAGTUNE_API_KEY"))


def _cmd_bench(args: argparse.Namespace, *, sections: Mapping[str, Section], start_ours, start_raw_vllm) -> int:
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in sections]
    if unknown:
        print(f"ragtune bench: error: unknown section(s) {unknown}; known: {list(sections)}", file=sys.stderr)
        return 2
    try:
        targets = _targets(args, start_ours, start_raw_vllm)
    except ConfigError as exc:
        print(f"ragtune bench: error: {exc.message}", file=sys.stderr)
        return 2
    work = args.work_dir or Path("data/bench") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx = BenchContext(targets=targets, mode=args.mode, work_dir=work, progress=args.progress, client=args.client)
    result = run_bench(ctx, {s: sections[s] for s in chosen}, args.results_dir)
    print(Path(result.files["markdown"]).read_text())
    return 0


def add_cli(subparsers, *, start_ours: Callable | None = None, start_raw_vllm: Callable | None = None,
            extra_sections: Mapping[str, Section] | None = None) -> None:
    """Register ``loadtest`` and ``bench`` on an argparse subparsers object.

    Args:
        subparsers: From ``parser.add_subparsers()``.
        start_ours: ``start_ours(config) -> url`` starts our stack when ``bench`` gets no ``--ours``.
        start_raw_vllm: ``start_raw_vllm(model_dir) -> url`` starts the raw vLLM peer when ``bench``
            gets no ``--peer`` but a ``--model-dir``. Stopping both is the caller's job.
        extra_sections: More bench sections (e.g. ingest, training), appended after the serving ones.
    """
    lt = subparsers.add_parser("loadtest", help="Load-test an OpenAI-compatible endpoint (streaming).",
                               description="Streams requests at a load shape; writes JSON, Markdown and PNG reports.")
    _loadtest_args(lt)
    lt.set_defaults(func=_cmd_loadtest)
    sections = {**SERVING_SECTIONS, **(extra_sections or {})}
    bench = subparsers.add_parser("bench", help="Side-by-side benchmark sections on this machine.",
                                  description="Writes loadtests/results/<date>-<machine>.md and .json.")
    _bench_args(bench, sections)
    bench.set_defaults(func=functools.partial(_cmd_bench, sections=sections, start_ours=start_ours,
                                              start_raw_vllm=start_raw_vllm))


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m loadtests.cli {loadtest,bench} ...``."""
    parser = argparse.ArgumentParser(prog="ragtune")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
