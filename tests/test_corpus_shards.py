"""filter_corpus shard by shard: the same decisions as the in-memory rules whatever the shard size, duplicates found
across shards, byte-identical output, an interrupted run resumed from its finished shards, and the same bytes
when the shards are scanned on a two-worker Dask cluster on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from persona_lm.data import corpus as sharded
from persona_lm.data import dedup, engine, filters
from persona_lm.errors import PersonaError
from persona_lm.io import write_parquet
from persona_lm.params import Filter, Params


@pytest.fixture(scope="module")
def raw(shared_data) -> pl.DataFrame:
    """TinyStories and Tiny Shakespeare documents with exact and near duplicates planted far from their
    originals (so most pairs straddle shards), ids shuffled against the row order."""
    stories = [s.strip() for s in (shared_data / "corpus" / "tinystories_train_head.txt").read_text(
        encoding="utf-8").split("<|endoftext|>") if s.strip()][:1500]
    plays = (shared_data / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    chunks = ["\n\n".join(plays[i:i + 12]) for i in range(0, 1200, 12)]
    rng = random.Random(5)
    docs = [("tinystories", s) for s in stories] + [("tinyshakespeare", c) for c in chunks]
    for i in rng.sample(range(len(docs)), 80):
        source, text = docs[i]
        words = text.split(" ")
        if i % 2:
            words[rng.randrange(len(words))] = "zebra"  # a near duplicate: one word swapped
        docs.append((source, " ".join(words)))
    ids = [f"doc-{i:05d}" for i in range(len(docs))]
    rng.shuffle(ids)
    return pl.DataFrame({"id": ids, "source": [s for s, _ in docs], "text": [t for _, t in docs]})


def reference_kept(df: pl.DataFrame, cfg: Filter, seed: int) -> set[str]:
    """The in-memory rules as filter_corpus applied them before sharding: quality flags, then exact duplicates
    by text equality and MinHash clusters over the whole corpus, in id order."""
    flags, out = filters.quality_flags(filters.normalize(df["text"]), cfg)
    passed = ~flags.select(pl.any_horizontal(pl.all())).to_series().to_numpy()
    order = df.select(pl.arg_sort_by("id", maintain_order=True)).to_series().to_numpy()
    order = order[passed[order]]
    exact = np.zeros(len(df), dtype=bool)
    exact[order] = dedup.exact_duplicates(out[order])
    keep = order[~exact[order]]
    near = np.zeros(len(df), dtype=bool)
    near[keep] = dedup.near_duplicates(out[keep], cfg.minhash, seed)
    return set(df["id"].filter(pl.Series(passed & ~exact & ~near)))


def run(raw_path, shard_bytes, work, progress=lambda n: None) -> tuple[pl.DataFrame, dict]:
    out: list[pl.DataFrame] = []
    report = sharded.filter_shards(sharded.parquet_shards(raw_path, shard_bytes), Filter(), 1337, work, out.append,
                                   progress)
    return pl.concat(out), report


def test_shards_decide_as_the_whole_corpus_does(raw, tmp_path, monkeypatch):
    write_parquet(tmp_path / "raw.parquet", raw)
    whole, report = run(tmp_path / "raw.parquet", 1 << 40, sharded.Work(tmp_path / "w1", "a").open())
    small, small_report = run(tmp_path / "raw.parquet", 50_000, sharded.Work(tmp_path / "w2", "a").open())
    assert len(list((tmp_path / "w2").glob("scan-*.parquet"))) > 20
    assert small.equals(whole) and small_report == report
    monkeypatch.setattr(sharded, "PART_DOCS", 97)  # dedup in ~25 partitions per band instead of one
    parted, parted_report = run(tmp_path / "raw.parquet", 50_000, sharded.Work(tmp_path / "w3", "a").open())
    assert parted.equals(whole) and parted_report == report
    assert set(whole["id"]) == reference_kept(raw, Filter(), 1337)
    assert report["dropped"]["dedup.exact"] >= 30 and report["dropped"]["dedup.minhash"] >= 30
    assert report["docs_in"] == report["docs_out"] + sum(report["dropped"].values())
    # input order kept, split by document
    rows = dict(zip(raw["id"], range(len(raw))))
    assert [rows[i] for i in whole["id"]] == sorted(rows[i] for i in whole["id"])
    assert set(whole["split"]) == {"train", "val"}


def test_parquet_shards_cut_by_text_bytes(raw, tmp_path):
    write_parquet(tmp_path / "raw.parquet", raw)
    shards = list(sharded.parquet_shards(tmp_path / "raw.parquet", 30_000, batch_rows=100))
    assert pl.concat(shards).equals(raw)
    for s in shards[:-1]:
        size = s["text"].str.len_bytes()
        assert size.sum() >= 30_000 > size.sum() - size[-1]


def load_stage(root):
    spec = importlib.util.spec_from_file_location("filter_corpus_stage", root / "stages" / "filter_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_output_does_not_depend_on_shard_size(raw, root, tmp_path, monkeypatch):
    stage = load_stage(root)
    monkeypatch.chdir(tmp_path)
    write_parquet(stage.RAW, raw)
    results = []
    for shard_mb in (0.05, 1000):
        stage.main(Params(filter={"shard_mb": shard_mb}))
        results.append((stage.OUT.read_bytes(), stage.REPORT.read_text(), stage.VALIDATION.read_text()))
        assert not stage.WORK.exists()
    assert results[0] == results[1]
    assert json.loads(results[0][2])["success"]


def test_interrupted_filter_resumes_from_its_finished_shards(raw, root, tmp_path, monkeypatch):
    stage = load_stage(root)
    monkeypatch.chdir(tmp_path)
    write_parquet(stage.RAW, raw)
    params = Params(filter={"shard_mb": 0.1})
    stage.main(params)
    expected = stage.OUT.read_bytes(), stage.REPORT.read_text()
    stage.OUT.unlink()

    scanned = []
    real_scan = sharded.scan

    def scan(df, cfg, seed):
        if len(scanned) == 5:
            raise KeyboardInterrupt
        scanned.append(df["id"][0])
        return real_scan(df, cfg, seed)

    monkeypatch.setattr(sharded, "scan", scan)
    with pytest.raises(KeyboardInterrupt):
        stage.main(params)
    assert not stage.OUT.exists() and len(list(stage.WORK.glob("stats-*.json"))) == 5
    first = list(scanned)
    calls = []
    monkeypatch.setattr(sharded, "scan", lambda df, cfg, seed: calls.append(df["id"][0]) or real_scan(df, cfg, seed))
    stage.main(params)
    assert calls and not set(calls) & set(first)  # the five finished shards were not scanned again
    assert (stage.OUT.read_bytes(), stage.REPORT.read_text()) == expected
    assert not stage.WORK.exists()


@pytest.fixture(scope="module")
def dask_scheduler(tmp_path_factory):
    """A Dask scheduler and two worker processes on 127.0.0.1, started as the README starts them; its address."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    file = folder / "scheduler.json"
    dask = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(file)], **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        address = json.loads(file.read_text())["address"]
        procs.append(subprocess.Popen([*dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--host",
                                       "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                                       "--local-directory", str(folder)], **quiet))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def test_dask_engine_writes_the_local_bytes(raw, root, tmp_path, monkeypatch, dask_scheduler):
    from distributed import Client, get_task_stream

    stage = load_stage(root)
    monkeypatch.chdir(tmp_path)
    write_parquet(stage.RAW, raw)

    def run(**where):
        stage.main(Params(filter={"shard_mb": 0.05, **where}))
        assert not stage.WORK.exists()
        return stage.OUT.read_bytes(), stage.REPORT.read_text(), stage.VALIDATION.read_text()

    local = run()
    with Client(dask_scheduler) as client, get_task_stream(client) as tasks:
        assert run(engine="dask", scheduler=dask_scheduler) == local
    assert len(tasks.data) > 20 and len({t["worker"] for t in tasks.data}) == 2  # every shard, on both workers


def test_a_failing_shard_names_itself_and_a_rerun_sends_only_the_rest(raw, tmp_path):
    from distributed import get_task_stream

    good = raw.head(200)
    bad = good.with_columns(text=pl.lit(3))  # no text: the scan fails on the worker
    work = sharded.Work(tmp_path / "w", "a").open()
    with engine.shard_map(Filter(engine="dask", workers=1)) as map_shards:
        with pytest.raises(PersonaError, match="shard 1 failed on the Dask cluster"):
            sharded.filter_shards([good, bad], Filter(), 1337, work, lambda df: None, map_shards=map_shards)
        assert work.done(0) and not work.done(1)
        with get_task_stream() as tasks:
            sharded.filter_shards([good, good, good], Filter(), 1337, work, lambda df: None, map_shards=map_shards)
    assert len(tasks.data) == 2  # shard 0 was finished: not sent again


def test_a_cluster_without_workers_is_an_error_not_a_hang(raw, tmp_path, monkeypatch):
    from distributed import LocalCluster, get_client

    monkeypatch.setattr(engine, "WORKER_WAIT_S", 1)
    monkeypatch.setattr(engine, "POLL_S", 0.2)
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as empty:
        with pytest.raises(PersonaError, match=r"scheduler at tcp://127\.0\.0\.1:\d+ has had no workers for 1 s"):
            with engine.shard_map(Filter(engine="dask", scheduler=empty.scheduler_address)):
                pass
    work = sharded.Work(tmp_path / "w", "a").open()
    with engine.shard_map(Filter(engine="dask", workers=1)) as map_shards:
        client = get_client()
        client.retire_workers(list(client.scheduler_info()["workers"]), close_workers=True)  # all workers lost
        with pytest.raises(PersonaError, match="the Dask cluster has had no workers for 1 s"):
            sharded.filter_shards([raw.head(50)], Filter(), 1337, work, lambda df: None, map_shards=map_shards)
