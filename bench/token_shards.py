"""Pretraining batches from tokenize_corpus's memory-mapped token files: peak RSS and time per batch against the
size of the file, so a corpus larger than RAM can be judged by the figures.

    .venv/bin/python bench/token_shards.py --gb 1,4 [--steps 200] [--batch 32] [--block 256]

A file of `gb` GB of uint16 token ids (seeded random ids, written in 64 MB chunks, as tokenize_corpus writes
them) is made in a scratch folder; a child process then draws `steps` pretraining batches from it through
load_tokens and CorpusBatches, as the pretrain stage does, after the page cache is dropped (when root), and
reports its peak RSS, and of its resident memory what is anonymous (the process's own) and what is pages of the
file (page cache the kernel evicts under pressure). Before the files, the stage held the corpus as one int64
tensor: 8 bytes per token, 4x the file.
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
import json, sys, time
from pathlib import Path
from persona_lm.train.batches import CorpusBatches
from persona_lm.train.tokens import load_tokens
folder, steps, batch, block = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
b = CorpusBatches(train=load_tokens(folder, "train"), val=load_tokens(folder, "val"), personal=None,
                  personal_mix=0.0, batch_size=batch, block_size=block, seed=1337)
for step in range(steps):
    b.get("train", step)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(json.dumps({"s_per_batch": (time.perf_counter() - t0) / steps,
                  **{k: int(status[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}}))
"""


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the child reads the token file from disk, as it would one
    larger than RAM; False where that is not allowed."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


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
    print(f"{'file':>8} {'tokens':>14} {'int64 tensor before':>20} {'peak RSS':>9} {'anonymous':>10} "
          f"{'file pages':>11} {'ms/batch':>9}")
    for gb in [float(g) for g in args.gb.split(",")]:
        with tempfile.TemporaryDirectory(prefix="token-shards-") as tmp:
            n = make_tokens(Path(tmp), gb)
            cold = drop_page_cache()
            out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(args.steps), str(args.batch),
                                  str(args.block)], env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out)
            print(f"{gb:>6.1f}GB {n:>14,} {n * 8 / 2**20:>16,.0f} MiB {r['VmHWM']:>5,.0f} MiB {r['RssAnon']:>6,.0f} MiB "
                  f"{r['RssFile']:>7,.0f} MiB {r['s_per_batch'] * 1e3:>9.2f}"
                  f"{'' if cold else '  (page cache not dropped: the file was hot)'}")


if __name__ == "__main__":
    main()
