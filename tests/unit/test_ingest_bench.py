"""retrieval.bench's ingest-at-scale arithmetic: rates, ratio, time split, call counting."""

from __future__ import annotations

import subprocess
import sys

from retrieval.bench import _raw_encode, _scale_rows, _Timed, wait_until_idle
from retrieval.testing import FakeEmbedder


def test_scale_rows_ratio_and_time_split():
    result = {"part": "2/4", "chunks": 1000, "docs": 250, "failed": 0, "seconds": 12.5, "raw_texts": 400,
              "raw_seconds": 4.0, "encode_s": 11.0, "write_s": 3.0, "write_calls": 3, "groups": 4}
    rows = {r["metric"]: r for r in _scale_rows("ingest_scale", result)}
    assert rows["raw_encode_rate"]["value"] == 100.0 and rows["ingest_rate"]["value"] == 80.0
    assert rows["ingest_vs_raw"]["value"] == 0.8
    split = rows["time_split"]
    assert (split["encode_s"], split["write_s_overlapped"], split["rest_s"]) == (11.0, 3.0, 1.5)
    assert (split["groups"], split["writes"], split["part"]) == (4, 3, "2/4")
    assert rows["ingest_vs_raw"]["store"] == "in-process"
    served = {r["metric"]: r for r in _scale_rows("ingest_scale", {**result, "store": "server"})}
    assert served["ingest_vs_raw"]["store"] == "server"  # which store path the ratio was measured on
    assert "before_rate" not in rows["raw_encode_rate"]
    halves = {**result, "raw_before_texts": 200, "raw_before_s": 1.6, "raw_after_texts": 200, "raw_after_s": 2.4}
    raw = {r["metric"]: r for r in _scale_rows("ingest_scale", halves)}["raw_encode_rate"]
    assert (raw["value"], raw["before_rate"], raw["after_rate"]) == (100.0, 125.0, 83.3)  # drift shows
    settled = {r["metric"]: r for r in _scale_rows("ingest_scale", {**halves, "settle_s": 12.34})}
    assert settled["raw_encode_rate"]["after_store_idle_s"] == 12.3


def test_wait_until_idle_waits_out_a_busy_process():
    """A process that spins for 2 CPU seconds, then sleeps: the wait ends after the spinning, not before."""
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nwhile time.process_time() < 2: pass\ntime.sleep(60)"])
    try:
        waited = wait_until_idle(busy.pid, window_s=0.5, busy_cpu_s=0.1, timeout_s=60)
        assert 1.5 <= waited < 30
        assert wait_until_idle(busy.pid, window_s=0.5, busy_cpu_s=0.1) < 1.0  # idle now: one window
    finally:
        busy.kill()
        busy.wait()


def test_timed_counts_only_the_named_method():
    timers = {"encode": 0.0}
    embedder = _Timed(FakeEmbedder(dim=8), "encode", timers)
    assert len(embedder.encode(["a", "b"])) == 2 and embedder.dim == 8
    embedder.encode(["c"])
    assert timers["encode_calls"] == 2 and timers["encode"] > 0


def test_raw_encode_falls_back_to_encode_without_a_model():
    embedder = FakeEmbedder()
    assert _raw_encode(embedder)(["x"]) == embedder.encode(["x"])


def test_scale_rows_with_the_streams_reference():
    """Two encode streams: the second reference and its ratio; encode_s counts both streams' calls."""
    result = {"part": "1/1", "chunks": 1000, "docs": 250, "failed": 0, "seconds": 10.0, "raw_texts": 400,
              "raw_seconds": 5.0, "raw_before_texts": 200, "raw_after_texts": 200, "raw_before_s": 2.5,
              "raw_after_s": 2.5, "raw_streams_seconds": 4.0, "raw_streams_before_s": 1.6,
              "raw_streams_after_s": 2.4, "streams": 2, "encode_s": 18.0, "write_s": 3.0}
    rows = {r["metric"]: r for r in _scale_rows("ingest_scale", result)}
    assert rows["ingest_vs_raw"]["value"] == 1.25  # 100 chunks/s against 80
    streams = rows["raw_streams_encode_rate"]
    assert (streams["value"], streams["before_rate"], streams["after_rate"], streams["streams"]) == (100.0, 125.0,
                                                                                                  83.3, 2)
    assert rows["ingest_vs_raw_streams"]["value"] == 1.0
    assert (rows["time_split"]["rest_s"], rows["time_split"]["streams"]) == (1.0, 2)  # 10 s − 18 s / 2 streams


def test_raw_streams_reference_splits_a_small_sample_over_every_stream():
    from retrieval.bench import _raw_encode_streams

    embedder = FakeEmbedder(streams=3)
    _raw_encode_streams(embedder, 256, None)([f"t{i}" for i in range(10)])
    assert sorted(embedder.calls) == [2, 4, 4], "10 texts on 3 streams, not one group of 256"
