"""The markdown report card of a run: params, data, metrics, loss curves, persona checks and samples in one
page (reports/report_card.md), built only from files the pipeline already wrote, with PNG figures of the curves
and the emotion confusion matrix beside it (reports/figures/)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from persona_lm import figures
from persona_lm.figures import Curve
from persona_lm.lora import uses_lora
from persona_lm.params import Params

BARS = "▁▂▃▄▅▆▇█"
PHASES = ("pretrain", "finetune", "emotion")
FIGURES = Path("reports/figures")


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    vals = values[::step]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(BARS[int((v - lo) / span * (len(BARS) - 1))] for v in vals)


def _curve(path: Path) -> tuple[list[int], list[float]]:
    """(steps, values) of one dvclive TSV; empty when the file is absent."""
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    key = [k for k in (rows[0] if rows else {}) if k not in ("step", "timestamp")]
    if not key:
        return [], []
    return [int(r["step"]) for r in rows], [float(r[key[0]]) for r in rows]


def _meaning(p: Params, phase: str, metric: str) -> str:
    """What a logged loss is (train/loop.py): the emotion phase trains emotion CE + lm_weight × LM CE."""
    emotion_ce = ("class-weighted emotion CE" if getattr(p.emotion, "class_weights", "none") == "balanced"
                  else "emotion CE")
    if metric == "loss" and phase == "emotion":
        return f"{emotion_ce} + {p.emotion.lm_weight:g} × LM CE"
    meanings = {"loss": "LM CE per token", "lm_loss": "LM CE per token", "emotion_loss": f"{emotion_ce} per reply"}
    return meanings.get(metric, metric)


def phase_curves(p: Params, phase: str) -> list[Curve]:
    """A phase's train loss, the val curve of the same quantity (val `loss`; `lm_loss` where an older run logged
    only that) and, in the emotion phase, the val loss's two parts dashed; each labelled with what it is."""
    metrics = Path(f"reports/train/{phase}/plots/metrics")
    curves = []
    val_keys = ["loss"] if (metrics / "val" / "loss.tsv").exists() else ["lm_loss"]
    if phase == "emotion":
        val_keys += [k for k in ("emotion_loss", "lm_loss") if k not in val_keys]
    for split, keys in (("train", ["loss"]), ("val", val_keys)):
        for key in keys:
            steps, vals = _curve(metrics / split / f"{key}.tsv")
            if vals:
                curves.append(Curve(f"{split} {key} ({_meaning(p, phase, key)})", steps, vals,
                                    dashed=split == "val" and key != val_keys[0]))
    return curves


def write_figures(p: Params, curves: dict[str, list[Curve]]) -> dict[str, str]:
    """Write the run's PNGs into reports/figures/, removing ones this run has no data for; {phase or
    "confusion": its markdown image line}, paths relative to the card."""
    written = {}
    for phase, cs in curves.items():
        if cs:
            written[phase] = figures.training_curves(cs, f"{phase}: loss by step", FIGURES / f"loss_{phase}.png")
    pairs = _load("reports/eval/emotion_confusion.json") or []
    if pairs:
        written["confusion"] = figures.confusion_matrix(pairs, p.persona.emotions, FIGURES / "emotion_confusion.png")
    for old in FIGURES.glob("*.png"):
        if old not in written.values():
            old.unlink()
    alt = {"confusion": "emotion confusion matrix: rows normalised, counts in the cells"}
    return {k: f"![{alt.get(k, k + ' loss curves')}]({FIGURES.name}/{out.name})" for k, out in written.items()}


def _value(v) -> str:
    return "n/a" if v is None else str(v)


def _load(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def _probes(probed: dict) -> list[str]:
    """One section per conversation probe (persona_lm.probes): its rate, and every probe with its verdict."""
    lines = []
    for name, r in probed.items():
        rate = "not run" if r["rate"] is None else f"{r['rate']:.0%} of {r['n']}"
        lines += ["", f"## {name.replace('_', ' ').capitalize()} ({rate})", ""]
        if r.get("beyond_window"):
            lines.append(f"- {r['beyond_window']} probe(s) did not fit the context window and were not run")
        for x in r["results"]:
            if x.get("beyond_window"):
                continue
            mark = "✅" if x["passed"] else "❌"
            if "prompt" in x:
                what = f"**{x['prompt']}** → {x['reply']!r}"
            elif "replies" in x:
                what = f"**{x['fact']}** asked twice → {x['replies'][0]!r} / {x['replies'][1]!r}"
            elif "gap" in x:
                what = f"**{x['kind']}** {x['value']!r}, asked {x['gap']} turn(s) later → {x['reply']!r}"
            else:
                what = f"**{x['kind']}** {x['value']!r}, asked {x['question']!r} → {x['reply']!r}"
            if "emotion" in x:
                what += f" *({x['emotion']}; fits {', '.join(x['fits'])})*"
            lines.append(f"- {mark} {what}")
    return lines


def render(p: Params, metrics: dict, probed: dict, samples: list[dict], params_count: dict) -> str:
    m, lp = p.model, p.lora
    if p.base.model is None:
        options = [f"{m.attention} attention"] if m.attention != "standard" else []
        if m.mlp == "moe":
            options.append(f"top-{m.top_k} of {m.n_experts} experts")
        arch = (f"{m.n_layer} layers, {m.n_head} heads ({m.n_kv_head or m.n_head} kv), {m.n_embd} dims, "
                f"block {m.block_size}, {m.norm} + {m.mlp} + {m.pos} positions, "
                + "".join(f"{o}, " for o in options) + f"{'tied' if m.tie_embeddings else 'untied'} embeddings")
    else:
        arch = f"base {p.base.model} ({p.base.revision}), context {m.block_size}, markers as {p.base.markers}"
    lora_phases = [ph for ph in lp.phases if uses_lora(p, ph)]
    if lora_phases:
        arch += f"; LoRA r={lp.r}, alpha={lp.alpha:g} in {', '.join(lora_phases)}"
    filt, share, tokr = _load("reports/filter.json"), _load("reports/sharegpt.json"), _load("reports/tokenizer.json")
    lines = [f"# Report card: {p.persona.name}", "",
             "## Model", "", f"- {arch}", f"- {params_count['total']:,} parameters: " +
             ", ".join(f"{k} {v:,}" for k, v in params_count.items() if k != "total" and v), "",
             f"- tokenizer: {tokr.get('kind', p.tokenizer.kind)}, vocab {tokr.get('vocab_size', '?')}, "
             f"{tokr.get('val_bytes_per_token', '?')} bytes/token on held-out text", "",
             "## Data", ""]
    if filt:
        lines.append(f"- corpus: {json.dumps({k: v for k, v in filt.items() if not isinstance(v, dict)})}")
    if share:
        lines.append(f"- sharegpt: {json.dumps({k: v for k, v in share.items() if not isinstance(v, (dict, list))})}")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items() if not isinstance(v, dict)]
    lines += ["", "## Training curves (loss, left to right)", ""]
    curves = {phase: phase_curves(p, phase) for phase in PHASES}
    for phase, cs in curves.items():
        for c in cs:
            if not c.dashed:
                lines.append(f"- {phase} {c.label}: `{sparkline(c.values)}` {c.values[0]:.3f} → {c.values[-1]:.3f}")
    images = write_figures(p, curves)
    if curves_shown := [images[ph] for ph in PHASES if ph in images]:
        lines += ["", *curves_shown]
    if "confusion" in images:
        lines += ["", "## Emotion confusion", "", images["confusion"]]
    lines += _probes(probed)
    lines += ["", "## Samples", ""]
    lines += [f"- **{s['prompt']}** → {s['reply']!r}" + (f" *({s['emotion']})*" if s.get("emotion") else "")
              for s in samples]
    return "\n".join(lines) + "\n"
