"""download_corpus: local files, HTTP and the Hugging Face Hub, each against real files and loopback servers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import free_port, serve
from persona_lm.data.sources import load_corpus
from persona_lm.errors import InputError, PersonaError
from persona_lm.params import HfSource, HttpSource, LocalSource

STAGE = Path(__file__).resolve().parents[1] / "stages" / "download_corpus.py"


def files(routes: dict[str, bytes]):
    return lambda method, path, headers: (200, {}, routes[path]) if path in routes else (404, {}, b"not found")


def local(path, **kw) -> LocalSource:
    return LocalSource(kind="local", path=str(path), **kw)


def write_parquet(path: Path, texts, column="text"):
    pl.DataFrame({column: texts, "n": list(range(len(texts)))}).write_parquet(path)


@pytest.fixture
def no_network(monkeypatch):
    """Any outgoing connection fails the test: a guard on the stdlib socket, not on our code."""
    def refuse(self, address):
        raise AssertionError(f"network connection attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


# ------------------------------------------------------------------------------------------------ local

def test_tinystories_head_reads_every_story(shared_data, tmp_path, no_network):
    docs = load_corpus([local(shared_data / "corpus" / "tinystories_train_head.txt")], tmp_path)
    assert len(docs.texts) == 2316
    assert docs.texts[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert docs.texts[-1].endswith("She hoped to see the dolphin again.")
    assert not any("<|endoftext|>" in t for t in docs.texts)
    assert len(set(docs.ids)) == len(docs.ids)
    frame = docs.frame()
    assert frame.columns == ["id", "source", "text"] and frame.height == 2316


def test_folder_reads_all_formats_in_sorted_order(tmp_path, no_network):
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "b.txt").write_text("A whole story in one file.\n\nSecond paragraph of it.\n")
    (root / "a" / "x.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "id": 7}\n')
    write_parquet(root / "c.parquet", ["parquet one", "parquet two"])
    (root / ".cache" / "z.txt").write_text("hidden")
    (root / "notes.md").write_text("not a corpus file")

    docs = load_corpus([local(root)], tmp_path)
    assert docs.texts == ["json one", "json two", "A whole story in one file.\n\nSecond paragraph of it.",
                          "parquet one", "parquet two"]
    assert docs.sources == [f"local:{root}"] * 5
    assert docs.ids == ["0-0", "0-1", "0-2", "0-3", "0-4"]
    manifest = docs.manifest[0]
    assert [Path(f["file"]).relative_to(root).as_posix() for f in manifest["files"]] == [
        "a/x.jsonl", "b.txt", "c.parquet"]
    assert [f["docs"] for f in manifest["files"]] == [2, 1, 2]
    assert manifest["files"][1]["sha256"] == hashlib.sha256((root / "b.txt").read_bytes()).hexdigest()


def test_txt_separators_inline_and_crlf(tmp_path):
    f = tmp_path / "s.txt"
    f.write_bytes(b"\xef\xbb\xbfone<|endoftext|>two\r\nlines\r\n<|endoftext|>\r\n\r\n<|endoftext|>three")
    assert load_corpus([local(f)], tmp_path).texts == ["one", "two\nlines", "three"]


def test_malformed_files_are_counted_skips_with_file_and_line(tmp_path, caplog):
    root = tmp_path / "in"
    root.mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "garbage.txt").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes(
        "good story<|endoftext|>\ncaf\xe9 au lait\n<|endoftext|>\nanother good one".encode("latin-1"))
    (root / "rows.jsonl").write_text('{"text": "ok one"}\n{"text": "broken\n[1, 2]\n{"body": "x"}\n{"text": "  "}\n'
                                     '{"text": "ok two"}\n')
    with caplog.at_level(logging.WARNING):
        docs = load_corpus([local(root)], tmp_path)
    assert docs.texts == ["good story", "another good one", "ok one", "ok two"]
    assert docs.manifest[0]["skipped"] == {
        "binary data, not text": 1, "empty file": 1, "empty text": 1, "invalid JSON line": 1,
        "no string 'text' field": 2, "not valid UTF-8": 1,
    }
    assert f"{root / 'rows.jsonl'}:2" in caplog.text
    assert f"{root / 'latin1.txt'}:2" in caplog.text


def test_caps_stop_the_source_early(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("<|endoftext|>".join(f"story {i} " + "x" * 10 for i in range(10)))  # 18-19 bytes each
    assert len(load_corpus([local(f, max_docs=3)], tmp_path).texts) == 3
    docs = load_corpus([local(f, max_bytes=60)], tmp_path)
    assert docs.texts == ["story 0 xxxxxxxxxx", "story 1 xxxxxxxxxx", "story 2 xxxxxxxxxx"]  # 54 bytes; a 4th: 72
    assert docs.manifest[0]["capped"] and docs.manifest[0]["bytes"] == 54
    with pytest.raises(PersonaError, match=r"corpus.sources\[0\].*first document is larger than max_bytes"):
        load_corpus([local(f, max_bytes=5)], tmp_path)


def test_two_sources_have_distinct_ids(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("same text")
    b.write_text('{"body": "same text"}\n')
    docs = load_corpus([local(a), local(b, text_column="body")], tmp_path)
    assert docs.ids == ["0-0", "1-0"] and docs.texts == ["same text", "same text"]


def test_unusable_local_source_is_one_error(tmp_path):
    with pytest.raises(PersonaError, match=r"^corpus.sources\[0\] \(local .*nope\): not found$"):
        load_corpus([local(tmp_path / "nope")], tmp_path)
    (tmp_path / "x.md").write_text("x")
    with pytest.raises(PersonaError, match=r"no .txt, .jsonl or .parquet files in the folder"):
        load_corpus([local(tmp_path)], tmp_path)
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(PersonaError, match=r"e.txt\): no documents read \(skipped: 1 × empty file\)"):
        load_corpus([local(tmp_path / "e.txt")], tmp_path)


def test_parquet_without_text_column_names_the_columns(tmp_path):
    f = tmp_path / "t.parquet"
    write_parquet(f, ["a"], column="content")
    with pytest.raises(InputError, match=r"t.parquet: no column 'text' \(columns: content, n\)"):
        load_corpus([local(f)], tmp_path)
    assert load_corpus([local(f, text_column="content")], tmp_path).texts == ["a"]


# ------------------------------------------------------------------------------------------------- http

STORIES = b"First story.\n<|endoftext|>\nSecond story.\n"


def http_source(url, **kw) -> HttpSource:
    return HttpSource(kind="http", url=url, timeout_s=5, **kw)


def test_http_download_and_pinned_sha256_reuse(tmp_path):
    sha = hashlib.sha256(STORIES).hexdigest()
    with serve(files({"/data/stories.txt": STORIES})) as (base, seen):
        docs = load_corpus([http_source(f"{base}/data/stories.txt", sha256=sha)], tmp_path / "dl")
        assert docs.texts == ["First story.", "Second story."]
        assert docs.sources == [f"http:{base}/data/stories.txt"] * 2
        assert docs.manifest[0]["files"][0]["sha256"] == sha
        again = load_corpus([http_source(f"{base}/data/stories.txt", sha256=sha)], tmp_path / "dl")
    assert again.texts == docs.texts
    assert seen == [("GET", "/data/stories.txt")]  # the second run used the verified download
    assert [p.name.endswith("-stories.txt") for p in (tmp_path / "dl").iterdir()] == [True]


def test_http_format_is_sniffed_without_a_suffix(tmp_path):
    pq = tmp_path / "t.parquet"
    write_parquet(pq, ["from parquet"])
    routes = {"/a": pq.read_bytes(), "/b": b'{"text": "from jsonl"}\n', "/c": b"plain"}
    with serve(files(routes)) as (base, _):
        docs = load_corpus([http_source(f"{base}/a"), http_source(f"{base}/b"), http_source(f"{base}/c")], tmp_path)
    assert docs.texts == ["from parquet", "from jsonl", "plain"]
    assert [s["files"][0]["format"] for s in docs.manifest] == ["parquet", "jsonl", "txt"]


def test_http_sha256_mismatch_is_an_error_and_keeps_no_file(tmp_path):
    with serve(files({"/s.txt": STORIES})) as (base, _):
        with pytest.raises(PersonaError, match=r"corpus.sources\[0\] \(http .*/s.txt\): sha256 mismatch"):
            load_corpus([http_source(f"{base}/s.txt", sha256="0" * 64)], tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []


def test_http_404_is_an_error_naming_the_source(tmp_path):
    (tmp_path / "s.txt").write_text("a local story")
    with serve(files({})) as (base, _):
        with pytest.raises(PersonaError) as err:
            load_corpus([local(tmp_path / "s.txt"), http_source(f"{base}/gone.txt")], tmp_path / "dl")
    assert str(err.value) == (f"corpus.sources[1] (http {base}/gone.txt): HTTP 404 Not Found — download it "
                              "yourself and use {kind: local, path: ...} instead")


def ranged(served: dict, drops: list[int], ranges: list[str | None]):
    """A server of `served["data"]` that honours byte ranges as RFC 9110 says (If-Range must match
    `served["etag"]`); the first len(drops) responses stop after that many bytes of body, as a dropped
    connection does. Records each request's Range header."""
    def handle(method, path, headers):
        data, etag = served["data"], served["etag"]
        ranges.append(headers.get("Range"))
        start = 0
        if headers.get("Range") and headers.get("If-Range") in (None, etag):
            start = int(headers["Range"].removeprefix("bytes=").rstrip("-"))
        out = {"Content-Length": str(len(data) - start), **({"ETag": etag} if etag else {})}
        if start:
            out["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        return (206 if start else 200), out, (body[:drops.pop(0)] if drops else body)
    return handle


BIG = b"".join(b"Story %d: the robot counted the stars again.\n<|endoftext|>\n" % i for i in range(60000))


@pytest.mark.parametrize("etag, pinned", [('"v1"', False), (None, True)])
def test_an_interrupted_http_download_resumes_where_it_stopped(tmp_path, etag, pinned):
    sha = hashlib.sha256(BIG).hexdigest() if pinned else None
    ranges: list[str | None] = []
    with serve(ranged({"data": BIG, "etag": etag}, [1_500_000], ranges)) as (base, _):
        src = http_source(f"{base}/big.txt", sha256=sha)
        with pytest.raises(PersonaError, match=r"corpus.sources\[0\] .*bytes received are kept and the next run "
                                               r"resumes"):
            load_corpus([src], tmp_path / "dl")
        part = next((tmp_path / "dl").glob(".*.part"))
        received = part.stat().st_size
        assert 0 < received <= 1_500_000
        docs = load_corpus([src], tmp_path / "dl")
    assert ranges == [None, f"bytes={received}-"]
    assert len(docs.texts) == 60000 and docs.texts[-1] == "Story 59999: the robot counted the stars again."
    assert docs.manifest[0]["files"][0]["sha256"] == hashlib.sha256(BIG).hexdigest()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == [part.name.removeprefix(".").removesuffix(".part")]


def test_a_part_is_fetched_whole_when_the_file_changed_or_cannot_be_checked(tmp_path):
    ranges: list[str | None] = []
    served = {"data": BIG, "etag": '"v1"'}
    with serve(ranged(served, [1_000_000], ranges)) as (base, _):
        with pytest.raises(PersonaError):
            load_corpus([http_source(f"{base}/big.txt")], tmp_path / "dl")
        served.update(data=BIG.replace(b"robot", b"rabbit"), etag='"v2"')
        docs = load_corpus([http_source(f"{base}/big.txt")], tmp_path / "dl")
    assert ranges[1].startswith("bytes=")  # it asked for the rest; If-Range "v1" did not match, so it got all
    assert docs.texts[0] == "Story 0: the rabbit counted the stars again." and len(docs.texts) == 60000

    ranges.clear()
    served.update(data=BIG, etag=None)
    with serve(ranged(served, [1_000_000], ranges)) as (base, _):
        with pytest.raises(PersonaError):
            load_corpus([http_source(f"{base}/big.txt")], tmp_path / "dl2")
        docs = load_corpus([http_source(f"{base}/big.txt")], tmp_path / "dl2")
    assert ranges == [None, None] and len(docs.texts) == 60000  # no validator, no pinned sha256: no splice


def test_http_refused_connection_is_an_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x.txt"
    with pytest.raises(PersonaError, match=rf"corpus.sources\[0\] \(http {url}\): connection refused — "):
        load_corpus([http_source(url)], tmp_path)


# --------------------------------------------------------------------------------------------------- hf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub(repo: str, repo_files: dict[str, bytes]):
    """Enough of the Hub HTTP API for huggingface_hub's real client: the tree listing and `resolve` downloads."""
    info_prefix = f"/api/datasets/{repo}/revision/"
    tree_prefix = f"/api/datasets/{repo}/tree/"
    resolve_prefix = f"/datasets/{repo}/resolve/"

    def handle(method, path, headers):
        path = path.split("?")[0]
        if path.startswith(info_prefix):
            return 200, {"Content-Type": "application/json"}, json.dumps({"id": repo, "sha": COMMIT}).encode()
        if path.startswith(tree_prefix):
            listing = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                       for name, data in repo_files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(listing).encode()
        if path.startswith(resolve_prefix):
            name = path[len(resolve_prefix):].split("/", 1)[1]
            if name in repo_files:
                data = repo_files[name]
                return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data
            return 404, {"X-Repo-Commit": COMMIT, "X-Error-Code": "EntryNotFound"}, b"{}"
        return 404, {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, b'{"error": "not found"}'

    return handle


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    shard0, shard1 = tmp_path / "s0.parquet", tmp_path / "s1.parquet"
    write_parquet(shard0, ["hub story one", "hub story two"])
    write_parquet(shard1, ["hub story three"])
    return {"README.md": b"# stories", "data/train-00000-of-00002.parquet": shard0.read_bytes(),
            "data/train-00001-of-00002.parquet": shard1.read_bytes(), "data/notes.txt": b"not matched"}


def hf(endpoint, **kw) -> HfSource:
    return HfSource(kind="hf", repo="acme/stories", pattern="data/*.parquet", endpoint=endpoint, **kw)


def test_hf_lists_and_downloads_through_huggingface_hub(tmp_path, hub_repo):
    with serve(hub("acme/stories", hub_repo)) as (base, seen):
        docs = load_corpus([hf(base)], tmp_path, hf_cache_dir=tmp_path / "hub")
    assert docs.texts == ["hub story one", "hub story two", "hub story three"]
    assert docs.sources == ["hf:acme/stories"] * 3
    assert [f["file"] for f in docs.manifest[0]["files"]] == [
        f"hf://datasets/acme/stories@{COMMIT}/data/train-0000{n}-of-00002.parquet" for n in (0, 1)]
    assert all("notes.txt" not in path and "README" not in path for _, path in seen)


def test_hf_cap_stops_downloading_further_files(tmp_path, hub_repo):
    with serve(hub("acme/stories", hub_repo)) as (base, seen):
        docs = load_corpus([hf(base, max_docs=2)], tmp_path, hf_cache_dir=tmp_path / "hub")
    assert docs.texts == ["hub story one", "hub story two"] and docs.manifest[0]["capped"]
    assert not any("train-00001" in path for _, path in seen)


def test_hf_unknown_repo_is_one_error(tmp_path, hub_repo):
    with serve(hub("acme/stories", hub_repo)) as (base, _):
        source = HfSource(kind="hf", repo="acme/missing", endpoint=base)
        with pytest.raises(PersonaError, match=r"corpus.sources\[0\] \(hf acme/missing\): dataset repository not found"):
            load_corpus([source], tmp_path, hf_cache_dir=tmp_path / "hub")


def test_hf_unreachable_hub_is_one_error(tmp_path, hub_repo):
    source = HfSource(kind="hf", repo="acme/stories", endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PersonaError, match=r"^corpus.sources\[0\] \(hf acme/stories\): .*Connection refused — "):
        load_corpus([source], tmp_path, hf_cache_dir=tmp_path / "hub")


# ------------------------------------------------------------------------------------------------ stage

def run_stage(project: Path, sources: list[dict], **env) -> subprocess.CompletedProcess:
    (project / "params.yaml").write_text(yaml.safe_dump({"corpus": {"sources": sources}}))
    return subprocess.run([sys.executable, str(STAGE)], cwd=project, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HOME": str(project / "hf"), **env})


def test_stage_offline_reads_the_hub_cache_and_writes_outputs(tmp_path, hub_repo):
    cache = tmp_path / "hub"
    with serve(hub("acme/stories", hub_repo)) as (base, _):
        load_corpus([hf(base)], tmp_path, hf_cache_dir=cache)
    sources = [hf(base).model_dump(exclude_none=True), {"kind": "local", "path": "s.txt"}]
    (tmp_path / "s.txt").write_text("a local story")
    # The server is gone: the stage can only succeed from the cache, as HF_HUB_OFFLINE asks.
    proc = run_stage(tmp_path, sources, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr
    frame = pl.read_parquet(tmp_path / "data/raw/corpus/corpus.parquet")
    assert frame["text"].to_list() == ["hub story one", "hub story two", "hub story three", "a local story"]
    assert frame["id"].to_list() == ["0-0", "0-1", "0-2", "1-0"]
    manifest = json.loads((tmp_path / "data/raw/corpus/manifest.json").read_text())
    assert manifest["docs"] == 4 and [s["docs"] for s in manifest["sources"]] == [3, 1]
    assert manifest["sources"][0]["files"][0]["sha256"] == hashlib.sha256(
        hub_repo["data/train-00000-of-00002.parquet"]).hexdigest()


def test_stage_failure_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "s.txt").write_text("a local story")
    url = f"http://127.0.0.1:{free_port()}/x.txt"
    proc = run_stage(tmp_path, [{"kind": "local", "path": "s.txt"}, {"kind": "http", "url": url}])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: corpus.sources[1] (http {url}): connection refused — download it yourself and use "
        "{kind: local, path: ...} instead")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data/raw/corpus").exists()
