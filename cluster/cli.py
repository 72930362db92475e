"""The ``ragtune`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys

# Ray reads this once, when it is first imported: set before anything imports ray, or a local
# head started on 127.0.0.1 is silently moved to the host's address (DESIGN.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.config import load_config
from cluster.errors import RagtuneError

__all__ = ["main"]

logger = logging.getLogger("ragtune")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: embedded local defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set serve.engine.dtype=bfloat16 (repeatable)")


def _cfg(args):
    return load_config(args.config, args.overrides)


def cmd_bootstrap(args) -> int:
    """Build the packaged models (idempotent)."""
    from cluster.models import build_model

    cfg = _cfg(args)
    for name in args.models:
        print(build_model(name, cfg.resolved().models_dir))
    return 0


def _banner(cfg, base_url: str) -> None:
    model = cfg.serve.engine.base_name
    key = ' -H "Authorization: Bearer $RAGTUNE_API_KEY"' if cfg.serve.auth.keys else ""
    print(f"\nragtune is serving {model} at {base_url}  (Ctrl-C to stop)\n", flush=True)
    print(f"  curl -s {base_url}/v1/chat/completions{key} -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": "
          f"\"What is the capital of France?\"}}], \"max_tokens\": 32}}'\n", flush=True)
    try:
        adapters = [a["name"] for a in _registry(cfg).list()]
    except (RagtuneError, OSError) as exc:  # a banner never stops serving; the store errs on first use
        adapters = [f"(adapter store unreadable: {getattr(exc, 'message', exc)})"]
    if adapters:
        print(f"  adapters: {', '.join(adapters)} — request one by name as \"model\"; add "
              f"\"rag\": {{\"collection\": \"ragtune-docs\"}} for retrieval (README: the four calls)\n", flush=True)


def cmd_serve(args) -> int:
    """Serve the configured app until Ctrl-C."""
    from cluster.local import run_serving

    cfg = _cfg(args)
    run_serving(cfg, on_ready=lambda url: _banner(cfg, url))
    return 0


def _ingest_sample(cfg) -> None:
    from retrieval.sample_kb import ingest_sample_kb_from_config

    summary = ingest_sample_kb_from_config(cfg.retrieval)
    print(f"sample knowledge base: {summary.to_dict()}", flush=True)


def cmd_up(args) -> int:
    """Local stack on embedded defaults: Ray, Milvus, base model, sample knowledge, serving."""
    from cluster.local import run_serving

    cfg = _cfg(args)
    before = _ingest_sample if cfg.serve.rag_enabled else None
    run_serving(cfg, on_ready=lambda url: _banner(cfg, url), before_serving=before)
    return 0


def cmd_ingest(args) -> int:
    """Ingest files/folders into a collection (incremental; --prune deletes removed documents)."""
    from cluster.local import knowledge_store
    from retrieval.ingest import Ingestor

    with knowledge_store(_cfg(args)) as cfg:
        ingestor = Ingestor.from_config(cfg.retrieval)
        try:
            summary = ingestor.ingest_paths(args.collection, args.tenant, args.paths, prune=args.prune,
                                            public=args.public or None)
        finally:
            ingestor.close()
    print(json.dumps(summary.to_dict(), indent=2))
    return 1 if summary.to_dict().get("failed") else 0


def cmd_keys(args) -> int:
    """Create an API key: print the key once and the config entry holding only its hash."""
    from serve.config import hash_key

    key = "rt-" + secrets.token_urlsafe(32)
    print(f"API key (shown once): {key}")
    print("Add to serve.auth.keys in your config:")
    print(f"  - {{sha256: {hash_key(key)}, tenant: {args.tenant}, admin: {str(args.admin).lower()}}}")
    return 0


def _registry(cfg):
    from cluster.models import resolve_model
    from serve.registry import open_registry

    cfg = cfg.resolved()
    engine = cfg.serve.engine
    return open_registry(cfg.serve.adapters.store_uri, base_model=engine.base_name,
                         base_model_path=resolve_model(engine.model, cfg.models_dir), max_lora_rank=engine.max_lora_rank)


def cmd_adapters(args) -> int:
    """Manage the adapter store (operator side: paths are allowed here, never over HTTP)."""
    registry = _registry(_cfg(args))
    if args.action == "list":
        print(json.dumps(registry.list(), indent=2))
    elif args.action == "register":
        ref = registry.register(args.path, args.name, owner=args.tenant, promote=args.promote or None)
        print(f"registered {ref.key} (lora_id={ref.lora_id})")
    elif args.action == "promote":
        print(f"promoted {registry.promote(args.name, args.version).key}")
    elif args.action == "rollback":
        print(f"rolled back to {registry.rollback(args.name).key}")
    elif args.action == "recover":  # also runs on every open; this reports what it repaired
        repaired = registry.repaired + registry.recover()
        print("\n".join(f"repaired: {item}" for item in repaired) or "adapter store is consistent")
    return 0


class _BenchLifecycle:
    """Servers that `ragtune bench` starts on demand, stopped when the command ends."""

    def __init__(self) -> None:
        self.servers = None

    def _get(self):
        from cluster.bench import BenchServers

        self.servers = self.servers or BenchServers()
        return self.servers

    def start_ours(self, config_path):
        return self._get().start_ours(config_path)

    def start_raw_vllm(self, model_dir):
        return self._get().start_raw_vllm(model_dir)

    def close(self) -> None:
        if self.servers is not None:
            self.servers.close()


def _add_loadtests(sub, lifecycle: _BenchLifecycle) -> None:
    from cluster.bench import EXTRA_SECTIONS, prepare_bench_args
    from loadtests.cli import add_cli

    add_cli(sub, start_ours=lifecycle.start_ours, start_raw_vllm=lifecycle.start_raw_vllm,
            extra_sections=EXTRA_SECTIONS)
    bench = sub.choices["bench"]
    run = bench.get_default("func")

    def run_bench(args):
        prepare_bench_args(args, lifecycle)
        return run(args)

    bench.set_defaults(func=run_bench)


def build_parser(lifecycle: _BenchLifecycle | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the local stack on embedded defaults (Ctrl-C stops it)")
    _config_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", help="serve the configured app (local Ray or ray.address)")
    _config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ingest", help="ingest documents (.md .txt .jsonl .pdf .html .docx .pptx .xlsx) into a knowledge collection")
    _config_args(p)
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--collection", required=True)
    p.add_argument("--tenant", default="local", help="owner tenant of the collection (default: local)")
    p.add_argument("--prune", action="store_true", help="delete stored documents missing from PATHS")
    p.add_argument("--public", action="store_true", help="make the collection readable by every tenant")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("bootstrap", help="build packaged base models into data_dir/models")
    _config_args(p)
    p.add_argument("models", nargs="*", default=["smollm2-135m-instruct", "tiny-llama"])
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("keys", help="create an API key for a tenant")
    p.add_argument("action", choices=["create"])
    p.add_argument("--tenant", required=True)
    p.add_argument("--admin", action="store_true")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("adapters", help="list/register/promote/rollback adapters in the store (as the operator); "
                       "recover: repair an interrupted registration")
    _config_args(p)
    p.add_argument("action", choices=["list", "register", "promote", "rollback", "recover"])
    p.add_argument("name", nargs="?")
    p.add_argument("--path", help="register: the PEFT adapter folder")
    p.add_argument("--tenant", help="register: owner tenant, who may then promote/roll back/load it over HTTP "
                   "(default: shared, which only admin keys manage)")
    p.add_argument("--promote", action="store_true", help="register: promote the new version")
    p.add_argument("--version", type=int, help="promote: the version")
    p.set_defaults(func=cmd_adapters)

    _add_loadtests(sub, lifecycle or _BenchLifecycle())
    from cluster.evals.cli import add_cli as add_eval_cli
    from cluster.k8s_render import add_cli as add_render_cli
    from train.cli import add_cli as add_train_cli

    add_render_cli(sub)
    add_train_cli(sub)
    add_eval_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    lifecycle = _BenchLifecycle()
    args = build_parser(lifecycle).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except RagtuneError as exc:
        print(f"ragtune: error: {exc.message}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"ragtune: error: {exc}", file=sys.stderr)
        return 2
    finally:
        lifecycle.close()


if __name__ == "__main__":
    sys.exit(main())
