"""The filtered corpus read as a stream of text batches, and as memory-mapped token files, as nanoGPT's train.bin/val.bin: one flat file of token ids
per split, documents joined by <|endoftext|>, memory-mapped so pretraining samples windows from a corpus
larger than RAM (only the pages a batch touches are read).

`write_tokens` encodes a stream of text batches and appends each batch to the file as it goes: memory holds one
batch, whatever the corpus size. `meta.json` beside the files records the dtype, the counts and a SHA-256 of each
file computed while writing, so a run is fingerprinted by that small file instead of rereading gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import polars as pl

from persona_lm.errors import PersonaError

META = "meta.json"
CORPUS = Path("data/interim/corpus.parquet")  # filter_corpus's output
TOKENS = Path("data/processed/tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (2 bytes per token, as nanoGPT), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_tokens(tok, batches: Iterable[list[str]], path: Path) -> dict:
    """Encode each batch of documents (`tok.encode_batch`), append `doc + [eot]` per document to `path` (a flat
    array of `token_dtype(tok.vocab_size)`), and return {"tokens" (one <|endoftext|> per document included), "docs",
    "bytes" (the documents' UTF-8 text, not the file), "sha256" (of the file)}.
    The caller makes the write atomic."""
    dtype = token_dtype(tok.vocab_size)
    h = hashlib.sha256()
    n_tokens = n_docs = n_bytes = 0
    with open(path, "wb") as f:
        for texts in batches:
            if not texts:
                continue
            docs = tok.encode_batch(texts)
            count = sum(len(d) + 1 for d in docs)
            ids = np.fromiter(chain.from_iterable(d + [tok.eot] for d in docs), dtype=dtype, count=count)
            data = ids.tobytes()
            f.write(data)
            h.update(data)
            n_tokens += len(ids)
            n_docs += len(docs)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": n_tokens, "docs": n_docs, "bytes": n_bytes, "sha256": h.hexdigest()}


def load_tokens(folder: Path, split: str) -> np.ndarray:
    """The split's token ids, memory-mapped read-only: (tokens,) of the dtype in meta.json, backed by the file
    (a page is read when a batch first touches it, and is the kernel's to evict: page cache, not process memory).
    Raises PersonaError when the folder was not written by tokenize_corpus or the file is incomplete."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        raise PersonaError(f"{meta_path} is missing: run `dvc repro tokenize_corpus` first")
    meta = json.loads(meta_path.read_text())
    info, dtype = meta["splits"][split], np.dtype(meta["dtype"])
    path = Path(folder) / f"{split}.bin"
    size = path.stat().st_size if path.is_file() else -1
    if size != info["tokens"] * dtype.itemsize:
        raise PersonaError(f"{path}: {size} bytes, expected {info['tokens'] * dtype.itemsize} "
                           f"({info['tokens']} {dtype} tokens); run `dvc repro tokenize_corpus` again")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # Windows are drawn at random, so the kernel's read-ahead only reads pages no batch uses: measured with a cold
    # cache (bench/token_shards.py, 200 batches of 32 x 257 from 4 GB), 464 MiB of file pages and 17.0 ms a batch
    # with it, 108 MiB and 4.6 ms without
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype)


def _corpus() -> Path:
    if not CORPUS.exists():
        raise PersonaError(f"{CORPUS} is missing: run `dvc repro filter_corpus` first")
    return CORPUS


def corpus_docs() -> dict[str, int]:
    """Documents per split of the filtered corpus (reads only the split column)."""
    return dict(pl.scan_parquet(_corpus()).group_by("split").len().collect().iter_rows())


def corpus_batches(split: str, rows: int = 4096) -> Iterator[list[str]]:
    """The texts of one split of the filtered corpus, in order, `rows` documents at a time: memory holds one batch
    of the file, never the corpus."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # pre_buffer=False: pyarrow's read-ahead cache would keep every row group read until the file closes
    for batch in pq.ParquetFile(_corpus(), pre_buffer=False).iter_batches(batch_size=rows, columns=["text", "split"]):
        texts = batch.column("text").filter(pc.equal(batch.column("split"), split)).to_pylist()
        if texts:
            yield texts


def corpus_texts(split: str) -> Iterator[str]:
    return chain.from_iterable(corpus_batches(split))
