"""The filter_corpus engine: the corpus filtered shard by shard, deduplicated across all shards, in bounded memory.

Three passes, the multi-stage scheme of datatrove's and NeMo Curator's dedup:
1. `scan`: each shard (a slice of the raw corpus of about `shard_bytes` of text) is normalised and run through
   every quality rule (persona_lm.data.filters); its rows (id, source, text after C4's line removal, the first
   rule it fails, an exact-dedup key, the split hash) go to a parquet file and the MinHash signatures of the
   rows that passed to a .npy file, both in the work folder. Memory: one shard.
2. `resolve`: exact duplicates from the keys, hashed into partitions; near duplicates from the signatures read
   one LSH band at a time (stored band-major: a band is one contiguous read per shard), its rows spilled to
   partition files and bucketed one partition at a time, the buckets of two or more documents kept on disk and
   clusters joined across bands and shards by min-label propagation over them; then the train/val split.
   Memory: one partition (PART_DOCS documents) plus about a dozen bytes per document (flags, its position in id
   order, its cluster label), never its text; sorting the ids once holds the id column.
3. The kept rows of each shard, in input order, appended to the output.

The decisions are those of the in-memory rules: duplicates resolve in id order (the lowest id of a cluster
stays), so the output does not depend on the order of the rows, on the shard size or on how many shards there
are. The exact key is a 128-bit BLAKE2b of the text: two different texts share one with probability ~2^-128.
Finished shards of pass 1 are kept in the work folder, so an interrupted run resumes after its last finished
shard; the folder is removed once the output is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl

from persona_lm.data import dedup, engine
from persona_lm.data.filters import normalize, quality_flags
from persona_lm.io import write_json
from persona_lm.params import Filter

log = logging.getLogger("persona_lm")

ROW = {"id": pl.String, "source": pl.String, "text": pl.String}
OUT = {**ROW, "split": pl.String}
SCAN = {**ROW, "rule": pl.String, "key": pl.Binary, "u": pl.Float64, "words": pl.Boolean}


def _keys(texts: list[str], seed: int) -> tuple[list[bytes], list[float]]:
    """Per text: its exact-dedup key (unkeyed BLAKE2b-128) and its split draw u in [0, 1) (BLAKE2b-64 keyed by
    the seed, as split_of has always drawn it)."""
    key = seed.to_bytes(8, "little")
    exact, u = [], []
    for t in texts:
        b = t.encode()
        exact.append(hashlib.blake2b(b, digest_size=16).digest())
        u.append(int.from_bytes(hashlib.blake2b(b, digest_size=8, key=key).digest(), "little") / 2.0**64)
    return exact, u


def scan(df: pl.DataFrame, cfg: Filter, seed: int) -> tuple[pl.DataFrame, np.ndarray, dict[str, int]]:
    """Pass 1 on one shard of (id, source, text) rows. Returns the SCAN frame (key, u and words are null for rows
    that failed a rule), the MinHash signatures (n_passed, bands * rows) uint32 of the passed rows in row order
    (0 columns when MinHash is off), and per rule how many rows fail it at all."""
    texts = normalize(df["text"], cfg.normalize_unicode)
    flags, out = quality_flags(texts, cfg)
    rules = flags.columns
    first = flags.select(pl.coalesce([pl.when(pl.col(r)).then(pl.lit(r)) for r in rules])).to_series()
    passed = first.is_null().to_numpy()
    kept = out.filter(pl.Series(passed))
    exact, u = _keys(kept.to_list(), seed)
    if cfg.minhash.enabled and len(kept):
        sig, has = dedup.signatures(kept, cfg.minhash, seed)
    else:
        sig = np.zeros((len(kept), cfg.minhash.bands * cfg.minhash.rows if cfg.minhash.enabled else 0), np.uint32)
        has = np.zeros(len(kept), dtype=bool)
    idx = np.flatnonzero(passed)

    def spread(values, dtype):
        return pl.Series([None] * len(df), dtype=dtype).scatter(idx, pl.Series(values, dtype=dtype)) if len(idx) \
            else pl.Series([None] * len(df), dtype=dtype)

    frame = pl.DataFrame({"id": df["id"], "source": df["source"], "text": out, "rule": first,
                          "key": spread(exact, pl.Binary), "u": spread(u, pl.Float64),
                          "words": spread(has, pl.Boolean)}, schema=SCAN)
    return frame, sig, {r: int(flags[r].sum()) for r in rules}


def scan_shard(df: pl.DataFrame, cfg: Filter, seed: int) -> tuple[pl.DataFrame, np.ndarray, "Shard"]:
    """Pass 1 on one shard, everything Work.save needs: the SCAN frame, the band-major signatures and the record.
    A pure function of the rows, so it runs wherever the engine sends the shard (persona_lm.data.engine)."""
    frame, sig, failed = scan(df, cfg, seed)
    sources = dict(df.group_by("source").len().sort("source").iter_rows())
    shard = Shard(len(df), int(df["text"].str.len_bytes().sum() or 0), failed, sources, len(sig))
    return frame, band_major(sig, cfg.minhash.rows), shard


def rule_names(cfg: Filter) -> list[str]:
    """Every rule in attribution order (the quality rules, then the two dedup rules)."""
    flags, _ = quality_flags(pl.Series([], dtype=pl.String), cfg)
    return [*flags.columns, "dedup.exact", "dedup.minhash"]


@dataclass
class Shard:
    """Pass 1's record of one shard, as written to `stats-<k>.json` in the work folder."""

    docs: int
    bytes: int
    failed: dict[str, int]
    sources: dict[str, int]  # documents in, per source
    signatures: int = 0      # documents in sig-<k>.npy (the passed rows)


@dataclass
class Work:
    """The work folder of one filter run: pass 1's files per shard, named by the shard's index."""

    path: Path
    fingerprint: str
    shards: list[Shard] = field(default_factory=list)

    def open(self) -> "Work":
        """Keep the finished shards of an earlier run with the same fingerprint; start afresh otherwise."""
        stamp = self.path / "fingerprint"
        if not (stamp.is_file() and stamp.read_text() == self.fingerprint):
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            stamp.write_text(self.fingerprint)
        elif finished := len(list(self.path.glob("stats-*.json"))):
            log.info("filter_corpus: resuming: %d shard(s) finished by an earlier run are not scanned again", finished)
        return self

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def file(self, kind: str, k: int) -> Path:
        return self.path / f"{kind}-{k:06d}.{'npy' if kind == 'sig' else 'json' if kind == 'stats' else 'parquet'}"

    def done(self, k: int) -> Shard | None:
        """The record of shard k when pass 1 finished it (its stats file is written last)."""
        stats = self.file("stats", k)
        return Shard(**json.loads(stats.read_text())) if stats.is_file() else None

    def save(self, k: int, frame: pl.DataFrame, sig: np.ndarray, shard: Shard) -> None:
        """Shard k's scan, its band-major signatures (bands, n_passed, rows) and, last, its record."""
        for kind, write in (("scan", lambda p: frame.write_parquet(p, compression="zstd")),
                            ("sig", lambda p: np.save(p, sig))):
            tmp = self.file(kind, k).with_name(f".{self.file(kind, k).name}.tmp")
            with open(tmp, "wb") as f:
                write(f)
            tmp.replace(self.file(kind, k))
        write_json(self.file("stats", k), shard.__dict__)


PART_DOCS = 1 << 20  # documents per dedup partition: one partition of one band is in memory at a time


def resolve(work: Work, cfg: Filter) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2 over every shard's scan: per document (in input order) whether it is an exact duplicate, a near
    duplicate, kept, and in val (else train; False where not kept). Duplicates resolve in id order.

    Both dedups work partition by partition, so their working set is a partition, not the corpus: exact keys are
    hashed into partitions (equal keys meet in one), and each LSH band's rows into partitions by their first
    value (equal rows meet in one) through files in the work folder. A band's buckets of two or more documents
    are kept on disk, and min-label propagation over them joins clusters across bands and shards. What stays in
    memory per document is a few flags and two int32 (its position in id order, its cluster label)."""
    files = [work.file("scan", k) for k in range(len(work.shards))]
    if not files:
        empty = np.zeros(0, dtype=bool)
        return empty, empty, empty, empty
    rows = pl.scan_parquet(files).with_row_index("row")

    def column(expr) -> np.ndarray:
        return rows.select(expr).collect().to_series().to_numpy()

    passed = column(pl.col("rule").is_null())
    n = len(passed)
    exact = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    if cfg.exact_dedup:
        parts = -(-int(passed.sum()) // PART_DOCS)
        for p in range(parts):
            part = rows.filter(pl.col("rule").is_null() & (pl.col("key").hash(seed=7) % parts == p)) \
                .select("row", "id", "key").collect().sort(["id", "row"])
            exact[part.filter(~pl.col("key").is_first_distinct())["row"].to_numpy()] = True
    if cfg.minhash.enabled:
        candidate = passed & ~exact & column(pl.col("words").fill_null(False))  # no words: matches nothing
        order = column(pl.arg_sort_by("id", maintain_order=True))
        keep = order[candidate[order]].astype(np.int64)  # the candidates in id order
        del order
        if len(keep) >= 2:
            position = np.full(n, -1, dtype=np.int32)
            position[keep] = np.arange(len(keep), dtype=np.int32)
            buckets = _buckets(work, passed, position, len(keep), cfg.minhash.bands, cfg.minhash.rows)
            near[keep] = _propagate(buckets, len(keep)) != np.arange(len(keep))
            shutil.rmtree(work.path / "bands", ignore_errors=True)
    kept = passed & ~exact & ~near
    val = np.zeros(n, dtype=bool)
    val[kept] = val_mask(column("u")[kept], cfg.val_fraction)
    return exact, near, kept, val


def _buckets(work: Work, passed: np.ndarray, position: np.ndarray, n: int, bands: int, rows: int) -> list[Path]:
    """Per band and partition, the buckets of two or more candidates: a .npz of `pos` (the position in id order
    of each document in such a bucket) and `group` (its bucket, 0..k). Each shard's band is read once and split
    into partition files by its rows' first value; each partition is then bucketed in memory on its own."""
    folder = work.path / "bands"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    parts = -(-n // PART_DOCS)  # n candidates, those with a position
    record = np.dtype([("pos", "<i4"), ("v", "<u4", (rows,))])
    out = []
    for b in range(bands):
        spill = [open(folder / f"spill-{p}.bin", "wb") for p in range(parts)]
        start = 0
        for k, shard in enumerate(work.shards):
            where = start + np.flatnonzero(passed[start:start + shard.docs])  # the rows of the shard's signatures
            start += shard.docs
            sig = np.load(work.file("sig", k), mmap_mode="r")
            band = np.array(sig[b])
            del sig
            pos = position[where]
            mine = pos >= 0
            rec = np.empty(int(mine.sum()), dtype=record)
            rec["pos"], rec["v"] = pos[mine], band[mine]
            part = rec["v"][:, 0] % parts
            for p in range(parts):
                rec[part == p].tofile(spill[p])
        for f in spill:
            f.close()
        for p in range(parts):
            rec = np.fromfile(folder / f"spill-{p}.bin", dtype=record)
            (folder / f"spill-{p}.bin").unlink()
            group = dedup.band_groups(rec["v"])
            shared = np.bincount(group)[group] > 1
            if shared.any():
                group = np.unique(group[shared], return_inverse=True)[1].ravel().astype(np.int32)
                out.append(folder / f"band-{b}-{p}.npz")
                np.savez(out[-1], pos=rec["pos"][shared], group=group)
    return out


def _propagate(buckets: list[Path], n: int) -> np.ndarray:
    """The cluster label of each of n positions: the lowest position connected to it through shared buckets
    (dedup.propagate's min-label propagation, over the bucket files one at a time)."""
    labels = np.arange(n, dtype=np.int32)
    changed = True
    while changed:
        changed = False
        for path in buckets:
            with np.load(path) as f:
                pos, group = f["pos"], f["group"]
            low = np.full(group.max() + 1, n, dtype=np.int32)
            np.minimum.at(low, group, labels[pos])
            new = np.minimum(labels[pos], low[group])
            if (new < labels[pos]).any():
                labels[pos] = new
                changed = True
    return labels


def band_major(sig: np.ndarray, rows: int) -> np.ndarray:
    """(n, bands * rows) signatures -> (bands, n, rows): each band contiguous on disk, so reading one band reads
    1/bands of the file."""
    return np.ascontiguousarray(sig.reshape(len(sig), sig.shape[1] // rows, rows).transpose(1, 0, 2))


def val_mask(u: np.ndarray, val_fraction: float) -> np.ndarray:
    """True for the kept documents that go to val, from each one's draw u (a keyed hash of its text: stable
    across runs, machines, library versions, row order and sharding). When the fraction rounds to nothing the
    lowest draw goes to val (and the highest to train), so both splits exist whenever there are two documents."""
    val = u < val_fraction
    if len(u) >= 2 and val_fraction > 0 and not val.any():
        val[np.argmin(u)] = True
    if len(u) and val.all():
        val[np.argmax(u)] = False
    return val


def split_of(texts: pl.Series, val_fraction: float, seed: int) -> np.ndarray:
    """"train"/"val" for each of `texts` (the kept documents of a corpus; see val_mask)."""
    return np.where(val_mask(np.array(_keys(texts.to_list(), seed)[1], dtype=np.float64), val_fraction), "val", "train")


def filter_shards(shards: Iterable[pl.DataFrame], cfg: Filter, seed: int, work: Work,
                  write: Callable[[pl.DataFrame], None], progress: Callable[[int], None] = lambda docs: None,
                  map_shards: engine.Map = engine.local) -> dict:
    """Filter a corpus given as shards of (id, source, text) rows, in input order; `write` receives the kept rows
    (id, source, text, split) shard by shard, in input order. Pass 1 runs through `map_shards` (in this process
    by default; see persona_lm.data.engine), its results saved in shard order. Shards that `work` already
    finished are not scanned again (their rows are still read from `shards`, which must be the same). Returns
    the report: documents and bytes in and out, per rule the documents it dropped first (`dropped`: docs_in =
    docs_out + their sum) and those failing it at all (`failed`), and per source documents in and out."""
    work.shards = []
    todo = ((k, None if work.done(k) else df) for k, df in enumerate(shards))
    for k, result in map_shards(partial(scan_shard, cfg=cfg, seed=seed), todo):
        if result is not None:
            work.save(k, *result)
        shard = work.done(k)
        work.shards.append(shard)
        progress(shard.docs)
    exact, near, kept, val = resolve(work, cfg)

    rules = rule_names(cfg)
    dropped = dict.fromkeys(rules, 0)
    failed = dict.fromkeys(rules, 0)
    sources_in: dict[str, int] = {}
    sources_out: dict[str, int] = {}
    docs_out = bytes_out = start = 0
    for k, shard in enumerate(work.shards):
        frame = pl.read_parquet(work.file("scan", k))
        end = start + len(frame)
        for rule, count in frame["rule"].drop_nulls().value_counts().iter_rows():
            dropped[rule] += count
        for rule, count in shard.failed.items():
            failed[rule] += count
        for source, count in shard.sources.items():
            sources_in[source] = sources_in.get(source, 0) + count
        mine = kept[start:end]
        out = frame.filter(pl.Series(mine)).select("id", "source", "text").with_columns(
            split=pl.Series(np.where(val[start:end][mine], "val", "train"), dtype=pl.String))
        for source, count in out.group_by("source").len().iter_rows():
            sources_out[source] = sources_out.get(source, 0) + count
        docs_out += len(out)
        bytes_out += int(out["text"].str.len_bytes().sum() or 0)
        write(out)
        start = end
    dropped["dedup.exact"] = failed["dedup.exact"] = int(exact.sum())
    dropped["dedup.minhash"] = failed["dedup.minhash"] = int(near.sum())
    return {
        "docs_in": sum(s.docs for s in work.shards),
        "docs_out": docs_out,
        "bytes_in": sum(s.bytes for s in work.shards),
        "bytes_out": bytes_out,
        "docs_train": int(kept.sum() - val.sum()),
        "docs_val": int(val.sum()),
        "dropped": dropped,
        "failed": failed,
        "sources": {s: {"docs_in": sources_in[s], "docs_out": sources_out.get(s, 0)} for s in sorted(sources_in)},
    }


def filter_corpus(df: pl.DataFrame, cfg: Filter, seed: int) -> tuple[pl.DataFrame, dict]:
    """The whole corpus as one in-memory shard (tests, benchmarks): the kept rows (id, source, text, split) in
    input order and the report of filter_shards."""
    import tempfile

    out: list[pl.DataFrame] = []
    with tempfile.TemporaryDirectory(prefix="filter_corpus-") as tmp:
        work = Work(Path(tmp) / "work", "in-memory").open()
        report = filter_shards([df.select(list(ROW)).cast(ROW)], cfg, seed, work, out.append)
    return (pl.concat(out) if out else pl.DataFrame(schema=OUT)), report


def parquet_shards(path: Path, shard_bytes: int, batch_rows: int = 1024) -> Iterator[pl.DataFrame]:
    """The (id, source, text) rows of a parquet file, in order, in shards that close at the first row whose text
    reaches `shard_bytes`: which rows form a shard depends on the rows alone, not on the file's row groups."""
    import pyarrow.parquet as pq

    pending: list[pl.DataFrame] = []
    size = 0  # text bytes pending from earlier batches
    # pre_buffer=False: with pyarrow's default read-ahead cache the buffers of every row group read stayed
    # allocated until the file closed (measured: +220 MB of Arrow memory over 50 shards of 16 MB; flat without)
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=list(ROW)):
        frame = pl.from_arrow(batch).cast(ROW)
        ends = frame["text"].str.len_bytes().fill_null(0).cast(pl.Int64).cum_sum().to_numpy() + size
        start = 0
        while len(over := np.flatnonzero(ends[start:] >= shard_bytes)):
            cut = start + int(over[0])
            pending.append(frame.slice(start, cut + 1 - start))
            yield pl.concat(pending)
            pending, start, ends = [], cut + 1, ends - ends[cut]
        if start < len(frame):
            pending.append(frame.slice(start))
        size = int(ends[-1]) if start < len(frame) else 0
    if pending:
        yield pl.concat(pending)
