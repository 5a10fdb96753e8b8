"""Exact and near-duplicate detection for the corpus.

Near duplicates are found with MinHash over word n-grams and LSH banding (Broder 1997; Leskovec et al.,
Mining of Massive Datasets, ch. 3): documents whose signatures agree on every row of at least one band
are candidates, candidates are joined transitively into clusters, and all but the first document of a
cluster are duplicates. With b bands of r rows a pair of Jaccard similarity s becomes a candidate with
probability 1 - (1 - s^r)^b: with the defaults (14 bands x 8 rows) 5 % at s = 0.5, 50 % at s = 0.69, 95 % at
s = 0.82.

Hashing is vectorised with numpy; the only Python loop hashes the distinct words once, with keyed
BLAKE2b, so signatures depend on the seed and nothing else (not on the polars version or row order).
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from persona_lm.params import MinHash

_WORD = r"[\p{L}\p{N}]+"
_FOLD = np.uint64(0x100000001B3)
_CHUNK = 4096  # shingles hashed at once: a cache-sized block of _CHUNK x bands*rows uint32


def exact_duplicates(texts: pl.Series) -> np.ndarray:
    """True for every text equal to an earlier one."""
    return ~texts.is_first_distinct().to_numpy()


def _splitmix(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (SplitMix64's finaliser): spreads folded n-gram values over all bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_hashes(words: pl.Series, seed: int) -> np.ndarray:
    vocab = words.unique()
    key = seed.to_bytes(8, "little")
    h = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8, key=key).digest(), "little") for w in vocab]
    table = pl.DataFrame({"w": vocab, "h": pl.Series(h, dtype=pl.UInt64)})
    return words.to_frame("w").join(table, on="w", how="left", maintain_order="left")["h"].to_numpy()


def signatures(texts: pl.Series, cfg: MinHash, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (n_docs x bands*rows, uint32) of lowercased word n-grams; a document shorter
    than n words is one shingle of all its words. Also returns which documents have any words."""
    lists = texts.str.to_lowercase().str.extract_all(_WORD)
    lens = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    h = _word_hashes(lists.explode(empty_as_null=False).drop_nulls(), seed)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    n_sh = np.where(lens > 0, np.maximum(lens - cfg.ngram + 1, 1), 0)
    width = np.minimum(lens, cfg.ngram)
    first = np.concatenate([[0], np.cumsum(n_sh)[:-1]])
    pos = np.repeat(starts - first, n_sh) + np.arange(n_sh.sum())
    w = np.repeat(width, n_sh)
    sh = np.zeros(len(pos), dtype=np.uint64)
    for j in range(cfg.ngram):
        take = j < w
        sh[take] = (sh[take] * _FOLD) ^ h[pos[take] + j]
    sh = (_splitmix(sh) >> np.uint64(32)).astype(np.uint32)

    k = cfg.bands * cfg.rows
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**31, size=k, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 2**32, size=k, dtype=np.uint32)
    sig = np.full((len(texts), k), np.iinfo(np.uint32).max, dtype=np.uint32)
    sh_doc = np.repeat(np.arange(len(texts)), n_sh)
    buf = np.empty((_CHUNK, k), dtype=np.uint32)
    for s0 in range(0, len(sh), _CHUNK):
        d = sh_doc[s0 : s0 + _CHUNK]
        v = buf[: len(d)]
        np.multiply(sh[s0 : s0 + _CHUNK, None], a[None, :], out=v)  # h_i(x) = a_i x + b_i mod 2^32 with odd
        np.add(v, b[None, :], out=v)  # a_i: one permutation of the 32-bit shingle hashes per i
        cut = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        sig[d[cut]] = np.minimum(sig[d[cut]], np.minimum.reduceat(v, cut, axis=0))
    has = n_sh > 0
    return sig, has


def band_groups(band: np.ndarray) -> np.ndarray:
    """(n, rows) uint32 signature columns of one LSH band -> (n,) int32 bucket index: equal rows, equal index."""
    band = np.ascontiguousarray(band).view(np.dtype((np.void, band.shape[1] * 4)))
    return np.unique(band.ravel(), return_inverse=True)[1].ravel().astype(np.int32)


def propagate(groups: list[np.ndarray], n: int) -> np.ndarray:
    """The cluster label of each of n rows given each band's bucket index per row: the lowest row index
    connected to it through shared buckets (min-label propagation until no label can shrink)."""
    labels = np.arange(n)
    while True:
        before = labels.copy()
        for g in groups:
            low = np.full(g.max() + 1, n)
            np.minimum.at(low, g, labels)
            labels = np.minimum(labels, low[g])
        if np.array_equal(labels, before):
            return labels


def clusters(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """The cluster label of each row of an in-memory signature matrix (see propagate)."""
    return propagate([band_groups(sig[:, i * rows : (i + 1) * rows]) for i in range(bands)], len(sig))


def near_duplicates(texts: pl.Series, cfg: MinHash, seed: int) -> np.ndarray:
    """True for every text in a MinHash/LSH cluster with an earlier text (documents without words never
    match anything)."""
    out = np.zeros(len(texts), dtype=bool)
    if len(texts) < 2:
        return out
    sig, has = signatures(texts, cfg, seed)
    idx = np.flatnonzero(has)
    if len(idx):
        out[idx] = clusters(sig[idx], cfg.bands, cfg.rows) != np.arange(len(idx))
    return out
