"""The ingest's encoder beside a process that builds HNSW indexes, at several nice levels (section 5 of
2026-12-07-vm-retrieve-100k.md).

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python loadtests/results/2026-12-07-bg-contention.py`` (~5 min).
The builder (``--build THREADS SECONDS PAUSE NICE``) builds a 4,096-vector FAISS HNSW index (M 16,
efConstruction 200, as milvus-lite's default) again and again with a pause between builds, as
milvus-lite's background thread does after flushes; the encoder runs ``Embedder.encode`` on groups
of 256 synthetic chunks for 40 s and reports chunks/s.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time


def build(threads: int, seconds: float, pause: float, nice: int) -> None:
    import faiss
    import numpy as np

    os.nice(nice)
    faiss.omp_set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal((4096, 384)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start, builds = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        index = faiss.IndexHNSWFlat(384, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        index.add(x)
        builds += 1
        time.sleep(pause)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"builds={builds} cpu={usage.ru_utime + usage.ru_stime:.1f}s", flush=True)


def main() -> None:
    from retrieval.bench import synthetic_documents
    from retrieval.embedder import Embedder

    embedder = Embedder()
    texts = [d.text for d in synthetic_documents(4096, 300, seed=1)]
    embedder.encode(texts[:256])
    for nice in (None, 0, 10, 19, None, 10):
        builder = None if nice is None else subprocess.Popen(
            [sys.executable, __file__, "--build", "2", "42", "0.5", str(nice)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.5 if builder else 0)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < 40:
            embedder.encode(texts[done % 4096:done % 4096 + 256])
            done += 256
        rate = done / (time.perf_counter() - start)
        report = builder.communicate()[0].strip() if builder else "-"
        print(f"builder at nice {nice if nice is not None else '(none)'}: encoder {rate:.1f} chunks/s; builder {report}",
              flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
