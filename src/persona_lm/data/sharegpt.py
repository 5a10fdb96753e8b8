"""The ShareGPT row: the one dialogue format every data stage writes and every training phase reads.

A row is `{"id", "source", "conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
"emotions": [label or None for each gpt turn]}`. Messages carry exactly `from` and `value` (unsloth's
reader rejects more); labels and provenance are top-level fields of the row.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from persona_lm.errors import InputError
from persona_lm.io import read_text

ROLES = ("system", "human", "gpt")


def conversation_key(conversations: list[dict]) -> str:
    """A hash of the normalised turns: equal conversations share it, so it drives dedup and the split."""
    canon = [
        (m["from"], " ".join(unicodedata.normalize("NFKC", m["value"]).casefold().split()))
        for m in conversations
        if m["from"] != "system"
    ]
    return hashlib.sha1(json.dumps(canon, ensure_ascii=False).encode("utf-8")).hexdigest()


def make_row(source: str, turns: list[tuple[str, str]], emotions: list[str | None] | None = None,
             **meta: Any) -> dict:
    """Build a row from (role, text) pairs; `emotions` has one entry per gpt turn (None = unlabelled)."""
    conversations = [{"from": role, "value": text} for role, text in turns]
    n_gpt = sum(role == "gpt" for role, _ in turns)
    emotions = list(emotions) if emotions is not None else [None] * n_gpt
    if len(emotions) != n_gpt:
        raise ValueError(f"{len(emotions)} emotion labels for {n_gpt} gpt turns")
    key = conversation_key(conversations)
    return {"id": f"{source}-{key[:16]}", "source": source, "conversations": conversations,
            "emotions": emotions, **meta}


def check_row(row: Any, labels: set[str] | None = None) -> list[str]:
    """Every reason this object is not a valid row (empty list when it is)."""
    if not isinstance(row, dict):
        return ["row is not a JSON object"]
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        return ["'conversations' must be a non-empty list"]
    problems = []
    roles = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            problems.append(f"turn {i}: not an object")
            continue
        extra = set(m) - {"from", "value"}
        if extra:
            problems.append(f"turn {i}: unexpected keys {sorted(extra)} (only 'from' and 'value' allowed)")
        role, value = m.get("from"), m.get("value")
        if role not in ROLES:
            problems.append(f"turn {i}: unknown role {role!r} (expected system, human or gpt)")
        if not isinstance(value, str) or not value.strip():
            problems.append(f"turn {i}: empty or non-string value")
        roles.append(role)
    if problems:
        return problems
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        problems.append("a system turn may only come first")
    elif not body or body[0] != "human":
        problems.append("the first turn after any system prompt must be human")
    elif any(a == b for a, b in zip(body, body[1:])):
        problems.append("roles must alternate human/gpt")
    elif "gpt" not in body:
        problems.append("no gpt turn")
    emotions = row.get("emotions")
    if emotions is not None:
        n_gpt = body.count("gpt")
        if not isinstance(emotions, list) or len(emotions) != n_gpt:
            problems.append(f"'emotions' must list one label (or null) per gpt turn ({n_gpt})")
        elif labels is not None:
            bad = sorted({e for e in emotions if e is not None and e not in labels})
            if bad:
                problems.append(f"unknown emotion labels {bad}")
    return problems


def iter_file(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or item number, object) from a ShareGPT .jsonl, a JSON array or a single JSON object.

    A JSON line that does not parse is yielded as an InputError so callers can count or report it.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return
    if path.suffix == ".json" or (stripped[0] == "[" and path.suffix != ".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
        items = data if isinstance(data, list) else [data]
        yield from enumerate(items, 1)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, InputError(path, f"invalid JSON: {e.msg}", line=lineno)


def check_file(path: str | Path, labels: set[str] | None = None) -> list[str]:
    """Per-line problems of a ShareGPT file, as `path:line: reason` strings (empty when valid)."""
    report = []
    n = 0
    for where, obj in iter_file(path):
        n += 1
        problems = [obj.reason] if isinstance(obj, InputError) else check_row(obj, labels)
        report.extend(f"{path}:{where}: {p}" for p in problems)
    if n == 0:
        report.append(f"{path}: no conversations")
    return report
