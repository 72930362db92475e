"""The load generator: steps of a load shape, each bounded in requests and time.

* ``concurrency`` (closed loop): ``level`` workers, each sends its next request when the last ends.
* ``constant`` / ``poisson`` (open loop): arrivals at ``level`` requests/s, evenly spaced or with
  exponential gaps (seeded), whatever the server's speed — up to ``max_in_flight`` in flight;
  past it sends slip, and the slip is reported (``max_send_lag_ms``).

A step stops issuing at its request count or ``duration_s``; requests still in flight may finish
for ``drain_timeout_s`` more, then are cancelled and counted as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from loadtests.client import Backend, RequestRecord, open_backend, send_one
from loadtests.config import LoadTestConfig
from loadtests.metrics import StepResult
from loadtests.prompts import RequestFactory, load_prompts
from loadtests.report import Report, build_report, write_reports

__all__ = ["arrival_gaps", "run_loadtest", "run_steps", "step_rng"]


class _Budget:
    """Hands out permission to send until the count or the deadline (``perf_counter``) is reached."""

    def __init__(self, requests: int | None, deadline: float):
        self.left, self.deadline = requests, deadline

    def take(self, at: float | None = None) -> bool:
        """Permission to send one request now (or at the scheduled time ``at``, for open loops)."""
        if (time.perf_counter() if at is None else at) >= self.deadline or self.left == 0:
            return False
        if self.left is not None:
            self.left -= 1
        return True


class _Step:
    """One step's shared state: sends requests and keeps their records."""

    def __init__(self, cfg: LoadTestConfig, backend: Backend, factory: RequestFactory, index: int,
                 t_run: float, bar: tqdm, next_id: Callable[[], int]):
        self.cfg, self.backend, self.factory, self.index = cfg, backend, factory, index
        self.t_run, self.bar, self.next_id = t_run, bar, next_id
        self.url, self.chat = cfg.endpoint(), cfg.api == "chat"
        self.records: list[RequestRecord] = []

    async def issue(self) -> None:
        body, model, rag = self.factory.make()
        rec = RequestRecord(id=self.next_id(), step=self.index, model=model, rag=rag,
                            start=time.perf_counter() - self.t_run)
        self.records.append(rec)
        try:
            await send_one(self.backend, self.url, body, rec, chat=self.chat,
                           timeout_s=self.cfg.request_timeout_s)
        finally:
            self.bar.update(1)


def _closed_loop(step: _Step, level: float, budget: _Budget) -> list[asyncio.Future]:
    async def worker():
        while budget.take():
            await step.issue()

    return [asyncio.ensure_future(worker()) for _ in range(int(level))]


def step_rng(seed: int, index: int) -> random.Random:
    """The RNG of step ``index``'s arrival gaps (so a test can replay the schedule)."""
    return random.Random(seed * 1000 + index)


def arrival_gaps(rate: float, poisson: bool, rng: random.Random) -> Iterator[float]:
    """Seconds between consecutive sends: ``1/rate`` each, or exponential with mean ``1/rate``."""
    while True:
        yield rng.expovariate(rate) if poisson else 1.0 / rate


async def _open_loop(step: _Step, rate: float, poisson: bool, budget: _Budget,
                     rng: random.Random) -> tuple[set[asyncio.Future], float]:
    """Send on schedule; a send is due when its *scheduled* time is before the deadline, so the
    number sent does not depend on how late the loop runs (the lateness is reported instead)."""
    slots = asyncio.Semaphore(step.cfg.shape.max_in_flight)
    tasks: set[asyncio.Future] = set()
    next_at, max_lag, gaps = time.perf_counter(), 0.0, arrival_gaps(rate, poisson, rng)

    def finished(task: asyncio.Future) -> None:
        tasks.discard(task)
        slots.release()

    while True:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if not budget.take(at=next_at):
            return tasks, max_lag
        await slots.acquire()
        max_lag = max(max_lag, time.perf_counter() - next_at)
        task = asyncio.ensure_future(step.issue())
        tasks.add(task)
        task.add_done_callback(finished)
        next_at += next(gaps)


async def _drain(tasks: list[asyncio.Future] | set[asyncio.Future], until: float) -> None:
    """Wait for ``tasks`` until ``until`` (``perf_counter``), then cancel what is left."""
    pending = set(tasks)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, until - time.perf_counter()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def _run_step(cfg: LoadTestConfig, backend: Backend, factory: RequestFactory, index: int,
                    t_run: float, next_id: Callable[[], int]) -> StepResult:
    shape, level = cfg.shape, cfg.shape.levels[index]
    desc = f"step {index + 1}/{len(shape.levels)} {shape.kind}={level:g}"
    with tqdm(total=shape.requests, desc=desc, unit="req", disable=not cfg.progress,
              mininterval=0.5, leave=True) as bar:
        step = _Step(cfg, backend, factory, index, t_run, bar, next_id)
        cpu0, start = time.process_time(), time.perf_counter()
        budget, max_lag = _Budget(shape.requests, start + shape.duration_s), 0.0
        if shape.kind == "concurrency":
            tasks = _closed_loop(step, level, budget)
        else:
            rng = step_rng(cfg.seed, index)
            tasks, max_lag = await _open_loop(step, level, shape.kind == "poisson", budget, rng)
        await _drain(tasks, budget.deadline + cfg.drain_timeout_s)
        end = time.perf_counter()
        bar.set_postfix(ok=sum(r.ok for r in step.records), failed=sum(not r.ok for r in step.records))
    return StepResult(index=index, kind=shape.kind, level=level, records=step.records,
                      started=start - t_run, ended=end - t_run, cpu_s=time.process_time() - cpu0,
                      max_lag_s=max_lag)


async def run_steps(cfg: LoadTestConfig, factory: RequestFactory) -> list[StepResult]:
    """Run every step of ``cfg.shape`` in order on one connection pool; never raises for HTTP errors."""
    shape = cfg.shape
    pool = int(max(shape.levels)) if shape.kind == "concurrency" else shape.max_in_flight
    api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
    backend = open_backend(cfg.client, api_key, pool)
    ids = iter(range(1 << 62))
    t_run = time.perf_counter()
    try:
        return [await _run_step(cfg, backend, factory, i, t_run, ids.__next__)
                for i in range(len(shape.levels))]
    finally:
        await backend.aclose()


def _run(main: Callable[[], Awaitable[list[StepResult]]]) -> tuple[list[StepResult], str]:
    try:
        import uvloop  # ~1.5-2x less generator CPU per request when available
    except ImportError:
        return asyncio.run(main()), "asyncio"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main()), "uvloop"


def run_loadtest(cfg: LoadTestConfig, out_dir: Path) -> Report:
    """Run a load test and write its reports (JSON, Markdown, PNG plots) into ``out_dir``.

    Failed requests (unreachable server, HTTP errors, broken or non-streaming responses) are
    counted per status/kind; the reports are written whatever happened.

    Args:
        cfg: The validated config.
        out_dir: Created if missing; gets ``report.json``, ``summary.md`` and ``*.png``.

    Returns:
        The :class:`~loadtests.report.Report`, with ``files`` naming what was written.

    Raises:
        ConfigError: The prompt file is missing or malformed.
    """
    prompts = load_prompts(cfg.prompts, cfg.api, cfg.seed)
    factory = RequestFactory(cfg, prompts)
    started_at = datetime.now(UTC)
    steps, loop_name = _run(lambda: run_steps(cfg, factory))
    report = build_report(cfg, steps, started_at, loop=loop_name)
    report.files = write_reports(report, Path(out_dir), plots=cfg.plots)
    return report
