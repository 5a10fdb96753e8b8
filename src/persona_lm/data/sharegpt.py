"""The ShareGPT row: the one dialogue format every data stage writes and every training phase reads.

A row is `{"id", "source", "conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
"emotions": [label or None for each gpt turn]}`. Messages carry exactly `from` and `value` (unsloth's
reader rejects more); labels and provenance are top-level fields of the row.

Files as people download them come in three shapes: JSON lines, a JSON array, or one JSON object. `iter_file`
reads all three and reports the real line each conversation starts on, so every problem can be cited as
`file:line`. `import_conversation` turns a conversation from another tool's dialect (user/assistant roles,
OpenAI-style role/content keys, extra per-message keys) into our strict form.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from persona_lm.errors import InputError
from persona_lm.io import read_text

ROLES = ("system", "human", "gpt")

# Role spellings of the common chat tools, mapped to ours. Anything else is refused, not guessed.
ROLE_ALIASES = {
    "human": "human", "user": "human",
    "gpt": "gpt", "assistant": "gpt", "chatgpt": "gpt", "bing": "gpt", "bard": "gpt", "model": "gpt",
    "system": "system",
}


_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Casefolded text with every run of non-word characters (spaces, punctuation) as one space: how texts are
    compared with the training data (a reply copied from it, a benchmark row overlapping it)."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


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


def import_conversation(obj: Any, notes: Counter | None = None) -> list[dict]:
    """One conversation from another tool's dialect -> our strict turns; ValueError(reason) if unusable.

    Accepts `conversations` (ShareGPT) or `messages` (OpenAI) lists with `from`/`value` or `role`/`content`
    keys. Role aliases are mapped and counted in `notes`; other per-message keys (e.g. "markdown") are
    dropped. A leading gpt turn (a greeting with nothing to answer) is dropped and counted, because training
    on a reply needs a human turn before it. Unknown roles and empty values refuse the whole conversation:
    patching them would teach the model a dialogue that never happened.
    """
    notes = notes if notes is not None else Counter()
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    conv = obj.get("conversations", obj.get("messages"))
    if not isinstance(conv, list) or not conv:
        raise ValueError("no 'conversations' list")
    out = []
    for m in conv:
        if not isinstance(m, dict):
            raise ValueError("a turn is not an object")
        spelt = m.get("from", m.get("role"))
        value = m.get("value", m.get("content"))
        role = ROLE_ALIASES.get(spelt.strip().lower()) if isinstance(spelt, str) else None
        if role is None:
            raise ValueError(f"unknown role {spelt!r}")
        if not isinstance(value, str) or not value.strip():
            raise ValueError("empty value")
        if spelt != role:
            notes[f"role {spelt} -> {role}"] += 1
        out.append({"from": role, "value": value})
    start = 1 if out[0]["from"] == "system" else 0
    if len(out) > start and out[start]["from"] == "gpt":
        del out[start]
        notes["leading gpt turn dropped"] += 1
    if len(out) == start:
        raise ValueError("no human turn")
    problems = check_row({"conversations": out})
    if problems:
        raise ValueError(problems[0])
    return out


def _iter_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Items of a JSON array with the line each starts on; a syntax error anywhere is an InputError."""
    decoder = json.JSONDecoder()
    n, pos, line, counted = len(text), text.index("[") + 1, 1, 0

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(msg: str, at: int):
        return InputError(path, f"invalid JSON: {msg}", line=text.count("\n", 0, at) + 1)

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.msg, e.pos) from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, obj
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < n and text[pos] == "]":
            if skip_ws(pos + 1) != n:
                raise fail("extra data after the array", skip_ws(pos + 1))
            return
        else:
            raise fail("expected ',' or ']'", pos)


def _first_line_is_json(text: str) -> bool:
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def iter_file(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, object) from a ShareGPT .jsonl, a JSON array or a single (pretty-printed) JSON object.

    The shape is read from the content, not the suffix, because downloads named .json are often JSON lines.
    In JSON lines a line that does not parse is yielded as an InputError so callers can count or report it;
    in a JSON document a syntax error makes the whole file unreadable and is raised.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "[" and path.suffix != ".jsonl":
        yield from _iter_array(path, text)
        return
    if path.suffix == ".jsonl" or _first_line_is_json(text):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, InputError(path, f"invalid JSON: {e.msg}", line=lineno)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    yield text[: len(text) - len(stripped)].count("\n") + 1, data


def check_file(path: str | Path, labels: set[str] | None = None) -> list[str]:
    """Per-line problems of a ShareGPT file, as `path:line: reason` strings (empty when valid)."""
    report = []
    n = 0
    try:
        for where, obj in iter_file(path):
            n += 1
            problems = [obj.reason] if isinstance(obj, InputError) else check_row(obj, labels)
            report.extend(f"{path}:{where}: {p}" for p in problems)
    except InputError as e:
        return report + [str(e)]
    if n == 0:
        report.append(f"{path}: no conversations")
    return report
