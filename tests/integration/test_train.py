"""Training end to end on real Ray Train + DeepSpeed (CPU, gloo, 2 workers) with the tiny model.

One module-scoped local Ray runs the recipe under ZeRO-2 (with an injected worker failure, so
the run resumes from a checkpoint) and ZeRO-3 (persistence threshold 0: every LoRA parameter is
really sharded, so export must gather). The job-submission test starts its own ``ray start
--head`` on loopback with token auth; deselect it with ``-k "not job_submission"``.

    pytest -m integration tests/integration/test_train.py
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.models import TINY_LLAMA
from cluster.processes import free_port
from serve.registry import AdapterRegistry
from tests.integration.training import checkpoint_metrics, tiny_config
from train.cli import job_client, submit_job, wait_job
from train.launch import launch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_path(tiny_model) -> Path:  # tiny_model: the session fixture of tests/conftest.py
    return tiny_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def _checkpoint_metrics(workdir: Path, name: str) -> list[dict]:
    """Metrics of the kept checkpoints, oldest first."""
    return list(checkpoint_metrics(workdir / "results" / name).values())


def _registry(workdir: Path, tiny_path: Path) -> AdapterRegistry:
    return AdapterRegistry(workdir / "adapters", base_model=TINY_LLAMA, base_model_path=str(tiny_path))


def _logits(model, tokenizer):
    import torch

    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits[0, -1]


def _check_adapter(adapter_dir: str, tiny_path: Path) -> None:
    """The adapter loads in transformers + peft, its LoRA tensors are real, and it changes outputs."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # lora_B starts at zero: non-zero means trained
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    before = _logits(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert (tuned.peft_config["default"].r, tuned.peft_config["default"].lora_alpha) == (8, 16)
    assert (_logits(tuned, tokenizer) - before).abs().max() > 1e-3


# ---- ZeRO-2 with a worker failure ------------------------------------------------------------
@pytest.fixture(scope="module")
def zero2(ray_local, workdir):
    # Rank 1 raises at step 13; the last checkpoint is step 10, so attempt 2 redoes 11-24.
    cfg = tiny_config(workdir, "z2", "deepspeed.zero_stage=2", "run.max_steps=24", "run.checkpoint_every_steps=5",
                      "eval.every_steps=5", "run.num_to_keep=null", "debug.fail_at_step=13", "debug.fail_rank=1",
                      "run.max_failures=1")
    return cfg, launch(cfg)


def test_zero2_loss_goes_down(zero2, workdir):
    rows = _checkpoint_metrics(workdir, "z2")
    assert [m["step"] for m in rows] == [5, 10, 15, 20, 24]
    # Random tiny model, LoRA on all 7 projections, lr 5e-3, 16 examples/step: eval loss 6.13 at
    # step 0, ~5.6 after 5 steps, ~4.8 after 24 (measured with a plain PEFT loop on this data).
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.25
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_zero2_checkpoint_holds_deepspeed_state_and_adapter(zero2):
    _, outcome = zero2
    final = Path(outcome.checkpoint)
    assert final.name == "checkpoint_step_0000024"
    state = {p.name for p in (final / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= state
    assert (final / "adapter" / "adapter_config.json").is_file()
    # Frozen base weights stay out of checkpoints: a LoRA checkpoint of the tiny model is small.
    assert sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) < 2_000_000


def test_failed_worker_resumes_from_checkpoint_and_finishes_at_the_right_step(zero2):
    _, outcome = zero2
    assert outcome.metrics["step"] == 24 and outcome.metrics["done"] is True
    assert outcome.metrics["resumed_from_step"] == 10


def test_zero2_adapter_is_registered_loads_and_changes_outputs(zero2, workdir, tiny_path):
    cfg, outcome = zero2
    assert outcome.adapter.key == "z2@1"
    registry = _registry(workdir, tiny_path)
    ref = registry.resolve("z2")
    manifest = registry.manifest(ref)
    # export.select=best (the default): the checkpointed eval with the lowest loss.
    evals = {m["step"]: m["eval_loss"] for m in _checkpoint_metrics(workdir, "z2")}
    best_step = min(evals, key=evals.get)
    assert manifest["exported"] == {"select": "best", "step": best_step, "eval_loss": evals[best_step]}
    assert manifest["dataset_hash"].startswith("sha256:") and manifest["metrics"]["step"] == 24
    assert manifest["train_config"]["deepspeed"]["zero_stage"] == 2 and manifest["base_model"] == TINY_LLAMA
    assert manifest["dataset"]["examples"] == 300 and "created_at" in manifest and manifest["version"] == 1
    _check_adapter(ref.path, tiny_path)


def test_zero2_run_is_tracked_in_mlflow_and_the_adapter_leads_to_it(zero2, workdir, tiny_path):
    from mlflow.tracking import MlflowClient

    _, outcome = zero2
    manifest = _registry(workdir, tiny_path).manifest(_registry(workdir, tiny_path).resolve("z2@1"))
    run = manifest["tracking"]
    assert run == outcome.tracking and run["tracking_uri"] == f"sqlite:///{workdir}/results/mlflow/mlflow.db"
    client = MlflowClient(run["tracking_uri"])
    got = client.get_run(run["run_id"])
    assert got.info.status == "FINISHED" and got.data.tags["ragtune.adapter"] == "z2@1"
    assert got.data.tags["ragtune.dataset_hash"] == manifest["dataset_hash"] == got.data.params["dataset_hash"]
    assert got.data.params["deepspeed.zero_stage"] == "2" and got.data.params["lora.r"] == "8"
    # Rank 0 logged the report steps (every 5 and the end) of both attempts: attempt 1's 5 and 10
    # (10 may be lost if the failure on rank 1 kills rank 0 before its sender thread ran), and
    # attempt 2's 15-24, flushed when the loop ends.
    steps = {m.step for m in client.get_metric_history(run["run_id"], "loss")}
    assert {5, 15, 20, 24} <= steps <= {5, 10, 15, 20, 24}
    assert {"eval_loss", "samples_per_s", "tokens_per_s", "lr"} <= set(got.data.metrics)
    assert "adapter/adapter_model.safetensors" in [a.path for a in client.list_artifacts(run["run_id"], "adapter")]


def test_resubmitted_run_continues_at_the_saved_step(zero2, workdir, tiny_path):
    cfg, _ = zero2
    again = tiny_config(workdir, "z2", *[f"{k}={v}" for k, v in {
        "deepspeed.zero_stage": 2, "run.max_steps": 28, "run.checkpoint_every_steps": 5, "eval.every_steps": 5,
        "run.num_to_keep": "null", "debug.fail_at_step": 13, "debug.fail_rank": 1}.items()])
    outcome = launch(again)
    assert outcome.metrics["resumed_from_step"] == 24 and outcome.metrics["step"] == 28
    assert outcome.adapter.key == "z2@2"
    # The same config once more: nothing left to train, and no duplicate adapter version.
    done = launch(again)
    assert done.metrics["step"] == 28 and done.adapter.key == "z2@2"
    assert [e["versions"] for e in _registry(workdir, tiny_path).list() if e["name"] == "z2"][0].keys() == {"1", "2"}


def test_bf16_early_stopping_and_tensorboard(ray_local, workdir, tiny_path):
    # min_delta=100: only the first eval counts as an improvement, so patience=1 stops at the 2nd.
    cfg = tiny_config(workdir, "es", "deepspeed.precision=bf16", "run.max_steps=30", "eval.every_steps=3",
                       "eval.early_stopping_patience=1", "eval.early_stopping_min_delta=100",
                       f"run.tensorboard_dir={workdir}/tb")
    outcome = launch(cfg)
    assert outcome.metrics["stopped_early"] is True and outcome.metrics["step"] == 6
    assert list((workdir / "tb" / "es").glob("events.out.tfevents.*"))
    ref = _registry(workdir, tiny_path).resolve("es")
    _check_adapter(ref.path, tiny_path)
    # Early stopping kept step 3 (not a checkpoint step: its weights live in the in-memory best
    # copy); the adapter holds step 3's weights, not step 6's.
    exported = _registry(workdir, tiny_path).manifest(ref)["exported"]
    assert exported == {"select": "best", "step": 3, "eval_loss": outcome.metrics["best_eval_loss"]}
    assert outcome.metrics["eval_loss"] != exported["eval_loss"]
    _assert_adapter_is_the_best_copy_not_the_last(Path(outcome.checkpoint), Path(ref.path))


def _assert_adapter_is_the_best_copy_not_the_last(final: Path, adapter: Path) -> None:
    import torch
    from safetensors.torch import load_file

    saved = {k.replace(".default.", "."): v for k, v in load_file(str(final / "best_lora.safetensors")).items()}
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved.keys() == exported.keys()
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    last = torch.load(final / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    last = {k.replace(".default.", "."): v.float() for k, v in last.items() if "lora_" in k}
    assert any(not torch.equal(last[k], exported[k]) for k in exported)  # step 6 moved on from step 3


# ---- ZeRO-3: partitioned at load, sharded LoRA parameters gathered for export -----------------
@pytest.fixture(scope="module")
def zero3(ray_local, workdir):
    # Packed rows (1 row of <= 1280 tokens ≈ 9 examples per worker per micro-batch) and gradient
    # checkpointing ride along: the efficiency options must train under ZeRO-3 too.
    cfg = tiny_config(workdir, "z3", "deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0",
                       "run.max_steps=12", "run.checkpoint_every_steps=6", "eval.every_steps=6", "run.num_to_keep=null",
                       "data.packing=true", "data.pack_length=1280", "run.micro_batch_size=1",
                       "run.gradient_checkpointing=true")
    return cfg, launch(cfg)


def test_zero3_packed_checkpointed_trains_and_exports_gathered_weights(zero3, workdir, tiny_path):
    _, outcome = zero3
    rows = _checkpoint_metrics(workdir, "z3")
    assert [m["step"] for m in rows] == [6, 12] and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # Partitioned at load: each of the 2 ranks holds half of the parameters (tiny model: 1.6 MiB).
    assert rows[-1]["load_param_mb_per_rank"] == pytest.approx(rows[-1]["param_mb_per_rank"], rel=0.1)
    assert rows[-1]["load_param_mb_per_rank"] < 0.6 * 1.6
    state = {p.name for p in (Path(outcome.checkpoint) / "state").iterdir()}
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in state  # ZeRO-3 shards the model states
    ref = _registry(workdir, tiny_path).resolve("z3")
    _check_adapter(ref.path, tiny_path)


def test_invalid_resources_fail_before_any_worker(ray_local, workdir):
    cfg = tiny_config(workdir, "too-big", "scaling.num_workers=8")
    with pytest.raises(ConfigError, match="scaling.num_workers=8"):
        launch(cfg)


# ---- Ray Jobs API against a separate `ray start --head` -------------------------------------
@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, monkeypatch_module):
    """A token-auth Ray head on loopback; stopped by its PID (never `ray stop`).

    Its own --temp-dir keeps it out of /tmp/ray/ray_current_cluster, which a bare ``ray.init()``
    elsewhere on this host (the lead's stack) would otherwise join.
    """
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="rt-head-", dir="/tmp")  # short: Ray's unix sockets live here
    dash = free_port()
    ports = [f"--port={free_port()}", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}"]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s drain on stop
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", *ports]
    log = (tmp / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while not _up(url):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "head.log").read_text()[-2000:]
            time.sleep(1)
        monkeypatch_module.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # our client reads it like Ray does
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` tears down what it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _up(url: str) -> bool:
    import httpx

    try:
        httpx.get(f"{url}/api/version", timeout=2)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_job_submission_without_the_token_is_refused(ray_head):
    with pytest.raises(ConfigError, match="Authentication failed") as err:
        job_client(ray_head, token="wrong-token")
    assert err.value.param == "RAY_AUTH_TOKEN"


def test_job_submission_trains_and_registers_the_adapter(ray_head, workdir, tiny_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = tiny_config(workdir, "job", "run.max_steps=6", "run.checkpoint_every_steps=6", "eval.every_steps=6")
    job_id = submit_job(cfg, ray_head)
    client = job_client(ray_head)
    status = wait_job(client, job_id, timeout_s=300)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    assert client.get_job_info(job_id).metadata["ragtune.adapter"] == "job"
    ref = _registry(workdir, tiny_path).resolve("job")
    assert ref.version == 1 and (Path(ref.path) / "adapter_model.safetensors").is_file()
