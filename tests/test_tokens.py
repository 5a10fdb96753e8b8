"""tokenize_corpus's memory-mapped token files: the same tokens as encoding the corpus in memory, written a batch
at a time, and pretraining drawing the same windows from the memmap as from a tensor."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from persona_lm.errors import PersonaError
from persona_lm.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer
from persona_lm.train.batches import CorpusBatches, generator, sample_windows
from persona_lm.train.phase import token_stream
from persona_lm.train.tokens import load_tokens, token_dtype, write_tokens

ROOT = Path(__file__).resolve().parents[1]
EMOTIONS = ["neutral", "joy"]


@pytest.fixture(scope="module")
def stories(shared_data) -> list[str]:
    text = (shared_data / "corpus" / "tinystories_train_head.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:400]


@pytest.fixture(scope="module")
def tok(stories) -> ChatTokenizer:
    return ChatTokenizer(train_tokenizer(stories, "bpe", 400, EMOTIONS))


def test_token_files_hold_the_in_memory_stream_whatever_the_batch_size(tmp_path, tok, stories):
    expected = token_stream(tok, stories).numpy()
    infos = []
    for rows in (1, 37, 1000):
        path = tmp_path / f"{rows}.bin"
        infos.append(write_tokens(tok, [stories[i:i + rows] for i in range(0, len(stories), rows)], path))
        assert np.array_equal(np.fromfile(path, dtype=np.uint16), expected)
    assert infos[0] == infos[1] == infos[2]
    assert infos[0]["tokens"] == len(expected) and infos[0]["docs"] == len(stories)
    assert infos[0]["bytes"] == sum(len(s.encode()) for s in stories)


def test_token_dtype_widens_past_65536_ids():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


@pytest.mark.parametrize("n_tokens", [5000, 20])  # 20 < block_size + 1: the short stream is repeated, as before
def test_windows_from_a_memmap_equal_windows_from_a_tensor(tmp_path, n_tokens):
    ids = np.random.default_rng(0).integers(0, 60000, n_tokens).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    tensor = torch.from_numpy(ids.astype(np.int64))
    for step in range(3):
        a = sample_windows(mm, 6, 32, generator(1, "train", step))
        b = sample_windows(tensor, 6, 32, generator(1, "train", step))
        assert a[0].dtype == torch.long and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    batches = [CorpusBatches(train=s, val=s, personal=torch.arange(100), personal_mix=0.5, batch_size=8,
                             block_size=16, seed=3) for s in (mm, tensor)]
    for step in range(3):
        x, y = (b.get("train", step) for b in batches)
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])


def _stage(d: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "stages/tokenize_corpus.py")], cwd=d, env=env,
                          capture_output=True, text=True)


def _project(d: Path, tok: ChatTokenizer, texts: list[str], splits: list[str]) -> Path:
    (d / "data/interim").mkdir(parents=True)
    pl.DataFrame({"id": [str(i) for i in range(len(texts))], "source": ["s"] * len(texts), "text": texts,
                  "split": splits}).write_parquet(d / "data/interim/corpus.parquet", row_group_size=50)
    save_tokenizer(tok.tok, d / "models/tokenizer/tokenizer.json")
    (d / "params.yaml").write_text("persona: {emotions: [neutral, joy]}\n")
    return d


def test_the_stage_writes_each_split_and_pretrain_reads_them_mapped(tmp_path, tok, stories):
    splits = ["val" if i % 10 == 3 else "train" for i in range(len(stories))]
    d = _project(tmp_path, tok, stories, splits)
    proc = _stage(d)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = d / "data/processed/tokens"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eot"] == tok.eot
    for split in ("train", "val"):
        texts = [t for t, s in zip(stories, splits) if s == split]
        mapped = load_tokens(folder, split)
        assert isinstance(mapped.base.obj, mmap.mmap) and not mapped.flags.writeable  # read from the file
        assert np.array_equal(mapped, token_stream(tok, texts).numpy())
        assert meta["splits"][split]["docs"] == len(texts)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    (folder / "val.bin").write_bytes((folder / "val.bin").read_bytes()[:-2])
    with pytest.raises(PersonaError, match="val.bin.*expected.*tokenize_corpus"):
        load_tokens(folder, "val")


def test_without_val_documents_val_is_the_first_train_document(tmp_path, tok, stories):
    d = _project(tmp_path, tok, stories[:30], ["train"] * 30)
    assert _stage(d).returncode == 0
    folder = d / "data/processed/tokens"
    assert np.array_equal(load_tokens(folder, "val"), token_stream(tok, stories[:1]).numpy())
    assert json.loads((folder / "meta.json").read_text())["splits"]["val"]["from_train"] is True


def test_a_missing_folder_names_the_stage(tmp_path):
    with pytest.raises(PersonaError, match="dvc repro tokenize_corpus"):
        load_tokens(tmp_path, "train")
