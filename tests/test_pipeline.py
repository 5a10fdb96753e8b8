"""The DVC pipeline itself, on a copy of the repo: the data stages run offline on the embedded sample, a
second `dvc repro` has nothing to do, and a param change reruns exactly the stages that read it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = ["download_corpus", "filter_corpus", "fetch_transcripts", "process_transcripts", "expand_templates",
               "import_messages", "build_sharegpt"]


def dvc(cwd, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repo holding the tracked files of this checkout (what a fresh clone has)."""
    d = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, d / f)
    subprocess.run(["git", "init", "-q"], cwd=d, check=True)
    subprocess.run(["git", "add", "-A"], cwd=d, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=d, check=True)
    return d


def test_data_stages_run_then_nothing_to_do(repo):
    proc = dvc(repo, "repro", "filter_corpus", "build_sharegpt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in proc.stdout
    for out in ("data/interim/corpus.parquet", "data/processed/sharegpt/train.jsonl", "reports/filter.json",
                "reports/validation/sharegpt.json"):
        assert (repo / out).is_file(), out
    again = dvc(repo, "repro", "filter_corpus", "build_sharegpt")
    assert again.returncode == 0 and "Running stage" not in again.stdout
    assert "didn't change, skipping" in again.stdout or "Data and pipelines are up to date" in again.stdout


def test_param_change_reruns_only_dependants(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["youtube"]["local_dirs"] = []
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(repo, "status", "--with-deps", "filter_corpus", "build_sharegpt")
    changed = {line.rstrip(":").strip() for line in status.stdout.splitlines() if line.endswith(":") and not line.startswith("\t")}
    assert changed == {"process_transcripts"}, status.stdout
    proc = dvc(repo, "repro", "build_sharegpt")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = [s for s in DATA_STAGES if f"Running stage '{s}'" in proc.stdout]
    assert ran == ["process_transcripts", "build_sharegpt"]
