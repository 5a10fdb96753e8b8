"""Pretraining batches from tokenize_corpus's memory-mapped token files: peak RSS and time per batch against the
size of the file, so a corpus larger than RAM can be judged by the figures.

    .venv/bin/python bench/token_shards.py --gb 1,4 [--steps 200] [--batch 32] [--block 256]

A file of `gb` GB of uint16 token ids (seeded random ids, written in 64 MB chunks, as tokenize_corpus writes
them) is made in a scratch folder; a child process then draws `steps` pretraining batches from it through
phase.corpus_tokens and CorpusBatches, as the pretrain stage does, and reports its own peak RSS (wait4). Before
the files, the stage held the corpus as one int64 tensor: 8 bytes per token, 4x the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
from pathlib import Path
from persona_lm.train.batches import CorpusBatches
from persona_lm.train.tokens import load_tokens
folder, steps, batch, block = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
b = CorpusBatches(train=load_tokens(folder, "train"), val=load_tokens(folder, "val"), personal=None,
                  personal_mix=0.0, batch_size=batch, block_size=block, seed=1337)
for step in range(steps):
    b.get("train", step)
print((time.perf_counter() - t0) / steps)
"""


def make_tokens(folder: Path, gigabytes: float) -> int:
    """A train.bin of `gigabytes` GB of uint16 ids (and a small val.bin) with its meta.json; returns its tokens."""
    n = int(gigabytes * 1e9) // 2
    rng = np.random.default_rng(0)
    chunk = 32 << 20
    with open(folder / "train.bin", "wb") as f:
        for start in range(0, n, chunk):
            rng.integers(0, 8192, min(chunk, n - start), dtype=np.uint16).tofile(f)
    rng.integers(0, 8192, 100_000, dtype=np.uint16).tofile(folder / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": 8192, "eot": 0,
            "splits": {"train": {"tokens": n}, "val": {"tokens": 100_000}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", default="1,4", help="token file sizes in GB (10^9 bytes), comma-separated")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=256)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    print(f"{'file':>8} {'tokens':>14} {'in memory before':>17} {'peak RSS':>9} {'ms/batch':>9}")
    for gb in [float(g) for g in args.gb.split(",")]:
        with tempfile.TemporaryDirectory(prefix="token-shards-") as tmp:
            n = make_tokens(Path(tmp), gb)
            subprocess.run(["sync"], check=False)
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", CHILD, tmp, str(args.steps), str(args.batch),
                                     str(args.block)], env=env, stdout=subprocess.PIPE, text=True)
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                sys.exit(f"child failed with status {status}")
            per_batch = float(out.strip())
            print(f"{gb:>6.1f}GB {n:>14,} {n * 8 / 2**20:>13,.0f} MiB {usage.ru_maxrss / 1024:>5,.0f} MiB "
                  f"{per_batch * 1e3:>9.2f}   ({time.perf_counter() - start:.1f} s in all)")


if __name__ == "__main__":
    main()
