"""The encoder two ways, alone and beside a CPU hog: one call on torch's 2 intra-op threads ("intra2")
against two concurrent calls on one torch thread each ("data2x1", what ``Embedder.encoding_streams``
sets up for an ingest), groups of 256 scale-corpus chunks. The hog is a process busy 30 % of a core
at nice 0 or 10. Results: section 8 of ``2026-12-07-vm-retrieve-100k.md``. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/results/2026-12-08-encode-streams.py 1536 [--no-hog]
"""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from retrieval.bench import scale_corpus
from retrieval.chunking import Chunker
from retrieval.config import ChunkingConfig
from retrieval.embedder import Embedder

HOG = r'''
import os, sys, time
os.nice(int(sys.argv[1])); duty = float(sys.argv[2])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.03 * duty / 0.3: pass
    time.sleep(0.03 * (1 - duty) / 0.3)
'''

def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1536
    emb = Embedder()
    _, pieces = scale_corpus(n, Chunker(ChunkingConfig(size=300, overlap=37)), 300)
    texts = [t for p in pieces for t in p][:n]
    emb.encode(texts[:128])
    pool = ThreadPoolExecutor(2)

    def intra(ts):
        torch.set_num_threads(2)
        for i in range(0, len(ts), 256):
            emb.encode(ts[i:i + 256])

    def data(ts):
        torch.set_num_threads(1)
        groups = [ts[i:i + 256] for i in range(0, len(ts), 256)]
        list(pool.map(emb.encode, groups))

    res = {}
    hogs = (None, None) if "--no-hog" in sys.argv else (None, (0, 0.3), (10, 0.3), None)
    for hog in hogs:
        proc = None
        if hog:
            proc = subprocess.Popen([sys.executable, "-c", HOG, str(hog[0]), str(hog[1])])
            time.sleep(0.5)
        for name, fn in (("intra2", intra), ("data2x1", data), ("data2x1", data), ("intra2", intra)):
            cpu0, t = time.process_time(), time.perf_counter()
            fn(texts)
            wall = time.perf_counter() - t
            key = f"{name} hog={hog}"
            res.setdefault(key, []).append((round(len(texts) / wall, 1), round((time.process_time() - cpu0) / wall, 2)))
            print(key, res[key][-1], flush=True)
        if proc:
            proc.kill()
            proc.wait()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
