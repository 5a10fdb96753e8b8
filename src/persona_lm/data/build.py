"""Merge every dialogue source into one deduplicated, weighted ShareGPT dataset with a leak-free split.

Sources, in priority order: the pipeline's own dialogue files (templates, transcripts, messages), external
ShareGPT files (`sharegpt.extra`) and emotion datasets (`emotion.datasets`). A conversation that occurs in
several sources is kept once, in the first; every row's `source` names the source it was kept from.
A conversation with a turn longer than `sharegpt.max_value_chars` is a counted skip rather than cut short,
since a truncated reply would teach the model to stop mid-sentence.

Mix weights (`sharegpt.weights`, 1.0 for a source not listed) scale a source's share after dedup. The
whole part of a weight is the number of copies of every row; the fractional part adds one more copy to
exactly round(fraction * rows) of them, chosen by a seeded hash of the conversation key. So 0 drops the
source, 1 keeps it as is, 2 doubles it, 0.5 keeps an exact, reproducible half, and 1.5 keeps everything
plus a half again. Because the choice hangs on each row's key, not its position, reordering an input or
adding rows to it does not reshuffle which rows were chosen.

Weights shape the dataset; `sharegpt.shares` shape the finetune phase's sampling: what fraction of its tokens
each source gets (see `mix_shares`), so adding a large public set cannot drown the persona. The build
reports the shares that result (by text size; finetune applies them by tokens) and warns when the persona's
own sources fall below `sharegpt.persona_floor`. The emotion head in phase 3 reads every labelled reply,
whatever its source's share.

The train/val split is decided by the conversation key alone (a row is val when its key's hash falls
below `sharegpt.val_fraction`), so a conversation never crosses the split, copies made by a weight land on
the same side as their original, and a row keeps its side across runs, seeds and added data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from persona_lm.data.emotion_datasets import read_dataset
from persona_lm.data.sharegpt import check_row, conversation_key, make_row, read_sharegpt
from persona_lm.errors import ParamsError, PersonaError, Skips
from persona_lm.io import read_jsonl, write_jsonl
from persona_lm.params import Params

log = logging.getLogger(__name__)

DIALOGUE_SOURCES = ("templates", "transcripts", "messages")
SOURCES = DIALOGUE_SOURCES + ("extra", "emotion")


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) determined by `parts`: the same inputs give the same draw everywhere."""
    digest = hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / 16**15


def read_dialogues(path: Path, source: str, labels: set[str], skips: Skips) -> list[dict]:
    """Rows another stage wrote in our format; a missing or empty file means that source had nothing.

    `source` is set to the file's source name, so the weights and the metrics speak of the same thing.
    """
    if not path.is_file():
        log.warning("%s not found: no %s dialogues", path, source)
        return []
    rows = []
    for lineno, row in read_jsonl(path, skips):
        problems = check_row(row, labels)
        if problems:
            skips.add(f"{source}: {problems[0]}", f"{path}:{lineno}")
            continue
        n_gpt = sum(m["from"] == "gpt" for m in row["conversations"])
        row = {**row, "source": source, "emotions": row.get("emotions") or [None] * n_gpt}
        row.setdefault("id", f"{source}-{conversation_key(row['conversations'])[:16]}")
        rows.append(row)
    return rows


def read_extra(path: str | Path, labels: set[str], skips: Skips, notes: Counter) -> list[dict]:
    """Conversations of one external ShareGPT file as our rows, read by `read_sharegpt` as sharegpt-check
    reads them: refused rows are counted skips citing file:line, the fixes are added to `notes`, and a file
    of which nothing is usable is an InputError naming its layout. Row ids are kept as `original_id`.
    """
    got = read_sharegpt(path, labels)
    for line, reason in got.refused:
        skips.add(f"extra: {reason}", f"{path}:{line}")
    notes.update(got.notes)
    log.info("%s: %s", path, got.summary())
    rows = []
    for c in got.conversations:
        meta = {"origin": f"{path}:{c.line}"} | ({"original_id": c.original_id} if c.original_id is not None else {})
        rows.append(make_row("extra", [(m["from"], m["value"]) for m in c.turns], c.emotions, **meta))
    return rows


def weigh(pairs: list[tuple[str, dict]], weight: float, seed: int, source: str) -> list[tuple[str, dict]]:
    """Apply a mix weight to (key, row) pairs (see the module docstring); copies get ids `<id>~2`, ..."""
    whole = int(weight)
    k = round((weight - whole) * len(pairs))
    bonus = {key for key, _ in sorted(pairs, key=lambda kr: _unit(seed, source, kr[0]))[:k]}
    out = []
    for key, row in pairs:
        for copy in range(1, whole + (key in bonus) + 1):
            out.append((key, row if copy == 1 else {**row, "id": f"{row['id']}~{copy}"}))
    return out


def is_val(key: str, val_fraction: float) -> bool:
    return _unit("split", key) < val_fraction


def load_sources(p: Params, dialogues_dir: Path, skips: Skips, notes: Counter) -> dict[str, list[dict]]:
    """Every source's rows before dedup; a source weighted 0 is not read at all."""
    labels = set(p.persona.emotions)
    weights = {s: p.sharegpt.weights.get(s, 1.0) for s in SOURCES}
    for i, path in enumerate(p.sharegpt.extra):
        if not Path(path).is_file():
            raise ParamsError(f"params.yaml: sharegpt.extra[{i}]: file not found: {path}")
    for i, ds in enumerate(p.emotion.datasets):
        if not Path(ds.path).is_file():
            raise ParamsError(f"params.yaml: emotion.datasets[{i}].path: file not found: {ds.path}")
    rows: dict[str, list[dict]] = {s: [] for s in SOURCES}
    for source in DIALOGUE_SOURCES:
        if weights[source] > 0:
            rows[source] = read_dialogues(dialogues_dir / f"{source}.jsonl", source, labels, skips)
    if weights["extra"] > 0:
        for path in p.sharegpt.extra:
            rows["extra"] += read_extra(path, labels, skips, notes)
    if weights["emotion"] > 0:
        for ds in p.emotion.datasets:
            rows["emotion"] += read_dataset(ds.kind, ds.path, labels, skips, ds.max_rows)
    return rows


def build(p: Params, dialogues_dir: str | Path = "data/interim/dialogues") -> tuple[list[dict], list[dict], dict]:
    """(train rows, val rows, metrics) from every source; deterministic for fixed inputs and params."""
    skips, notes = Skips("conversation"), Counter()
    loaded = load_sources(p, Path(dialogues_dir), skips, notes)
    max_chars = p.sharegpt.max_value_chars
    seen: set[str] = set()
    metrics: dict = {"sources": {}}
    mixed: list[tuple[str, dict]] = []
    for source in SOURCES:
        kept = []
        for row in loaded[source]:
            key = conversation_key(row["conversations"])
            if any(len(m["value"]) > max_chars for m in row["conversations"]):
                skips.add(f"{source}: a turn is longer than sharegpt.max_value_chars", row["id"])
            elif key in seen:
                skips.add(f"{source}: duplicate conversation", row["id"])
            else:
                seen.add(key)
                kept.append((key, row))
        out = weigh(kept, p.sharegpt.weights.get(source, 1.0), p.seed, source)
        metrics["sources"][source] = {"rows_in": len(loaded[source]), "rows_kept": len(kept), "rows_out": len(out)}
        mixed += out

    if not mixed:
        raise PersonaError("no conversations: every source was empty, skipped or weighted 0")
    val_keys = {key for key, _ in mixed if is_val(key, p.sharegpt.val_fraction)}
    all_keys = {key for key, _ in mixed}
    if not val_keys and len(all_keys) > 1:
        val_keys = {min(all_keys, key=lambda k: _unit("split", k))}
        log.warning("no conversation hashed into val; moved the one nearest the threshold so val is not empty")
    train = [row for key, row in mixed if key not in val_keys]
    val = [row for key, row in mixed if key in val_keys]
    random.Random(p.seed).shuffle(train)
    random.Random(p.seed + 1).shuffle(val)

    labels = Counter(e for _, r in mixed for e in r["emotions"])
    chars = Counter()
    for row in train:
        chars[row["source"]] += sum(len(m["value"]) for m in row["conversations"])
    shares = mix_shares(p.sharegpt.shares, chars)
    if shares and persona_share(shares) < p.sharegpt.persona_floor:
        log.warning("the persona's own sources (templates, transcripts, messages) get %.0f%% of finetune text, "
                    "below sharegpt.persona_floor %.0f%%: its name and voice may be drowned (shares: %s)",
                    100 * persona_share(shares), 100 * p.sharegpt.persona_floor,
                    {s: round(v, 3) for s, v in shares.items()})
    metrics.update({
        "finetune_shares": {s: round(shares.get(s, 0.0), 4) for s in SOURCES},
        "train": _split_stats(train),
        "val": _split_stats(val),
        "labelled_replies": {e: labels[e] for e in p.persona.emotions} | {"unlabelled": labels[None]},
        "skips": skips.as_dict(),
        "skipped": skips.total,
        "import_notes": dict(sorted(notes.items())),
    })
    return train, val, metrics


def mix_shares(shares: dict[str, float], sizes: dict[str, float]) -> dict[str, float]:
    """Each source's fraction of the finetune phase's tokens, from `sharegpt.shares` and each source's size.

    A listed source with data gets its share; the unlisted ones with data split the rest in proportion to
    their sizes. When every source with data is listed, their shares are scaled to add up to 1; a listed source
    with no data gives its share to the others the same way. So the default `{extra: 0.1, emotion: 0.1}`
    leaves a run without public data as it was, and caps 40k public rows at a fifth of the tokens beside 3k
    persona rows instead of letting them take nine tenths.
    """
    present = {s: n for s, n in sizes.items() if n > 0}
    listed = {s: shares[s] for s in present if s in shares}
    rest = {s: n for s, n in present.items() if s not in shares}
    out = dict(listed)
    left = max(0.0, 1.0 - sum(listed.values()))
    if rest:
        total = sum(rest.values())
        out.update({s: left * n / total for s, n in rest.items()})
    total = sum(out.values())
    return {s: (v / total if total > 0 else 0.0) for s, v in out.items()}


def persona_share(shares: dict[str, float]) -> float:
    """The share of the persona's own sources (templates, transcripts, messages)."""
    return sum(v for s, v in shares.items() if s in DIALOGUE_SOURCES)


def _split_stats(rows: list[dict]) -> dict:
    turns = [m["from"] for r in rows for m in r["conversations"]]
    return {"rows": len(rows), "turns": len(turns), "gpt_turns": turns.count("gpt"),
            "rows_per_source": dict(sorted(Counter(r["source"] for r in rows).items()))}


def write_split(out_dir: str | Path, train: list[dict], val: list[dict]) -> None:
    """Write train.jsonl and val.jsonl into a fresh folder, then swap it in for `out_dir` by renames.

    Readers never see a train file from one run beside a val file from another: an interruption leaves the
    old folder, the new one, or (between the two renames) none.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    old = out_dir.with_name(f".{out_dir.name}.old")
    try:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
