"""``ragtune train``: run locally, or submit to / inspect a Ray cluster through the Jobs API.

    ragtune train CONFIG [--set key=value ...] [--address ADDR]    run here (local Ray or ADDR)
    ragtune train submit CONFIG --address http://HOST:8265 [--set ...] [--wait]
    ragtune train status|logs|stop JOB_ID --address http://HOST:8265
    ragtune train status --adapter NAME[@VERSION] [--store DIR]    the MLflow run behind an adapter

``add_cli(subparsers)`` registers the command on the main ``ragtune`` parser; every handler is
``func(args) -> int``. ``python -m train.cli ...`` takes the same arguments (the job entrypoint).

Ray 2.60 turns token auth on by default: the dashboard answers 401 without
``Authorization: Bearer <token>``. ``JobSubmissionClient`` only adds that header when the
*client* process runs in token mode (``RAY_AUTH_MODE=token``), so we pass it explicitly, read
like Ray does: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from cluster.errors import ConfigError, RagtuneError
from cluster.processes import free_port
from train.config import TrainConfig, load_config

__all__ = [
    "add_cli",
    "auth_headers",
    "job_client",
    "job_config_for",
    "main",
    "start_local_ray",
    "submit_job",
    "wait_job",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = "RAGTUNE_TRAIN_CONFIG"  # the job's resolved TrainConfig (JSON) travels in its env
# Shipped with a job: the source tree, without the venv, local data and git history.
JOB_EXCLUDES = ["/.venv", "/data", "/.git", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]
_EXCLUDED_TOP = {"data", ".venv", ".git"}
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_ACTIONS = ("run", "submit", "status", "logs", "stop")


# ---- Ray connections -----------------------------------------------------------------------
def start_local_ray(num_cpus: int | None = None) -> str:
    """Start a single-node Ray on loopback with its dashboard; return the dashboard URL.

    Ray Train's placement-group cleaner finds "the" cluster through the state API; on a host
    with another Ray running (a dev box) that lookup is ambiguous, so we name ours explicitly.
    """
    import ray

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Without this Ray may silently rewrite the node IP to a non-loopback address (DESIGN.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # address="local": always a new cluster (None would join whichever Ray this host started last).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": url}})
    return url


def auth_headers(token: str | None = None) -> dict[str, str]:
    """The bearer header for a token-auth Ray dashboard, or ``{}`` when no token is configured."""
    if token is None:
        token = os.environ.get("RAY_AUTH_TOKEN")
    if token is None:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str, token: str | None = None):
    """A ``JobSubmissionClient`` for ``http://HOST:8265`` carrying the auth token if any."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r}: the Jobs API wants the dashboard URL, e.g. http://HOST:8265",
                          param="--address")
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except AuthenticationError as exc:  # the constructor's version check is already authenticated
        raise ConfigError(f"Ray Jobs API at {address}: {exc} (give the cluster's token, from `ray get-auth-token` "
                          "on the head, in RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH)", param="RAY_AUTH_TOKEN") from None
    except (ConnectionError, RuntimeError) as exc:
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {exc}", param="--address") from None


# ---- submission ----------------------------------------------------------------------------
def _job_path(value: str | None, repo: Path) -> str | None:
    """Keep paths that ship with the working_dir relative; make the rest absolute.

    Absolute paths are right on the same host or a cluster with a shared filesystem; on
    anything else point storage/store at shared storage (s3://, NFS) in the config.
    """
    if value is None or "://" in value or Path(value).is_absolute():
        return value
    path = (Path.cwd() / value).resolve()
    inside = path.is_relative_to(repo) and path.relative_to(repo).parts[:1] not in ((p,) for p in _EXCLUDED_TOP)
    return str(path.relative_to(repo)) if inside else str(path)


def job_config_for(cfg: TrainConfig, repo: Path = REPO_ROOT) -> TrainConfig:
    """``cfg`` with paths rewritten for a job whose working directory is a copy of ``repo``."""
    raw = cfg.model_dump()
    for key in ("models_dir", "torch_extensions_dir"):
        raw[key] = _job_path(raw[key], repo)
    raw["data"]["paths"] = [_job_path(p, repo) for p in raw["data"]["paths"]]
    for section, key in (("data", "eval_path"), ("run", "storage_path"), ("run", "tensorboard_dir"),
                         ("export", "store")):
        raw[section][key] = _job_path(raw[section][key], repo)
    if (Path.cwd() / cfg.base_model).is_dir():
        raw["base_model"] = _job_path(cfg.base_model, repo)
    return TrainConfig.model_validate(raw)


def submit_job(cfg: TrainConfig, address: str, *, repo: Path = REPO_ROOT, python: str = sys.executable,
               token: str | None = None, submission_id: str | None = None) -> str:
    """Submit ``cfg`` as a Ray job that ships ``repo``; returns the job id.

    The entrypoint runs ``python -m train.cli run`` with the submitter's interpreter path
    (``python``): the cluster must have the same venv at the same path (true for a local head,
    and for images built from this repo).
    """
    job_cfg = job_config_for(cfg, repo)
    for path in job_cfg.data.paths:  # fail here, not in the job, when a dataset is missing
        if not (Path(path) if Path(path).is_absolute() else repo / path).is_file():
            raise ConfigError(f"train config: data.paths: {path} does not exist", param="data.paths")
    env = {CONFIG_ENV: job_cfg.model_dump_json()}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    entrypoint = f"{shlex.quote(python)} -m train.cli run --config-env {CONFIG_ENV} --address auto"
    job_id = job_client(address, token).submit_job(
        entrypoint=entrypoint, submission_id=submission_id or f"ragtune-train-{cfg.run.name}-{int(time.time())}",
        runtime_env={"working_dir": str(repo), "excludes": JOB_EXCLUDES, "env_vars": env},
        metadata={"ragtune.run": cfg.run.name, "ragtune.adapter": cfg.export.adapter_name,
              **_tracking_metadata(cfg)},
    )
    logger.info("run %s: submitted job %s to %s", cfg.run.name, job_id, address)
    return job_id


def _tracking_metadata(cfg: TrainConfig) -> dict[str, str]:
    """Where the job's MLflow run will be (paths resolved as the run will resolve them)."""
    if not cfg.tracking.mlflow:
        return {}
    from train.launch import resolve_paths
    from train.tracking import tracking_uri

    return {"ragtune.tracking_uri": tracking_uri(resolve_paths(cfg)), "ragtune.experiment": cfg.tracking.experiment}


def wait_job(client, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Poll until the job reaches a terminal state; return it (``SUCCEEDED``/``FAILED``/``STOPPED``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")


# ---- handlers ------------------------------------------------------------------------------
def _load(args) -> TrainConfig:
    if getattr(args, "config_env", None):
        return load_config(json.loads(os.environ[args.config_env]), args.overrides)
    if not args.config:
        raise ConfigError("a CONFIG file is required", param="config")
    return load_config(args.config, args.overrides)


def _cmd_run(args) -> int:
    import ray

    from train.launch import launch

    cfg = _load(args)
    if args.address:
        ray.init(address=args.address)
    else:
        start_local_ray(args.num_cpus)
    try:
        outcome = launch(cfg)
    finally:
        ray.shutdown()
    print(json.dumps({"run": outcome.run_name, "step": outcome.metrics.get("step"),
                      "loss": outcome.metrics.get("loss"), "eval_loss": outcome.metrics.get("eval_loss"),
                      "checkpoint": outcome.checkpoint,
                      "adapter": outcome.adapter.key if outcome.adapter else None}, indent=2))
    return 0


def _cmd_submit(args) -> int:
    job_id = submit_job(_load(args), args.address, python=args.python)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    client = job_client(args.address)
    status = wait_job(client, job_id)
    print(client.get_job_logs(job_id)[-4000:])
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _job_tracking(metadata: dict) -> dict | None:
    uri = metadata.get("ragtune.tracking_uri")
    if not uri:
        return None
    return {"tracking_uri": uri, "experiment": metadata.get("ragtune.experiment"),
            "look": f"mlflow ui --backend-store-uri {uri}  -> runs tagged ragtune.run_name={metadata.get('ragtune.run')}"}


def _adapter_status(ref_text: str, store: str) -> dict:
    from serve.registry import AdapterRegistry
    from train.tracking import where

    if not Path(store).is_dir():
        raise ConfigError(f"--store {store}: no adapter store there", param="--store")
    registry = AdapterRegistry(store, base_model="")  # reading only: the base model matters to register
    ref = registry.resolve(ref_text)
    manifest = registry.manifest(ref)
    run = manifest.get("tracking")
    return {"adapter": ref.key, "path": ref.path, "run_name": manifest.get("run_name"),
            "dataset_hash": manifest.get("dataset_hash"), "exported": manifest.get("exported"),
            "checkpoint": manifest.get("checkpoint"), "tracking": run,
            "look": where(run) if run else "this version has no tracked run (trained without tracking.mlflow)"}


def _cmd_status(args) -> int:
    if args.adapter:
        print(json.dumps(_adapter_status(args.adapter, args.store), indent=2))
        return 0
    if not (args.job_id and args.address):
        raise ConfigError("status needs JOB_ID and --address, or --adapter NAME[@VERSION]", param="job_id")
    info = job_client(args.address).get_job_info(args.job_id)
    metadata = info.metadata or {}
    print(json.dumps({"job_id": args.job_id, "status": str(info.status.value), "message": info.message,
                      "entrypoint": info.entrypoint, "metadata": metadata,
                      "tracking": _job_tracking(metadata)}, indent=2))
    return 0


def _cmd_logs(args) -> int:
    client = job_client(args.address)
    if not args.follow:
        print(client.get_job_logs(args.job_id), end="")
        return 0
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(args.job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    return 0


def _cmd_stop(args) -> int:
    stopped = job_client(args.address).stop_job(args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


# ---- argument parsing ----------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="train YAML config (see train/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set deepspeed.zero_stage=3 (repeatable)")


def _action_parser(action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"ragtune train {action}")
    if action == "run":
        _config_args(p)
        p.add_argument("--address", help="existing Ray cluster ('auto', host:6379); default: start a local one")
        p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
        p.add_argument("--config-env", help=argparse.SUPPRESS)  # job entrypoint: config JSON in this env var
        p.set_defaults(func=_cmd_run)
        return p
    if action == "status":
        p.add_argument("job_id", nargs="?")
        p.add_argument("--address", help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
        p.add_argument("--adapter", metavar="NAME[@VERSION]", help="show the run and MLflow location of an adapter")
        p.add_argument("--store", default="data/adapters", help="adapter store of --adapter (default data/adapters)")
        p.set_defaults(func=_cmd_status)
        return p
    p.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    if action == "submit":
        _config_args(p)
        p.add_argument("--wait", action="store_true", help="wait for the job and print its log tail")
        p.add_argument("--python", default=sys.executable,
                       help="Python on the cluster that runs the job (images in k8s/images: /home/ray/anaconda3/bin/python)")
        p.set_defaults(func=_cmd_submit)
        return p
    p.add_argument("job_id")
    if action == "logs":
        p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(func={"logs": _cmd_logs, "stop": _cmd_stop}[action])
    return p


def _dispatch(args) -> int:
    """``ragtune train TARGET ...``: TARGET is an action or, for a local run, the config file."""
    action, rest = (args.target, args.rest) if args.target in _ACTIONS else ("run", [args.target, *args.rest])
    sub = _action_parser(action).parse_args(rest)
    return sub.func(sub)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``ragtune`` subparsers; the handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser("train", help="fine-tune a LoRA adapter (local run or Ray Jobs)",
                              description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="CONFIG|ACTION", help=f"a train YAML to run here, or one of {', '.join(_ACTIONS[1:])}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the action's arguments (ragtune train ACTION -h)")
    p.set_defaults(func=_dispatch)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m train.cli ...`` — the same arguments as ``ragtune train ...``."""
    parser = argparse.ArgumentParser(prog="ragtune")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RagtuneError as exc:
        print(f"ragtune train: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
