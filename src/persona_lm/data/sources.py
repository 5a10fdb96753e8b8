"""Corpus sources: local files and folders, HTTP downloads and Hugging Face dataset repos, read into one table.

Every source resolves to a sorted list of files, and every file to documents:
- `.txt`: one document per file, unless the file contains `<|endoftext|>` (the GPT-2 / TinyStories convention),
  which then separates documents. A folder of stories, one per file, and a TinyStories dump both read naturally.
- `.jsonl`: one document per line, taken from the `text_column` field.
- `.parquet`: one document per row of the `text_column` column.
HTTP and Hub files without one of these suffixes are recognised by their first bytes.

Inputs are read as streams, so `max_docs` / `max_bytes` stop a source early (a Hub source stops downloading
further files). A problem inside a file (a broken JSON line, an empty or binary file, text that is not UTF-8)
is a counted skip logged with `file:line`; a problem with the source itself (not found, unreachable, wrong
checksum, no documents at all) is one error naming `corpus.sources[i]`, raised before anything is written.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from persona_lm.errors import InputError, PersonaError, Skips
from persona_lm.io import write_json
from persona_lm.params import HfSource, HttpSource, LocalSource

SEPARATOR = "<|endoftext|>"
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
CHUNK = 1 << 20
NETWORK_HINT = " — download it yourself and use {kind: local, path: ...} instead"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- file readers

def detect_format(path: Path, name: str | None = None) -> str:
    """Format from the suffix of `name` (a URL or repo path) or of `path`; else sniffed from the first bytes."""
    suffix = Path(name or path.name).suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    return "jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "txt"


def iter_docs(path: Path, fmt: str, text_column: str, skips: Skips, where: str | None = None) -> Iterator[str]:
    """Documents of one file; `where` is how the file is named in logs (its URL or repo path)."""
    where = where or str(path)
    if path.stat().st_size == 0:
        skips.add("empty file", where)
        return
    if fmt == "parquet":
        yield from _parquet_docs(path, text_column, skips, where)
        return
    with open(path, "rb") as f:
        if b"\x00" in f.read(8192):
            skips.add("binary data, not text", where)
            return
    yield from (_txt_docs if fmt == "txt" else _jsonl_docs)(path, text_column, skips, where)


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) with CRLF folded to LF; text is None for a line that is not valid UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, None
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")
            yield n, line.replace("\r\n", "\n")


def _txt_docs(path: Path, _column: str, skips: Skips, where: str) -> Iterator[str]:
    """A document with a non-UTF-8 line is skipped whole: half a story is worse than none."""
    parts: list[str] = []
    bad_line: int | None = None

    def finish() -> str | None:
        text = "".join(parts).strip()
        if bad_line is not None:
            skips.add("not valid UTF-8", f"{where}:{bad_line}")
            return None
        return text or None

    for n, line in _lines(path):
        if line is None:
            bad_line = bad_line or n
            continue
        *ends, rest = line.split(SEPARATOR)
        for piece in ends:
            parts.append(piece)
            if (text := finish()) is not None:
                yield text
            parts, bad_line = [], None
        parts.append(rest)
    if (text := finish()) is not None:
        yield text


def _jsonl_docs(path: Path, column: str, skips: Skips, where: str) -> Iterator[str]:
    for n, line in _lines(path):
        if line is None:
            skips.add("not valid UTF-8", f"{where}:{n}")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skips.add("invalid JSON line", f"{where}:{n}")
            continue
        text = obj.get(column) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            skips.add(f"no string {column!r} field", f"{where}:{n}")
        elif not text.strip():
            skips.add("empty text", f"{where}:{n}")
        else:
            yield text.strip()


def _parquet_docs(path: Path, column: str, skips: Skips, where: str) -> Iterator[str]:
    """A missing or non-string column is the user's `text_column` to fix, so it is an error, not a skip."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # its read-ahead cache holds every row group read
    except (pa.ArrowException, OSError):
        skips.add("not a readable parquet file", where)
        return
    schema = pf.schema_arrow
    if column not in schema.names:
        raise InputError(where, f"no column {column!r} (columns: {', '.join(schema.names)}); set text_column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise InputError(where, f"column {column!r} holds {kind}, expected strings")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None or not text.strip():
                    skips.add("empty text", f"{where} row {row}")
                else:
                    yield text.strip()
    except (pa.ArrowException, OSError):
        skips.add("unreadable parquet data (rest of file skipped)", f"{where} row {row + 1}")


# ------------------------------------------------------------------------------------------------ sources

def location(src) -> str:
    return getattr(src, {"local": "path", "http": "url", "hf": "repo"}[src.kind])


def describe(i: int, src) -> str:
    """How errors name a source: `corpus.sources[1] (http https://...)`."""
    return f"corpus.sources[{i}] ({src.kind} {location(src)})"


@dataclass
class File:
    origin: str  # the file's path, URL or hf:// address, as the manifest and the logs name it
    path: Path
    format: str
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def local_files(src: LocalSource, where: str) -> Iterator[File]:
    """A file as given, or a folder's .txt/.jsonl/.parquet files (recursive, hidden ones ignored, sorted)."""
    root = Path(src.path)
    if root.is_file():
        found = [root]
    elif root.is_dir():
        found = sorted(
            (p for p in root.rglob("*") if p.suffix.lower() in FORMATS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not found:
            raise PersonaError(f"{where}: no .txt, .jsonl or .parquet files in the folder")
    else:
        raise PersonaError(f"{where}: not found")
    for p in found:
        yield File(p.as_posix(), p, detect_format(p), sha256_file(p))


def _network_reason(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.gaierror):
        return "host not found"
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__


def download(url: str, dest: Path, *, where: str, sha256: str | None = None, timeout: float = 60.0) -> str:
    """Stream `url` into `dest`, verify `sha256` when given; return the file's sha256.

    A pinned checksum that matches a file already at `dest` skips the download, so re-runs work offline. An
    interrupted transfer keeps what it received (`.<name>.part`) and the next run asks for the rest with an HTTP
    Range request (RFC 9110 §14), guarded by If-Range with the server's ETag or Last-Modified so a file that
    changed in between is fetched whole instead of spliced. A part with no validator resumes only when the
    checksum is pinned, which then vouches for the result. `dest` appears only when complete (and verified).
    Raises PersonaError naming `where` for HTTP errors, network failures and a checksum mismatch.
    """
    if sha256 and dest.is_file() and sha256_file(dest) == sha256.lower():
        log.info("%s: using %s (sha256 matches)", where, dest)
        return sha256.lower()
    part = dest.with_name(f".{dest.name}.part")
    state = part.with_name(part.name + ".json")  # the url and validator the part was fetched with
    kept = json.loads(state.read_text()) if state.is_file() and part.is_file() else {}
    offset = part.stat().st_size if kept.get("url") == url and (kept.get("validator") or sha256) else 0
    headers = {"User-Agent": "persona-lm"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if kept.get("validator"):
            headers["If-Range"] = kept["validator"]
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            resumed = offset and resp.status == 206 and \
                resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
            if resumed:
                log.info("%s: resuming %s at byte %d", where, dest.name, offset)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_json(state, {"url": url, "validator": resp.headers.get("ETag") or resp.headers.get("Last-Modified")})
            expected, got = resp.headers.get("Content-Length"), 0
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
            if expected is not None and got < int(expected):  # http.client returns a short body without a word
                raise http.client.IncompleteRead(b"", int(expected) - got)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is not a prefix of what the server has now: start afresh
            part.unlink()
            return download(url, dest, where=where, sha256=sha256, timeout=timeout)
        raise PersonaError(f"{where}: HTTP {e.code} {e.reason}{NETWORK_HINT}") from None
    except urllib.error.URLError as e:
        raise PersonaError(f"{where}: {_network_reason(e.reason)}{NETWORK_HINT}") from None
    except (ConnectionError, TimeoutError, http.client.HTTPException) as e:  # dropped or stalled mid-stream
        got = f"; the {part.stat().st_size} bytes received are kept and the next run resumes" if part.is_file() else ""
        raise PersonaError(f"{where}: {_network_reason(e)}{got}{NETWORK_HINT}") from None
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        part.unlink()
        state.unlink(missing_ok=True)
        raise PersonaError(
            f"{where}: sha256 mismatch (expected {sha256.lower()}, got {digest}) — "
            "the file changed or the checksum is wrong"
        )
    part.replace(dest)
    state.unlink(missing_ok=True)
    return digest


def http_files(src: HttpSource, where: str, download_dir: Path) -> Iterator[File]:
    name = Path(urllib.parse.urlparse(src.url).path).name or "download"
    dest = download_dir / f"{hashlib.sha256(src.url.encode()).hexdigest()[:12]}-{name}"
    digest = download(src.url, dest, where=where, sha256=src.sha256, timeout=src.timeout_s)
    fmt = detect_format(dest, name) if src.format == "auto" else src.format
    yield File(src.url, dest, fmt, digest)


def matches(name: str, pattern: str) -> bool:
    """fnmatch over repo paths (`*` crosses folders, as in huggingface_hub); a leading `**/` may match none."""
    return fnmatch.fnmatchcase(name, pattern) or (
        pattern.startswith("**/") and fnmatch.fnmatchcase(name, pattern[3:])
    )


def _hub_reason(err: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(err, errors.RepositoryNotFoundError):
        return "dataset repository not found (private or gated ones need HF_TOKEN)"
    if isinstance(err, errors.RevisionNotFoundError):
        return "revision not found"
    if isinstance(err, errors.EntryNotFoundError):
        return "file not found in the repository"
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return "not in the local Hugging Face cache, and the Hub cannot be reached (HF_HUB_OFFLINE?)"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def hf_files(src: HfSource, where: str, cache_dir: Path | None = None) -> Iterator[File]:
    """Files of a Hub dataset repo matching `pattern`, downloaded one at a time as the reader asks for them.

    Downloads go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE unless `cache_dir` is given), so they are
    shared with other tools. With HF_HUB_OFFLINE=1 the files come from the cached snapshot of `revision`.
    huggingface_hub is imported here, not at module level, so runs without Hub sources never load it.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    repo, rev = src.repo, src.revision
    try:
        if constants.is_offline_mode():
            snapshot = Path(snapshot_download(repo, repo_type="dataset", revision=rev, cache_dir=cache_dir,
                                              local_files_only=True))
            names = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
        else:
            api = HfApi(endpoint=src.endpoint)
            api.dataset_info(repo, revision=rev)  # one plain request first: an unreachable Hub fails fast, unretried
            names = sorted(api.list_repo_files(repo, repo_type="dataset", revision=rev))
    except Exception as e:  # anything the Hub client raises becomes one line naming the source
        raise PersonaError(f"{where}: {_hub_reason(e)}{NETWORK_HINT}") from None
    names = [n for n in names if matches(n, src.pattern)]
    if not names:
        raise PersonaError(f"{where}: no files match pattern {src.pattern!r} at revision {rev!r}")
    for name in names:
        try:
            local = Path(hf_hub_download(repo, name, repo_type="dataset", revision=rev, cache_dir=cache_dir,
                                         endpoint=src.endpoint))
        except Exception as e:
            raise PersonaError(f"{where}: {name}: {_hub_reason(e)}{NETWORK_HINT}") from None
        commit = local.parents[name.count("/")].name  # the cache stores files as snapshots/<commit>/<name>
        fmt = detect_format(local, name)
        yield File(f"hf://datasets/{repo}@{commit}/{name}", local, fmt, sha256_file(local))


# ------------------------------------------------------------------------------------------------- corpus

@dataclass
class Budget:
    """A source's max_docs / max_bytes: documents are taken while both caps still hold, then the source stops."""

    max_docs: int | None
    max_bytes: int | None
    docs: int = 0
    bytes: int = 0

    def full(self) -> bool:
        return self.max_docs is not None and self.docs >= self.max_docs

    def take(self, text: str) -> bool:
        size = len(text.encode("utf-8"))
        if self.full() or (self.max_bytes is not None and self.bytes + size > self.max_bytes):
            return False
        self.docs += 1
        self.bytes += size
        return True


@dataclass
class Documents:
    """The documents read, in memory (tests, small corpora); ParquetDocuments streams them to a file instead."""

    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    manifest: list[dict] = field(default_factory=list)

    def add(self, doc_id: str, source: str, text: str) -> None:
        self.ids.append(doc_id)
        self.sources.append(source)
        self.texts.append(text)

    def frame(self):
        import polars as pl

        return pl.DataFrame({"id": self.ids, "source": self.sources, "text": self.texts},
                            schema={"id": pl.String, "source": pl.String, "text": pl.String})


class ParquetDocuments(Documents):
    """Documents appended to a parquet file (io.ParquetRows) as they are read: memory holds `batch` documents and
    one row group, never the corpus. `count` is how many were added; `progress(n_bytes)` is called per document."""

    def __init__(self, rows, batch: int = 4096, progress=lambda n_bytes: None):
        super().__init__()
        self.rows, self.batch, self.progress, self.count = rows, batch, progress, 0

    def add(self, doc_id: str, source: str, text: str) -> None:
        super().add(doc_id, source, text)
        self.count += 1
        self.progress(len(text.encode("utf-8")))
        if len(self.ids) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            self.rows.write(self.frame())
            self.ids, self.sources, self.texts = [], [], []


def source_files(src, where: str, download_dir: Path, hf_cache_dir: Path | None) -> Iterator[File]:
    if src.kind == "local":
        return local_files(src, where)
    if src.kind == "http":
        return http_files(src, where, download_dir)
    return hf_files(src, where, hf_cache_dir)


def load_corpus(sources: list, download_dir: Path, hf_cache_dir: Path | None = None,
                corpus: Documents | None = None) -> Documents:
    """Read every source in order into `corpus` (a new in-memory Documents by default; a ParquetDocuments
    streams them to disk) and its manifest. Ids are `<source index>-<document index>`: unique, and stable while
    the sources and their files stay the same. The `source` column is `<kind>:<path|url|repo>`, one value per
    source so downstream reports stay small; which file each document came from is in the manifest."""
    corpus = Documents() if corpus is None else corpus
    for i, src in enumerate(sources):
        where, label = describe(i, src), f"{src.kind}:{location(src)}"
        column = src.text_column
        skips, budget, files, capped = Skips(f"document of {where}"), Budget(src.max_docs, src.max_bytes), [], False
        for f in source_files(src, where, download_dir, hf_cache_dir):
            docs_before = budget.docs
            for text in iter_docs(f.path, f.format, column, skips, f.origin):
                if not budget.take(text):
                    capped = True
                    break
                corpus.add(f"{i}-{budget.docs - 1}", label, text)
            files.append({"file": f.origin, "format": f.format, "size": f.path.stat().st_size,
                          "sha256": f.sha256, "docs": budget.docs - docs_before})
            if capped or budget.full():  # decided before asking for the next file, so no further download
                capped = True
                break
        if budget.docs == 0 and capped:
            raise PersonaError(f"{where}: the first document is larger than max_bytes ({src.max_bytes})")
        if budget.docs == 0:
            skipped = ", ".join(f"{n} × {reason}" for reason, n in skips.as_dict().items())
            raise PersonaError(f"{where}: no documents read" + (f" (skipped: {skipped})" if skipped else ""))
        log.info("%s: %d documents, %d bytes from %d file(s)%s%s", where, budget.docs, budget.bytes, len(files),
                 ", capped" if capped else "", f", {skips.total} skipped" if skips.total else "")
        corpus.manifest.append({"source": f"corpus.sources[{i}]", **src.model_dump(exclude_none=True),
                                "docs": budget.docs, "bytes": budget.bytes, "capped": capped,
                                "skipped": skips.as_dict(), "files": files})
    return corpus
