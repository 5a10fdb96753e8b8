"""The DVC pipeline itself, on a copy of the repo: the data stages run offline on the embedded sample, a
second `dvc repro` has nothing to do, and a param change reruns exactly the stages that read it."""

import pytest
import yaml
from conftest import dvc, git_repo_copy

DATA_STAGES = ["download_corpus", "filter_corpus", "fetch_transcripts", "process_transcripts", "expand_templates",
               "import_messages", "build_sharegpt"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repo holding the tracked files of this checkout (what a fresh clone has)."""
    return git_repo_copy(tmp_path_factory.mktemp("repo"))


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
