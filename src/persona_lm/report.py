"""The markdown report card of a run: params, data, metrics, loss curves, persona checks and samples in one
page (reports/report_card.md), built only from files the pipeline already wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from persona_lm.lora import uses_lora
from persona_lm.params import Params

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    vals = values[::step]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(BARS[int((v - lo) / span * (len(BARS) - 1))] for v in vals)


def _curve(path: Path) -> list[float]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    key = [k for k in (rows[0] if rows else {}) if k not in ("step", "timestamp")]
    return [float(r[key[0]]) for r in rows] if key else []


def _load(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def render(p: Params, metrics: dict, checks: dict, samples: list[dict], params_count: dict) -> str:
    m, lp = p.model, p.lora
    if p.base.model is None:
        arch = (f"{m.n_layer} layers, {m.n_head} heads ({m.n_kv_head} kv), {m.n_embd} dims, block {m.block_size}, "
                f"{m.norm} + {m.mlp} + {m.pos} positions, {'tied' if m.tie_embeddings else 'untied'} embeddings")
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
    lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Training curves (loss, left to right)", ""]
    for phase in ("pretrain", "finetune", "emotion"):
        for split in ("train", "val"):
            vals = _curve(Path(f"reports/train/{phase}/plots/metrics/{split}/{'loss' if split == 'train' else 'lm_loss'}.tsv"))
            if vals:
                lines.append(f"- {phase} {split}: `{sparkline(vals)}` {vals[0]:.3f} → {vals[-1]:.3f}")
    lines += ["", f"## Persona checks ({checks['pass_rate']:.0%} passed)", ""]
    lines += [f"- {'✅' if r['passed'] else '❌'} **{r['prompt']}** → {r['reply']!r}" for r in checks["results"]]
    lines += ["", "## Samples", ""]
    lines += [f"- **{s['prompt']}** → {s['reply']!r} *({s['emotion']})*" for s in samples]
    return "\n".join(lines) + "\n"
