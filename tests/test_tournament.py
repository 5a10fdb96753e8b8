"""persona-lm tournament: its config checks, and a real tournament of DVC experiments on a copy of the repo with
three tiny candidates (one of which diverges), two rounds, interrupted and resumed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import dvc, git_repo_copy

from persona_lm.errors import ParamsError
from persona_lm.tournament import (Config, Round, Run, State, TournamentError, check_params, failure_reason,
                                   hydra_value, load_config, survivors)

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


CONFIG = {"name": "t", "rounds": [{"steps": 5}, {"steps": 5}],
          "candidates": {"a": {"model.n_layer": 2}, "b": {"model.mlp": "swiglu"}}}


def test_config_refuses_what_would_make_it_unfair(tmp_path):
    for key, value in (("seed", 1), ("pretrain.batch_size", 8), ("model.block_size", 64), ("pretrain.stop_at", 3)):
        data = {**CONFIG, "candidates": {**CONFIG["candidates"], "c": {key: value}}}
        with pytest.raises(TournamentError, match=rf"candidates\.c\.{key}"):
            load_config(write_config(tmp_path / "t.yaml", data))
    with pytest.raises(TournamentError, match=r"candidates\.c\.eval\.top_k: a candidate overrides"):
        load_config(write_config(tmp_path / "t.yaml", {**CONFIG, "candidates": {"c": {"eval.top_k": 3}, "d": {}}}))
    with pytest.raises(TournamentError, match=r"rounds"):
        load_config(write_config(tmp_path / "t.yaml", {**CONFIG, "rounds": []}))
    with pytest.raises(TournamentError, match=r"candidates\.bad name"):
        load_config(write_config(tmp_path / "t.yaml", {**CONFIG, "candidates": {"bad name": {}, "d": {}}}))


def test_a_wrong_override_fails_before_any_run_naming_candidate_and_key(tmp_path):
    cfg = load_config(write_config(tmp_path / "t.yaml", {
        **CONFIG, "candidates": {"ok": {}, "odd_heads": {"model.n_head": 3}}}))
    with pytest.raises(ParamsError, match=r"tournament candidate odd_heads: model"):
        check_params(cfg, ROOT / "params.yaml")
    cfg = load_config(write_config(tmp_path / "t.yaml", {**CONFIG, "candidates": {"ok": {}, "typo": {"model.n_layr": 3}}}))
    with pytest.raises(ParamsError, match=r"tournament candidate typo: model.n_layr"):
        check_params(cfg, ROOT / "params.yaml")


def test_overrides_reach_dvc_as_the_same_values(tmp_path):
    """What hydra_value writes, dvc's own -S parser puts into params.yaml so that our params read the value meant."""
    from dvc.utils.hydra import apply_overrides

    from persona_lm.params import load_params

    values = {"pretrain.lr": 0.0005, "pretrain.min_lr": 1e-08, "pretrain.warmup_iters": 3, "model.bias": True,
              "model.n_kv_head": None, "model.pos": "rope", "lora.target_modules": ["c_attn", "c_proj"],
              "persona.system_prompt": "You are Rosie: 'small', kind, 100% yellow.", "persona.user_name": "null"}
    path = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", path)
    apply_overrides(str(path), [f"++{k}={hydra_value(v)}" for k, v in values.items()])
    p = load_params(path)
    for key, value in values.items():
        section, name = key.split(".")
        assert getattr(getattr(p, section), name) == value, key


def test_failure_reasons():
    assert failure_reason("...\nerror: pretrain: loss became nan at step 3; stopping without writing weights\n"
                          "ERROR: failed to reproduce 'pretrain'", 1).startswith("diverged: pretrain: loss became nan")
    assert failure_reason("RuntimeError: [enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't "
                          "allocate memory: you tried to allocate 1099511627776 bytes.", 1).startswith("out of memory")
    assert failure_reason("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1).startswith(
        "out of memory")
    assert "signal 9" in failure_reason("ERROR: failed to run: python stages/pretrain.py, exited with -9", 1)
    assert failure_reason("nothing useful", 2) == "dvc exp run exited with 2"


def test_survivors_keep_the_better_half_of_those_that_ran():
    cfg = Config(rounds=[Round(steps=1), Round(steps=1, keep=1)], candidates={c: {} for c in "abcde"})
    state = State(config={}, runs=[
        Run(1, "a", "t-r1-a", "ok", val_loss=3.0), Run(1, "b", "t-r1-b", "ok", val_loss=2.0),
        Run(1, "c", "t-r1-c", "eliminated", reason="diverged"), Run(1, "d", "t-r1-d", "ok", val_loss=2.0),
        Run(1, "e", "t-r1-e", "ok", val_loss=4.0)])
    assert survivors(cfg, state, 1, list("abcde")) == ["b", "d", "a"]  # ceil(5 / 2), ties by name
    state.runs += [Run(2, "b", "t-r2-b", "ok", val_loss=1.5), Run(2, "d", "t-r2-d", "ok", val_loss=1.2),
                   Run(2, "a", "t-r2-a", "eliminated", reason="out of memory")]
    assert survivors(cfg, state, 2, ["b", "d", "a"]) == ["d"]


# ---------------------------------------------------------------------------------------------- end to end

def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


TINY = {"tokenizer.vocab_size": 384, "templates.conversations": 200, "model.n_layer": 1, "model.n_head": 2,
        "model.n_embd": 32, "model.block_size": 32, "pretrain.batch_size": 4, "pretrain.eval_iters": 2,
        "pretrain.eval_interval": 5, "pretrain.ckpt_interval": 5, "pretrain.warmup_iters": 2}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh clone's files with tiny params, committed, its data stages and tokenizer run (as after `make repro`)."""
    def tiny(d):
        params = yaml.safe_load((d / "params.yaml").read_text())
        for key, value in TINY.items():
            section, name = key.split(".")
            params[section][name] = value
        (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    d = git_repo_copy(tmp_path_factory.mktemp("tournament_repo"), tiny)
    proc = dvc(d, "repro", "train_tokenizer")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d


def tournament(cwd, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "persona_lm.cli", "tournament", *args], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finished_runs(repo) -> list[dict]:
    path = repo / "tournaments" / "tiny" / "state.json"
    if not path.exists():
        return []
    try:
        return [r for r in json.loads(path.read_text())["runs"] if r["status"] != "started"]
    except (json.JSONDecodeError, KeyError):
        return []


def test_tournament_end_to_end_interrupted_and_resumed(repo):
    write_config(repo / "tiny.yaml", {
        "name": "tiny", "rounds": [{"steps": 6}, {"steps": 6}],
        "candidates": {"gelu": {}, "swiglu_rope": {"model.mlp": "swiglu", "model.pos": "rope", "model.norm": "rmsnorm"},
                       "diverges": {"pretrain.lr": 1.0e6, "pretrain.min_lr": 0.0, "pretrain.grad_clip": 0.0}}})
    params_before = (repo / "params.yaml").read_text()

    # interrupt it (Ctrl-C reaches the whole process group) once the first run has finished
    proc = tournament(repo, "--config", "tiny.yaml", start_new_session=True)
    deadline = time.monotonic() + 600
    while not finished_runs(repo) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "the same command resumes it" in err
    assert (repo / "params.yaml").read_text() == params_before  # the user's params are back
    done = finished_runs(repo)
    assert done and done[0]["candidate"] == "gelu"
    first_log = repo / "tournaments" / "tiny" / "logs" / "tiny-r1-gelu.log"
    first_log_mtime = first_log.stat().st_mtime_ns

    proc = tournament(repo, "--config", "tiny.yaml")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert first_log.stat().st_mtime_ns == first_log_mtime  # the finished run was not run again
    assert (repo / "params.yaml").read_text() == params_before

    folder = repo / "tournaments" / "tiny"
    runs = json.loads((folder / "results.json").read_text())["runs"]
    by = {(r["round"], r["candidate"]): r for r in runs}
    assert set(by) == {(1, "gelu"), (1, "swiglu_rope"), (1, "diverges"), (2, "gelu"), (2, "swiglu_rope")}
    assert by[1, "diverges"]["status"] == "eliminated" and by[1, "diverges"]["reason"].startswith("diverged")
    for key in [(1, "gelu"), (1, "swiglu_rope"), (2, "gelu"), (2, "swiglu_rope")]:
        r = by[key]
        assert r["status"] == "ok" and r["step"] == 6 * key[0], r
        assert r["params"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
    for cand in ("gelu", "swiglu_rope"):  # round 2 continued round 1's run from its checkpoint
        log = (folder / "logs" / f"tiny-r2-{cand}.log").read_text()
        assert "resuming from" in log and "step 6 of 12" in log, log[-2000:]
        assert by[2, cand]["val_loss"] < by[1, cand]["val_loss"]
    best = min(("gelu", "swiglu_rope"), key=lambda c: (by[2, c]["val_loss"], c))
    winner = yaml.safe_load((folder / "winner.yaml").read_text())
    assert winner["candidate"] == best and winner["experiment"] == f"tiny-r2-{best}"
    assert winner["val_loss"] == by[2, best]["val_loss"]
    assert f"Winner: **{best}**" in out and "| rank | candidate | val loss" in out and "diverged" in out
    assert (folder / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every run is a DVC experiment with its params and metrics: dvc exp show is the leaderboard
    shown = dvc(repo, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    names = {exp.get("name") for base in json.loads(shown.stdout) for exp in (base.get("experiments") or [])
             for exp in (exp.get("revs") or [])}
    assert {"tiny-r1-gelu", "tiny-r1-swiglu_rope", "tiny-r2-gelu", "tiny-r2-swiglu_rope"} <= names

    # the winner's continued run equals one uninterrupted run of its params
    params = yaml.safe_load(params_before)
    for section, values in winner["params"].items():
        params[section].update(values)
    params["pretrain"]["max_iters"] = 12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = dvc(repo, "repro", "pretrain")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        straight = json.loads((repo / "reports" / "pretrain.json").read_text())
        assert straight["step"] == 12 and straight["val_loss"] == winner["val_loss"]
    finally:
        (repo / "params.yaml").write_text(params_before)
