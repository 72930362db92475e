"""PNG plots of a load-test report: latency vs load, throughput vs load (with the knee), TTFT CDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loadtests.report import Report  # noqa: E402

__all__ = ["write_plots"]

_PCTS = ("p50", "p90", "p99")


def _xlabel(report: Report) -> str:
    kind = report.config["shape"]["kind"]
    return "concurrent requests" if kind == "concurrency" else f"offered load ({kind}, req/s)"


def _series(report: Report, metric: str, pct: str) -> list[float]:
    return [np.nan if getattr(s, metric)[pct] is None else getattr(s, metric)[pct] for s in report.steps]


def _latency(report: Report, path: Path) -> None:
    x = [s.level for s in report.steps]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, title) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "end-to-end")),
                                   strict=True):
        for pct in _PCTS:
            ax.plot(x, _series(report, metric, pct), marker="o", label=pct)
        ax.set(title=f"{title} (ms)", xlabel=_xlabel(report), ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend()
        _logx(ax, x)
    fig.suptitle("Latency percentiles vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _logx(ax, x: list[float]) -> None:
    if len(x) > 2 and min(x) > 0 and max(x) / min(x) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])


def _throughput(report: Report, path: Path) -> None:
    """The knee picture: throughput (top) flattens while latency (bottom) keeps climbing."""
    x = [s.level for s in report.steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(x, [s.output_tokens_per_s for s in report.steps], marker="o", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    right = top.twinx()
    right.plot(x, [s.requests_per_s for s in report.steps], marker="s", color="tab:green", label="requests/s")
    if any(s.goodput_per_s is not None for s in report.steps):
        right.plot(x, [s.goodput_per_s for s in report.steps], marker="^", ls="--", color="tab:olive",
                   label="goodput req/s")
    right.set_ylabel("requests/s")
    handles = top.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper left")
    for metric, name in (("ttft_ms", "TTFT"), ("e2e_ms", "e2e")):
        for pct in ("p50", "p90"):
            bottom.plot(x, _series(report, metric, pct), marker="o", label=f"{name} {pct}")
    bottom.set(xlabel=_xlabel(report), ylabel="latency (ms)")
    bottom.legend(loc="upper left")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if report.knee is not None:
            ax.axvline(report.knee, color="grey", ls=":", lw=2)
    if report.knee is not None:
        top.text(report.knee, 0.02, f"knee ≈ {report.knee:g} ", transform=top.get_xaxis_transform(),
                 ha="right", va="bottom", color="grey")
    _logx(bottom, x)
    top.set_title("Throughput and latency vs load — past the knee, load buys latency, not throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ttft_cdf(report: Report, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in report.steps:
        values = np.sort([r.ttft * 1000 for r in report.records if r.step == s.index and r.ok and r.ttft])
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{s.kind}={s.level:g}")
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF per load level")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write ``latency_vs_load.png``, ``throughput_vs_load.png`` and ``ttft_cdf.png``.

    Returns:
        Plot name → path.
    """
    files = {"latency_plot": out_dir / "latency_vs_load.png",
             "throughput_plot": out_dir / "throughput_vs_load.png",
             "ttft_cdf_plot": out_dir / "ttft_cdf.png"}
    _latency(report, files["latency_plot"])
    _throughput(report, files["throughput_plot"])
    _ttft_cdf(report, files["ttft_cdf_plot"])
    return files
