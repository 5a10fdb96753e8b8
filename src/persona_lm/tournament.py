"""Let the data pick the architecture: successive halving over DVC experiments (`persona-lm tournament`).

Candidates are named sets of params overrides. Each round trains every surviving candidate for the round's
steps and keeps the best by phase 1's val loss (successive halving, Jamieson & Talwalkar 2016; the better half
by default, as Hyperband's inner loop, Li et al. 2017). Every run is `dvc exp run pretrain` in the workspace
with the candidate's overrides set by `-S`, so `dvc exp show` is the leaderboard and `dvc exp apply NAME`
brings any run back.

Survivors continue instead of restarting: every run plans its lr schedule over the whole tournament
(`pretrain.max_iters` = all rounds' steps) and stops at its round's end (`pretrain.stop_at`), checkpointing
into a folder of its own (PERSONA_LM_CHECKPOINTS); the next round resumes from that checkpoint, so a
survivor's weights are exactly those of one uninterrupted run of its params.

Fair by construction: one seed, one data order and one batch shape for all (a candidate cannot override
them), so every candidate sees the same tokens each round. A run that fails (out of memory, a diverging loss)
eliminates its candidate with the reason recorded. The state is written after every run, so a tournament that
is interrupted resumes where it stopped when the same command runs again.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from persona_lm.errors import PersonaError
from persona_lm.io import read_json, write_json, write_text
from persona_lm.params import Section, format_error, parse_params

ROOT = Path("tournaments")
NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
# What the tournament sets itself, and what would make candidates see different data or batch shapes.
SET_BY_TOURNAMENT = ("pretrain.max_iters", "pretrain.stop_at")
SAME_FOR_ALL = ("seed", "pretrain.batch_size", "pretrain.grad_accum", "pretrain.eval_iters",
                "pretrain.personal_mix", "model.block_size")
CANDIDATE_SECTIONS = ("model", "lora", "base", "pretrain")


class TournamentError(PersonaError):
    pass


class Round(Section):
    steps: int = Field(ge=1, description="optimizer steps every candidate trains this round")
    keep: int | None = Field(None, ge=1, description="candidates that go on; null = the better half, rounded up")


class Config(Section):
    """tournament.yaml."""

    name: str = Field("tournament", pattern=NAME, description="its folder under tournaments/ and its runs' prefix")
    rounds: list[Round] = Field(min_length=1)
    common: dict[str, Any] = Field(default_factory=dict, description="params overrides for every candidate")
    candidates: dict[str, dict[str, Any]] = Field(min_length=2, description="name -> params overrides")


@dataclass
class Run:
    """One candidate's run in one round, as the state file records it."""

    round: int                  # 1-based
    candidate: str
    experiment: str             # the DVC experiment's name
    status: str = "started"     # started | ok | eliminated
    reason: str | None = None   # why it was eliminated
    step: int | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    params: int | None = None
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    seconds: float | None = None


@dataclass
class State:
    config: dict
    runs: list[Run] = field(default_factory=list)

    def find(self, round_: int, candidate: str) -> Run | None:
        return next((r for r in self.runs if r.round == round_ and r.candidate == candidate), None)


def load_config(path: Path) -> Config:
    """Parse and check tournament.yaml; errors name the file and key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TournamentError(f"{path}: file not found (see README, Tournament)") from None
    except yaml.YAMLError as e:
        raise TournamentError(f"{path}: not valid YAML: {e}") from None
    try:
        cfg = Config.model_validate(data or {})
    except ValidationError as e:
        raise TournamentError("\n".join(format_error(err, str(path)) for err in e.errors())) from None
    for cand, overrides in cfg.candidates.items():
        if not re.match(NAME, cand):
            raise TournamentError(f"{path}: candidates.{cand}: a name must match {NAME}")
        for key in overrides:
            if key in SET_BY_TOURNAMENT or key in SAME_FOR_ALL:
                why = "set by the tournament" if key in SET_BY_TOURNAMENT else "the same for every candidate (set it in common)"
                raise TournamentError(f"{path}: candidates.{cand}.{key}: {why}")
            if key.split(".")[0] not in CANDIDATE_SECTIONS:
                raise TournamentError(f"{path}: candidates.{cand}.{key}: a candidate overrides "
                                      f"{', '.join(s + '.*' for s in CANDIDATE_SECTIONS)} only")
    for key in cfg.common:
        if key in SET_BY_TOURNAMENT:
            raise TournamentError(f"{path}: common.{key}: set by the tournament")
    return cfg


def total_steps(cfg: Config) -> int:
    return sum(r.steps for r in cfg.rounds)


def run_overrides(cfg: Config, candidate: str, round_: int) -> dict[str, Any]:
    """Every params override of one run: common, the candidate's, then the schedule over all rounds and the
    round's stop."""
    stop = sum(r.steps for r in cfg.rounds[:round_])
    return {**cfg.common, **cfg.candidates[candidate], "pretrain.max_iters": total_steps(cfg),
            "pretrain.stop_at": stop}


def set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        nxt = data.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise TournamentError(f"{key}: {part} is not a section of params.yaml")
        data = nxt
    data[last] = value


def check_params(cfg: Config, params_path: Path) -> None:
    """Validate every candidate's params before any run: a wrong override fails now, naming candidate and key."""
    base = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    for cand in cfg.candidates:
        data = json.loads(json.dumps(base))
        for key, value in run_overrides(cfg, cand, len(cfg.rounds)).items():
            set_dotted(data, key, value)
        parse_params(data, f"tournament candidate {cand}")


def hydra_value(value: Any) -> str:
    """A value in the override grammar `dvc exp run -S` reads (Hydra's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")
        # 1.0e-08, not 1e-08: YAML 1.1 (PyYAML) reads an exponent without a point as a string
        return mantissa + ("" if "." in mantissa or not e else ".0") + e + exponent
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", text) and text.lower() not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def failure_reason(log_text: str, returncode: int) -> str:
    """One line saying why a run failed, from the end of its log."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    if re.search(r"out of memory|MemoryError|can't allocate memory|DefaultCPUAllocator", log_text, re.I):
        hit = next((ln for ln in reversed(lines) if re.search(r"memory", ln, re.I)), "")
        return f"out of memory: {hit}"[:300]
    if re.search(r"exited with -9|exited with 137|Killed", log_text):
        return "killed by signal 9 (the system's out-of-memory killer, most likely)"
    diverged = next((ln for ln in reversed(lines) if "loss became" in ln), None)
    if diverged:
        return f"diverged: {diverged.removeprefix('error: ')}"[:300]
    error = next((ln for ln in reversed(lines) if ln.lower().startswith("error")), None)
    return (error or f"dvc exp run exited with {returncode}")[:300]


class Workspace:
    """The user's params.yaml and dvc.lock, saved before the first run. `dvc exp run` in the workspace leaves
    its run's params there: params.yaml goes back before every run (one candidate's overrides must not leak into
    the next), both files at the end. Between runs dvc.lock stays, so the data stages are not rerun."""

    FILES = ("params.yaml", "dvc.lock")

    def __init__(self, folder: Path):
        self.folder = folder

    def save(self) -> None:
        if (self.folder / "params.yaml").exists():
            return  # saved by the first start of this tournament: a resumed one must not save a run's params
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            if Path(name).exists():
                shutil.copyfile(name, self.folder / f".{name}.tmp")
        for name in self.FILES:  # params.yaml last: its presence marks a complete save
            if (self.folder / f".{name}.tmp").exists():
                os.replace(self.folder / f".{name}.tmp", self.folder / name)

    def restore(self, files: tuple[str, ...] = FILES) -> None:
        for name in files:
            saved = self.folder / name
            if saved.exists():
                shutil.copyfile(saved, f".{name}.tmp")
                os.replace(f".{name}.tmp", name)
            elif name != "params.yaml":
                Path(name).unlink(missing_ok=True)


def dvc_bin() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else "dvc"


def run_experiment(cfg: Config, run: Run, folder: Path, say) -> Run:
    """`dvc exp run pretrain` for one candidate and round; the run's metrics, or its reason for failing."""
    overrides = run_overrides(cfg, run.candidate, run.round)
    cmd = [dvc_bin(), "exp", "run", "pretrain", "--name", run.experiment]
    for key, value in overrides.items():
        cmd += ["-S", f"++{key}={hydra_value(value)}"]
    env = {**os.environ, "PERSONA_LM_CHECKPOINTS": str((folder / "checkpoints" / run.candidate).resolve()),
           "DVC_NO_ANALYTICS": "1"}
    log_path = folder / "logs" / f"{run.experiment}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached dvc and the stage too: let them clean up and exit
            proc.wait()
            raise
    run.seconds = round(time.perf_counter() - start, 1)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if returncode != 0 and "Running stage 'pretrain'" not in text:
        # dvc failed before training (a lock, a data stage, git): not the candidate's fault, so stop, resumable
        raise TournamentError(f"{run.experiment}: dvc exp run failed before pretraining "
                              f"({failure_reason(text[-20000:], returncode)}); see {log_path}, then run the same "
                              f"command again to resume")
    if returncode != 0:
        run.status, run.reason = "eliminated", failure_reason(text[-20000:], returncode)
        return run
    metrics, speed = read_json("reports/pretrain.json"), read_json("reports/speed/pretrain.json")
    val = metrics.get("val_loss")
    run.step, run.params = metrics.get("step"), metrics.get("params", {}).get("total")
    run.tokens_per_s, run.peak_rss_mb = speed.get("train_tokens_per_s"), speed.get("peak_rss_mb")
    run.peak_cuda_mb = speed.get("peak_cuda_mb")
    if val is None or not math.isfinite(val):
        run.status, run.reason = "eliminated", f"diverged: val loss is {val}"
    else:
        run.status, run.val_loss = "ok", float(val)
    return run


def survivors(cfg: Config, state: State, round_: int, alive: list[str]) -> list[str]:
    """The candidates that go on after `round_`: the best `keep` of those whose run succeeded, by val loss
    (ties by name, so the order never depends on timing)."""
    done = [state.find(round_, c) for c in alive]
    ok = sorted((r for r in done if r and r.status == "ok"), key=lambda r: (r.val_loss, r.candidate))
    keep = cfg.rounds[round_ - 1].keep or math.ceil(len(alive) / 2)
    return [r.candidate for r in ok[:keep]]


def config_key(cfg: Config) -> dict:
    return json.loads(cfg.model_dump_json())


def load_state(folder: Path, cfg: Config, restart: bool) -> State:
    path = folder / "state.json"
    if path.exists() and not restart:
        data = read_json(path)
        if data["config"] != config_key(cfg):
            raise TournamentError(f"{folder} holds tournament {cfg.name!r} started with another config: run with "
                                  f"--restart to start it again, or give this one another name")
        return State(config=data["config"], runs=[Run(**r) for r in data["runs"]])
    return State(config=config_key(cfg))


def save_state(folder: Path, state: State) -> None:
    write_json(folder / "state.json", {"config": state.config, "runs": [asdict(r) for r in state.runs]})


def remove_experiments(names: list[str]) -> None:
    if names:
        subprocess.run([dvc_bin(), "exp", "remove", *names], capture_output=True, text=True)


def table(cfg: Config, state: State, round_: int) -> str:
    """Markdown table of one round, best first; eliminated candidates last with their reason."""
    runs = [r for r in state.runs if r.round == round_ and r.status != "started"]
    runs.sort(key=lambda r: (r.status != "ok", r.val_loss if r.val_loss is not None else math.inf, r.candidate))
    steps = sum(r.steps for r in cfg.rounds[:round_])
    lines = [f"Round {round_} of {len(cfg.rounds)}: {cfg.rounds[round_ - 1].steps} steps (to step {steps})", "",
             "| rank | candidate | val loss | tokens/s | params | peak RSS MB | seconds | result |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        val = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-"
        params = f"{r.params:,}" if r.params else "-"
        rss = f"{r.peak_rss_mb:,.0f}" if r.peak_rss_mb else "-"
        if r.peak_cuda_mb:
            rss += f" (CUDA {r.peak_cuda_mb:,.0f})"
        result = r.reason if r.status == "eliminated" else ""
        lines.append(f"| {i if r.status == 'ok' else '-'} | {r.candidate} | {val} | {tps} | {params} | {rss} | "
                     f"{r.seconds} | {result} |")
    return "\n".join(lines)


def write_results(cfg: Config, state: State, folder: Path, winner: Run | None) -> None:
    """results.md (a table per round), results.json, val_loss.png and, once decided, winner.yaml."""
    from persona_lm.figures import tournament_curves

    rounds = sorted({r.round for r in state.runs if r.status != "started"})
    text = [f"# Tournament {cfg.name}", ""]
    for k in rounds:
        text += [table(cfg, state, k), ""]
    if winner:
        text += [f"Winner: **{winner.candidate}** (val loss {winner.val_loss:.4f}); its run is DVC experiment "
                 f"`{winner.experiment}`: `dvc exp apply {winner.experiment}` puts it in the workspace.", ""]
    write_text(folder / "results.md", "\n".join(text))
    write_json(folder / "results.json", {"name": cfg.name, "runs": [asdict(r) for r in state.runs],
                                         "winner": winner.candidate if winner else None})
    ends = [sum(r.steps for r in cfg.rounds[:k]) for k in range(1, len(cfg.rounds) + 1)]
    curves = {}
    for r in sorted(state.runs, key=lambda r: r.round):
        if r.status == "ok":
            curves.setdefault(r.candidate, ([], []))
            curves[r.candidate][0].append(ends[r.round - 1])
            curves[r.candidate][1].append(r.val_loss)
    tournament_curves(curves, f"Tournament {cfg.name}: val loss per candidate", folder / "val_loss.png")
    if winner:
        params: dict = {}
        for key, value in {**cfg.common, **cfg.candidates[winner.candidate]}.items():
            set_dotted(params, key, value)
        write_text(folder / "winner.yaml", yaml.safe_dump({
            "candidate": winner.candidate, "experiment": winner.experiment, "val_loss": winner.val_loss,
            "step": winner.step, "params": params}, sort_keys=False))


def run_tournament(config_path: Path, restart: bool = False, say=print) -> tuple[Run, Path]:
    """Run (or resume) the tournament that `config_path` describes, from the project root; returns the winner's
    last run and the tournament's folder. Raises TournamentError on a bad config or when no candidate survives."""
    cfg = load_config(config_path)
    if not Path("dvc.yaml").exists() or not Path("params.yaml").exists():
        raise TournamentError("run persona-lm tournament from the project root (where dvc.yaml and params.yaml are)")
    if subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True).returncode != 0:
        raise TournamentError("a tournament's runs are DVC experiments, which need a git repository with at least "
                              "one commit (a clone of persona-lm is one)")
    folder = ROOT / cfg.name
    workspace = Workspace(folder / "workspace")
    if restart and folder.exists():
        old = read_json(folder / "state.json") if (folder / "state.json").exists() else {"runs": []}
        workspace.restore()
        remove_experiments([r["experiment"] for r in old["runs"]])
        shutil.rmtree(folder)
    check_params(cfg, workspace.folder / "params.yaml" if (workspace.folder / "params.yaml").exists()
                 else Path("params.yaml"))
    state = load_state(folder, cfg, restart)
    workspace.save()
    alive = list(cfg.candidates)
    try:
        for k, rnd in enumerate(cfg.rounds, 1):
            say(f"round {k}/{len(cfg.rounds)}: {len(alive)} candidates, {rnd.steps} steps each")
            for i, cand in enumerate(alive, 1):
                run = state.find(k, cand)
                if run and run.status != "started":
                    continue
                if run:  # interrupted mid-run: its experiment may exist half made
                    remove_experiments([run.experiment])
                else:
                    run = Run(round=k, candidate=cand, experiment=f"{cfg.name}-r{k}-{cand}")
                    state.runs.append(run)
                    save_state(folder, state)
                workspace.restore(("params.yaml",))
                say(f"  [{i}/{len(alive)}] {cand} ...")
                run_experiment(cfg, run, folder, say)
                save_state(folder, state)
                say(f"  [{i}/{len(alive)}] {cand}: " + (f"val loss {run.val_loss:.4f}, {run.tokens_per_s:,.0f} tok/s, "
                    f"{run.seconds:.0f} s" if run.status == "ok" else f"eliminated ({run.reason})"))
            alive = survivors(cfg, state, k, alive)
            write_results(cfg, state, folder, None)
            if not alive:
                raise TournamentError(f"round {k}: every candidate failed; see {folder / 'results.md'} and "
                                      f"{folder / 'logs'}")
        winner = state.find(len(cfg.rounds), alive[0])
        write_results(cfg, state, folder, winner)
        return winner, folder
    finally:
        workspace.restore()
