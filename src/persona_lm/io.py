"""Atomic file writing and tolerant readers.

Every output is written to a temporary file beside its target and renamed into place, so an interrupted
stage leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from persona_lm.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it replaces `path` (a folder) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet(path: str | Path, df) -> None:
    """Write a polars DataFrame atomically; parquet statistics make downstream scans cheap."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression="zstd", statistics=True)


class ParquetRows:
    """Rows appended in order to one parquet file at `path` (a temp path: atomic_path, atomic_dir), `group_bytes` of
    text at a time: memory holds one row group, never the file. Row groups close at the first row that reaches
    `group_bytes` (counted over every string column), so the file's bytes depend on its rows alone, not on how
    the caller batched them. `close()` (also on leaving the `with` block) writes what is pending and closes it.

    `schema`: polars schema of the rows ({name: dtype}). Raises whatever pyarrow raises on a full disk."""

    def __init__(self, path: str | Path, schema: dict, group_bytes: int = 32 << 20):
        import polars as pl

        self.path, self.schema, self.group_bytes = Path(path), schema, group_bytes
        self.pending: list = []
        self.pending_bytes = 0
        self._writer = None
        self._closed = False
        self._strings = [k for k, v in schema.items() if v == pl.String]

    def write(self, frame) -> None:
        """Append a polars DataFrame with this writer's columns."""
        import polars as pl

        frame = frame.select(list(self.schema)).cast(self.schema)
        sizes = frame.select(pl.sum_horizontal(pl.col(c).str.len_bytes().fill_null(0) for c in self._strings)
                             if self._strings else pl.lit(0, dtype=pl.UInt32)).to_series().cast(pl.Int64)
        start = 0
        for i, cum in enumerate(sizes.cum_sum().to_list()):
            if self.pending_bytes + cum >= self.group_bytes:  # row i closes the group
                self.pending.append(frame.slice(start, i + 1 - start))
                self._flush()
                start, self.pending_bytes = i + 1, -cum
        if start < frame.height:
            self.pending.append(frame.slice(start))
        self.pending_bytes += int(sizes.sum() or 0)

    def _flush(self) -> None:
        import polars as pl
        import pyarrow.parquet as pq

        if not self.pending:
            return
        table = pl.concat(self.pending, rechunk=True).to_arrow()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd", write_statistics=True)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.pending, self.pending_bytes = [], 0

    def close(self) -> Path:
        """Write what is pending and close the file (an empty file with the schema when no rows came)."""
        import polars as pl

        if not self._closed:
            self._flush()
            if self._writer is None:
                pl.DataFrame(schema=self.schema).write_parquet(self.path, compression="zstd")
            else:
                self._writer.close()
            self._closed = True
        return self.path

    def __enter__(self) -> "ParquetRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_text(path: str | Path) -> str:
    """Read UTF-8 text (BOM tolerated); binary or non-UTF-8 files raise InputError naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, expected a file") from None
    if b"\x00" in data[:8192]:
        raise InputError(path, "binary data (NUL bytes), expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(path, f"not valid UTF-8 (byte 0x{data[e.start]:02x})", line=line) from None


def read_jsonl(path: str | Path, skips=None) -> Iterator[tuple[int, Any]]:
    """Yield (line number, object). A broken line is a counted skip when `skips` is given, else an error."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            if skips is None:
                raise InputError(path, f"invalid JSON: {e.msg}", line=lineno) from None
            skips.add(f"invalid JSON line ({e.msg})", f"{path}:{lineno}")


def read_json(path: str | Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
