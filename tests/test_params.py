"""params.yaml is validated before any work, with one line naming the offending key."""

import subprocess
import sys

import pytest
import yaml

from persona_lm.errors import ParamsError
from persona_lm.params import Filter, Params, load_params, parse_params


def test_repo_params_are_the_schema_defaults(root):
    assert load_params(root / "params.yaml") == Params()


@pytest.mark.parametrize("data, message", [
    ({"filter": {"min_words": -3}}, "params.yaml: filter.min_words: must be >= 0 (got -3)"),
    ({"filter": {"min_word": 3}}, "params.yaml: filter.min_word: unknown key"),
    ({"seed": "x"}, "params.yaml: seed: must be an integer"),
    ({"corpus": {"sources": [{"kind": "ftp", "path": "x"}]}}, "params.yaml: corpus.sources[0]: unknown kind"),
    ({"corpus": {"sources": [{"kind": "http", "url": "http://x", "sha256": "zz"}]}},
     "params.yaml: corpus.sources[0].sha256: must match"),
    ({"messages": {"exports": [{"path": "a.txt"}]}}, "params.yaml: messages.exports[0].me: required key is missing"),
    ({"messages": {"exports": [{"path": "a", "me": "x", "format": "icq"}]}},
     "params.yaml: messages.exports[0].format: must be one of"),
    ({"persona": {"emotions": ["joy", "joy", "neutral"]}}, "params.yaml: persona.emotions: labels must be unique"),
    ({"filter": {"min_words": 10, "max_words": 5}}, "params.yaml: filter.min_words: must be <= max_words"),
    ({"filter": {"engine": "spark"}}, "params.yaml: filter.engine: must be one of"),
    ({"filter": {"engine": "dask", "workers": 0}}, "params.yaml: filter.workers: must be >= 1 (got 0)"),
    ({"filter": {"engine": "dask", "scheduler": "node1"}},
     "params.yaml: filter.scheduler: must be an address like tcp://host:port (got 'node1')"),
    ({"filter": {"scheduler": "tcp://node1:8786"}}, "params.yaml: filter.scheduler: is only used with engine: dask"),
    ({"sharegpt": {"weights": {"templates": -1}}}, "params.yaml: sharegpt.weights.templates: must be >= 0"),
    ({"weight_memory": {"r": 0}}, "params.yaml: weight_memory.r: must be >= 1 (got 0)"),
    ({"weight_memory": {"replay_share": 1.0}}, "params.yaml: weight_memory.replay_share: must be < 1.0 (got 1.0)"),
    ({"weight_memory": {"ewc_lamda": 1}}, "params.yaml: weight_memory.ewc_lamda: unknown key"),
])
def test_bad_params_name_the_key(data, message):
    with pytest.raises(ParamsError) as e:
        parse_params(data)
    assert str(e.value).splitlines()[0].startswith(message)


def test_where_filter_runs_is_not_part_of_its_output_params():
    assert Filter(engine="dask", scheduler="tcp://10.0.0.1:8786", workers=8).output_params() == Filter().output_params()
    assert Filter(shard_mb=1).output_params() != Filter().output_params()


def test_yaml_errors_are_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("filter: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(p)
    p.write_text("- a list\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(p)


def test_stage_fails_before_work_on_bad_params(root, tmp_path):
    """A stage run with a bad params.yaml exits 1 with the one-line message and writes nothing."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["filter"]["min_words"] = -3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(root / "stages" / "expand_templates.py")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "params.yaml: filter.min_words: must be >= 0 (got -3)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]


def test_a_terminated_stage_leaves_no_temp_file(tmp_path):
    """SIGTERM (kill, timeout, Slurm) inside an atomic write: the stage ends as on Ctrl-C, with no temp file left."""
    (tmp_path / "params.yaml").write_text("{}\n")
    code = ("import os, signal\nfrom persona_lm import stage\nfrom persona_lm.io import atomic_path\n"
            "def main(p):\n    with atomic_path('out.txt') as tmp:\n        tmp.write_text('half')\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n        tmp.write_text('all')\n"
            "stage.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 130 and "interrupted; it wrote no partial output" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
