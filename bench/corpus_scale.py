"""download_corpus + filter_corpus at scale: peak RSS, MB/s and documents kept on a synthetic corpus.

    .venv/bin/python bench/corpus_scale.py --sizes 100,1000,2000 [--src ../other-checkout/src] [--keep DIR]
    .venv/bin/python bench/corpus_scale.py --sizes 100 --engine dask --workers 2

The corpus: TinyStories documents (../shared/data, 2 MB) repeated with seeded word swaps until the size is
reached (2-6 words of each copy replaced from the stories' own vocabulary), so exact dedup does not remove the
copies and MinHash must judge each one; every 50th document is an exact copy of an earlier one. Same size and
seed, same bytes. It is written once per size as one <|endoftext|>-separated .txt file (a `local` source) in
the bench's folder. Each stage runs as its own process (`python stages/<stage>.py` of the checkout whose `src`
is given, default this one) in a scratch project; its peak RSS is the process's own (wait4), or with
`--engine dask` the largest of it and its local cluster's processes.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "corpus" / "tinystories_train_head.txt"


def synthetic(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write the synthetic corpus of `megabytes` MB (10^6 bytes) to `path`; returns its document count."""
    stories = [s.strip() for s in STORIES.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    vocab = sorted({w for s in stories for w in re.findall(r"[a-z]+", s)})
    rng = random.Random(seed)
    target, written, n, pool = int(megabytes * 1e6), 0, 0, []
    tmp = path.with_name(f".{path.name}.tmp")  # renamed when complete: an interrupted run leaves no short corpus
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            for story in stories:
                if written >= target:
                    break
                if n % 50 == 49:  # an exact copy of a recent document
                    text = pool[rng.randrange(len(pool))]
                else:
                    words = story.split(" ")
                    for _ in range(rng.randint(2, 6)):
                        words[rng.randrange(len(words))] = rng.choice(vocab)
                    text = " ".join(words)
                    if len(pool) < 1000:
                        pool.append(text)
                    else:
                        pool[rng.randrange(1000)] = text
                data = text + "\n<|endoftext|>\n"
                f.write(data)
                written += len(data.encode("utf-8"))
                n += 1
    tmp.replace(path)
    return n


def run_stage(project: Path, src: Path, stage: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stderr tail) of one stage run as its own process."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(src.parent / "stages" / f"{stage}.py")], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{stage} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, err.strip().splitlines()[-1] if err.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the checkout's src folder whose stages run")
    ap.add_argument("--keep", help="folder for the generated corpora (kept between runs); default a temp folder")
    ap.add_argument("--engine", choices=["local", "dask"], default="local", help="filter.engine")
    ap.add_argument("--workers", type=int, default=2, help="filter.workers: the local Dask cluster's processes")
    args = ap.parse_args()
    src = Path(args.src).resolve()
    data = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="corpus_scale-"))
    data.mkdir(parents=True, exist_ok=True)
    where = f"dask, {args.workers} local workers" if args.engine == "dask" else "local"
    print(f"stages of {src.parent}; filter on {where}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"{'input MB':>9} {'docs':>9}  {'download s':>10} {'RSS MiB':>7}  {'filter s':>8} {'RSS MiB':>7} "
          f"{'MB/s':>6}  {'kept':>9}")
    for size in (float(s) for s in args.sizes.split(",")):
        corpus = data / f"synthetic-{size:g}MB.txt"
        if not corpus.exists():
            synthetic(corpus, size)
        project = Path(tempfile.mkdtemp(prefix="project-", dir=data))
        try:
            params = yaml.safe_load((src.parent / "params.yaml").read_text())
            params["corpus"]["sources"] = [{"kind": "local", "path": str(corpus)}]
            if args.engine == "dask":
                params["filter"].update(engine="dask", workers=args.workers)
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            t_dl, rss_dl, _ = run_stage(project, src, "download_corpus")
            t_f, rss_f, _ = run_stage(project, src, "filter_corpus")
            report = yaml.safe_load((project / "reports" / "corpus.json").read_text())
            mb = report["bytes_in"] / 1e6
            print(f"{mb:9.0f} {report['docs_in']:9d}  {t_dl:10.1f} {rss_dl:7.0f}  {t_f:8.1f} {rss_f:7.0f} "
                  f"{mb / t_f:6.2f}  {report['docs_out']:9d}", flush=True)
        finally:
            shutil.rmtree(project, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
