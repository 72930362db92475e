"""Measure the load generator's own ceiling against the fake server, and locust's on the same target.

The fake server runs as its own process pinned to one core, the generator (or locust) to the
other, so "requests/s" is what one generator core sustains when the server answers at once. On a
shared machine the wall-clock rate also depends on who else runs on that core; "requests per
generator CPU-second" does not, and is the ceiling on a dedicated core::

    .venv/bin/python -m loadtests.overhead --clients httpx,aiohttp --concurrency 64 --requests 20000 --locust

If the fake server's core is near 100% busy, the *server* was the limit and the generator's
ceiling is higher than the number shown (the table says so).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.config import LoadShape, LoadTestConfig, MixEntry, PromptSpec
from loadtests.runner import run_loadtest

__all__ = ["FakeProcess", "measure_generator", "measure_locust", "main"]

_HERE = Path(__file__).resolve().parent


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class FakeProcess:
    """``python -m loadtests.fake_server`` in a child process, pinned to ``core``; a context manager."""

    def __init__(self, output_tokens: int, core: int | None):
        self.output_tokens, self.core = output_tokens, core
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> FakeProcess:
        cmd = [sys.executable, "-m", "loadtests.fake_server", "--port", "0",
               "--output-tokens", str(self.output_tokens)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=_HERE.parent)
        if self.core is not None:
            os.sched_setaffinity(self.proc.pid, {self.core})
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.__exit__()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.url = line.split()[1]
        return self

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far."""
        return _cpu_seconds(self.proc.pid)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure_generator(client: str, concurrency: int, requests: int, output_tokens: int,
                      cores: tuple[int, int] | None = (0, 1)) -> dict:
    """Streamed requests/s the generator sustains on one core against an instant fake server.

    Args:
        client: ``httpx``, ``httpx2`` or ``aiohttp``.
        concurrency: Requests in flight.
        requests: Requests in the measured step (after a warm-up step of the same size).
        output_tokens: Content chunks per response.
        cores: (generator core, server core), or ``None`` not to pin.
    """
    before = os.sched_getaffinity(0)
    with FakeProcess(output_tokens, cores[1] if cores else None) as server:
        if cores:
            os.sched_setaffinity(0, {cores[0]})
        try:
            cfg = LoadTestConfig(
                base_url=server.url, client=client, mix=[MixEntry(model="fake", weight=1)],
                prompts=PromptSpec(input_tokens=16, output_tokens=output_tokens, count=64),
                shape=LoadShape(kind="concurrency", levels=[concurrency, concurrency], requests=requests,
                                duration_s=120), plots=False)
            with tempfile.TemporaryDirectory() as tmp:
                cpu0 = server.cpu_seconds()
                report = run_loadtest(cfg, Path(tmp))
                server_cpu = server.cpu_seconds() - cpu0
        finally:
            os.sched_setaffinity(0, before)
    step = report.steps[1]
    total = sum(s.duration_s for s in report.steps)
    return {"tool": f"ragtune loadtest ({client}, {report.environment['event_loop']})",
            "concurrency": concurrency, "output_tokens": output_tokens, "requests": step.sent,
            "ok": step.ok, "req_per_s": step.requests_per_s, "generator_cpu_pct": step.generator_cpu_pct,
            "req_per_cpu_s": 100 * step.requests_per_s / max(step.generator_cpu_pct, 1e-9),
            "server_cpu_pct": 100 * server_cpu / total}


def _locust_rate(prefix: Path) -> tuple[int, float, int]:
    with open(f"{prefix}_stats.csv") as fh:
        for row in csv.DictReader(fh):
            if row["Type"] == "POST" and row["Name"] == "chat":
                return int(row["Request Count"]), float(row["Requests/s"]), int(row["Failure Count"])
    raise RuntimeError("locust wrote no 'POST chat' row")


def measure_locust(users: int, seconds: int, output_tokens: int, cores: tuple[int, int] | None = (0, 1)) -> dict:
    """Requests/s of ``loadtests/locustfile.py`` (headless, one process) against the same fake server."""
    locust = Path(sys.executable).parent / "locust"
    with FakeProcess(output_tokens, cores[1] if cores else None) as server, \
            tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "locust"
        cmd = [str(locust), "-f", str(_HERE / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
               "-t", f"{seconds}s", "--host", server.url, "--csv", str(prefix), "--only-summary",
               "--loglevel", "ERROR", "--max-tokens", str(output_tokens), "--model", "fake"]
        if cores:
            cmd = ["taskset", "-c", str(cores[0]), *cmd]
        t0, cpu0, child0 = time.perf_counter(), server.cpu_seconds(), _children_cpu()
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
        wall, locust_cpu = time.perf_counter() - t0, _children_cpu() - child0
        server_cpu = server.cpu_seconds() - cpu0
        count, rate, failures = _locust_rate(prefix)
    # locust's CPU includes its ~1 s of start-up, so its per-CPU-second figure is a lower bound.
    return {"tool": "locust (HttpUser, 1 process)", "concurrency": users, "output_tokens": output_tokens,
            "requests": count, "ok": count - failures, "req_per_s": rate,
            "generator_cpu_pct": 100 * locust_cpu / wall, "req_per_cpu_s": count / locust_cpu,
            "server_cpu_pct": 100 * server_cpu / wall}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only: here, locust
    return usage.ru_utime + usage.ru_stime


def _table(rows: list[dict]) -> str:
    lines = ["| tool | in flight | tokens/response | ok/sent | req/s (wall) | generator CPU | "
             "req per generator CPU-second | fake-server CPU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['concurrency']} | {r['output_tokens']} | {r['ok']}/{r['requests']} | "
                     f"{r['req_per_s']:,.0f} | {r['generator_cpu_pct']:.0f}% | {r['req_per_cpu_s']:,.0f} | "
                     f"{r['server_cpu_pct']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: print a Markdown table of ceilings (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="httpx,aiohttp", help="Comma list of httpx, httpx2, aiohttp.")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--output-tokens", type=int, default=4)
    p.add_argument("--locust", action="store_true", help="Also run locust for --locust-seconds.")
    p.add_argument("--locust-seconds", type=int, default=8)
    p.add_argument("--no-pin", action="store_true", help="Do not pin generator and server to cores 0 and 1.")
    args = p.parse_args(argv)
    cores = None if args.no_pin or os.cpu_count() < 2 else (0, 1)
    rows = [measure_generator(c, args.concurrency, args.requests, args.output_tokens, cores)
            for c in args.clients.split(",")]
    if args.locust:
        rows.append(measure_locust(args.concurrency, args.locust_seconds, args.output_tokens, cores))
    print(_table(rows))


if __name__ == "__main__":
    main()
