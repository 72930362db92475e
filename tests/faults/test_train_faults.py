"""A Ray Train worker process SIGKILLed mid-run (local Ray, the tiny recipe on 2 DeepSpeed workers).

After the first checkpoint one of the two ``RayTrainWorker`` processes is killed with SIGKILL (no
exception, no cleanup: what the OOM killer or a lost container does). Ray Train's
``FailureConfig(max_failures=run.max_failures)`` restarts the worker group from the last reported
checkpoint; the run must finish at the configured step with a final loss within tolerance of an
uninterrupted run of the same config, and the time lost is measured (printed for the README table).

Run: flock /tmp/ragtune-heavy.lock .venv/bin/pytest -m faults -s tests/faults/test_train_faults.py
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.training import checkpoint_metrics, tiny_config, wait_for
from train.launch import launch

pytestmark = pytest.mark.faults

MAX_STEPS = 16
CHECKPOINT_EVERY = 4
LOSS_TOLERANCE = 0.05  # same 2 workers and data order after the restore; gloo's reduction order may differ


@pytest.fixture(scope="module")
def ray_local(tiny_model):
    import ray

    from train.cli import start_local_ray

    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def _config(workdir: Path, name: str):
    return tiny_config(workdir, name, f"run.max_steps={MAX_STEPS}", f"run.checkpoint_every_steps={CHECKPOINT_EVERY}",
                       f"eval.every_steps={CHECKPOINT_EVERY}", "run.num_to_keep=null", "run.max_failures=1",
                       "tracking.mlflow=false", "export.enabled=false")


def _snapshot(run_dir: Path) -> dict[int, dict]:
    return checkpoint_metrics(run_dir, missing_ok=True)


def _workers() -> list[tuple[int, str]]:
    """(pid, actor id) of the live Ray Train workers."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return sorted((a.pid, a.actor_id) for a in actors if a.pid)


class WorkerKill(threading.Thread):
    """Watches the run; after its first checkpoint SIGKILLs one training worker process."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir, self.error = run_dir, None
        self.victim: tuple[int, str] | None = None
        self.killed_at = self.regrouped_at = None
        self.checkpoint_at_kill = 0

    def run(self) -> None:
        try:
            workers = wait_for(lambda: (w := _workers()) and len(w) == 2 and w, "2 training workers running", every_s=1)
            wait_for(lambda: _snapshot(self.run_dir), "a first checkpoint")
            time.sleep(1.0)  # a step or two past the checkpoint: work the fault throws away
            self.checkpoint_at_kill = max(_snapshot(self.run_dir))
            self.victim = workers[-1]
            os.kill(self.victim[0], signal.SIGKILL)
            self.killed_at = time.monotonic()
            old = {actor for _, actor in workers}
            wait_for(lambda: (w := _workers()) and len(w) == 2 and not old & {a for _, a in w}, "a new worker group",
                  every_s=0.5)
            self.regrouped_at = time.monotonic()
        except Exception as exc:  # surfaced by the test, not lost in the thread
            self.error = exc


def test_training_worker_killed_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    started = time.monotonic()
    reference = launch(_config(tmp_path, "reference"))
    reference_s = time.monotonic() - started

    run_dir = tmp_path / "results" / "worker-kill"
    fault = WorkerKill(run_dir)
    fault.start()
    started = time.monotonic()
    outcome = launch(_config(tmp_path, "worker-kill"))
    faulted_s = time.monotonic() - started
    fault.join(timeout=60)
    assert fault.error is None, fault.error
    assert fault.killed_at is not None, "the run ended before a worker was killed"

    m, ref = outcome.metrics, reference.metrics
    assert m["step"] == MAX_STEPS and ref["step"] == MAX_STEPS and m["done"] is True
    # Resumed from the checkpoint that was the latest at the kill (one reported between that read
    # and the kill: from that one), written by both workers.
    assert m["resumed_from_step"] in (fault.checkpoint_at_kill, fault.checkpoint_at_kill + CHECKPOINT_EVERY)
    ours, theirs = _snapshot(run_dir), _snapshot(tmp_path / "results" / "reference")
    assert sorted(ours) == sorted(theirs) == list(range(CHECKPOINT_EVERY, MAX_STEPS + 1, CHECKPOINT_EVERY))
    assert ours[fault.checkpoint_at_kill]["eval_loss"] == pytest.approx(theirs[fault.checkpoint_at_kill]["eval_loss"],
                                                                        abs=1e-6)
    eval_diff = abs(ours[MAX_STEPS]["eval_loss"] - theirs[MAX_STEPS]["eval_loss"])
    loss_diff = abs(m["loss"] - ref["loss"])
    print(f"\ntraining worker kill: 2 workers, worker pid {fault.victim[0]} SIGKILLed after the step-"
          f"{fault.checkpoint_at_kill} checkpoint; new worker group {fault.regrouped_at - fault.killed_at:.1f}s after "
          f"the kill, resumed from step {m['resumed_from_step']}, finished step {m['step']}; final eval loss "
          f"{ours[MAX_STEPS]['eval_loss']:.4f} vs {theirs[MAX_STEPS]['eval_loss']:.4f} uninterrupted (|diff| "
          f"{eval_diff:.4f}), train loss {m['loss']:.4f} vs {ref['loss']:.4f} (|diff| {loss_diff:.4f}); wall "
          f"{faulted_s:.1f}s vs {reference_s:.1f}s uninterrupted (+{faulted_s - reference_s:.1f}s)")
    assert eval_diff <= LOSS_TOLERANCE and loss_diff <= LOSS_TOLERANCE
