"""The ShareGPT row: the one dialogue format every data stage writes and every training phase reads.

A row is `{"id", "source", "conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
"emotions": [label or None for each gpt turn]}`. Messages carry exactly `from` and `value` (unsloth's
reader rejects more); labels and provenance are top-level fields of the row.

Files as people download them come as JSON lines, a JSON array or one JSON value, whatever their name says;
their rows are objects with a `conversations`, `messages` or `conversation` list, or bare lists of turns.
`read_sharegpt` is the one reader of such files, behind both build_sharegpt (`sharegpt.extra`) and
`persona-lm sharegpt-check`, so the check accepts exactly what the pipeline reads. It cites every refused
row as `file:line`, counts every fix `import_conversation` makes to another tool's dialect (role names,
split turns, a leading assistant greeting), and fails a file of which nothing is usable with one error
that names the layout it saw.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
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

# The keys a row's list of turns goes by in the wild, in the order they are looked for.
TURN_KEYS = ("conversations", "messages", "conversation")


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


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages that say what was found instead."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _turn_list(obj: Any) -> list:
    """The raw turns of one conversation: a bare list of turns, or the first of TURN_KEYS a row has."""
    if isinstance(obj, list):
        if not obj:
            raise ValueError("an empty list of turns")
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"not a conversation but a JSON {_kind(obj)}")
    key = next((k for k in TURN_KEYS if k in obj), None)
    if key is None:
        raise ValueError("no 'conversations' list (nor 'messages' or 'conversation')")
    turns = obj[key]
    if not isinstance(turns, list):
        raise ValueError(f"'{key}' is a JSON {_kind(turns)}, not a list of turns")
    if not turns:
        raise ValueError(f"'{key}' is an empty list")
    return turns


def import_conversation(obj: Any, notes: Counter | None = None) -> list[dict]:
    """One conversation from another tool's dialect -> our strict turns; ValueError(reason) if unusable.

    `obj` is a bare list of turns or a row with a `conversations`, `messages` or `conversation` list; turns
    carry `from`/`value` (ShareGPT) or `role`/`content` (OpenAI). Every fix is counted in `notes`:
    - role spellings of the common tools, in any case, are mapped to ours (ROLE_ALIASES); other per-message
      keys (e.g. "markdown") are dropped;
    - consecutive turns of one side are joined with a newline into one turn, as the messages importer does
      for chat bubbles, since texting data sends one thought in several messages;
    - a leading gpt turn (a greeting with nothing to answer) is dropped, any system prompt before it kept,
      because training on a reply needs a human turn before it.
    Unknown roles, non-text and empty values refuse the whole conversation: patching them would teach the
    model a dialogue that never happened.
    """
    notes = notes if notes is not None else Counter()
    out: list[dict] = []
    for m in _turn_list(obj):
        if not isinstance(m, dict):
            raise ValueError(f"a turn is a JSON {_kind(m)}, not an object")
        spelt = m.get("from", m.get("role"))
        value = m.get("value", m.get("content"))
        role = ROLE_ALIASES.get(spelt.strip().lower()) if isinstance(spelt, str) else None
        if role is None:
            raise ValueError(f"unknown role {spelt!r}")
        if value is None:
            raise ValueError("a turn without 'value' or 'content'")
        if not isinstance(value, str):
            raise ValueError(f"value is a JSON {_kind(value)}, not text")
        if not value.strip():
            raise ValueError("empty value")
        if spelt != role:
            notes[f"role {spelt} -> {role}"] += 1
        if out and out[-1]["from"] == role:
            out[-1]["value"] += "\n" + value
            notes[f"consecutive {role} turns joined"] += 1
        else:
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


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _iter_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Items of a JSON array with the line each starts on; a syntax error anywhere is an InputError."""
    decoder = json.JSONDecoder()
    n, pos, line, counted = len(text), text.index("[") + 1, 1, 0

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(msg: str, at: int):
        return InputError(path, f"invalid JSON: {msg}", line=_line_at(text, at))

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        if skip_ws(pos + 1) != n:
            raise fail("extra data after the array", skip_ws(pos + 1))
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


def _is_turn(obj: Any) -> bool:
    return isinstance(obj, dict) and ("from" in obj or "role" in obj) and not any(k in obj for k in TURN_KEYS)


def _document(path: Path, text: str) -> tuple[str, list[tuple[int, Any]]]:
    """(layout, items) of a text that is one JSON value; InputError with its line when it is not.

    An array's items are the conversations, except that an array of turn objects is one conversation.
    """
    start = len(text) - len(text.lstrip())
    if text[start] == "[":
        items = list(_iter_array(path, text))
        if items and all(_is_turn(obj) for _, obj in items):
            return f"a JSON array of {len(items)} turns (one conversation)", [(items[0][0], [o for _, o in items])]
        return f"a JSON array of {len(items)} items", items
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg}", line=_line_at(text, e.pos)) from None
    rest = len(text) - len(text[end:].lstrip())
    if rest < len(text):
        raise InputError(path, "invalid JSON: extra data after the first value", line=_line_at(text, rest))
    return "one JSON value", [(_line_at(text, start), obj)]


def _first_line_is_json(text: str) -> bool:
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        return isinstance(json.loads(line), (dict, list))
    except json.JSONDecodeError:
        return False


def _json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line, object) per non-blank line; a line that does not parse is an InputError item, not a failure."""
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                items.append((lineno, InputError(path, f"invalid JSON: {e.msg}", line=lineno)))
    return items


def _items(path: Path) -> tuple[str, list[tuple[int, Any]]]:
    """(layout, [(line, object or InputError)]) of a file, by its content whatever its name.

    A text that is one JSON value is a JSON document (downloads named .jsonl are often arrays). Otherwise it
    is JSON lines when its first non-blank line is a JSON object or array on its own, which a pretty-printed
    document's never is; then each broken line is an item of its own, so one bad row costs only that row.
    Anything else is the document's syntax error, with its line.
    """
    text = read_text(path)
    if not text.strip():
        return "an empty file", []
    try:
        return _document(path, text)
    except InputError:
        if not _first_line_is_json(text):
            raise
    items = _json_lines(path, text)
    return f"JSON lines, {len(items)} rows", items


def iter_file(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, object) from a ShareGPT file: JSON lines, a JSON array or one JSON value (see `_items`).

    A broken JSON line is yielded as an InputError so callers can count or report it; a syntax error in a
    JSON document makes the whole file unreadable and is raised, as is an unreadable file.
    """
    yield from _items(Path(path))[1]


@dataclass
class Conversation:
    """One usable conversation of a file: the line it starts on, our strict turns, the row fields kept."""
    line: int
    turns: list[dict]
    emotions: list[str | None] | None = None
    original_id: str | None = None


@dataclass
class ShareGPTFile:
    """What `read_sharegpt` made of one file: the usable conversations, the refused rows as (line, reason),
    and the count of every fix applied to the usable ones."""
    path: str
    layout: str
    conversations: list[Conversation] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)

    def report(self) -> list[str]:
        """The refused rows as `path:line: reason`, in file order."""
        return [f"{self.path}:{line}: {reason}" for line, reason in self.refused]

    def summary(self) -> str:
        n, total = len(self.conversations), len(self.conversations) + len(self.refused)
        head = f"ok: {n} conversation{'s' * (n != 1)}" if not self.refused else f"{n} of {total} rows usable"
        fixed = ", ".join(f"{k} ({v})" for k, v in sorted(self.notes.items()))
        return f"{head} ({self.layout})" + (f"; fixed: {fixed}" if fixed else "")


def _emotions(obj: Any, turns: list[dict], labels: set[str] | None, notes: Counter) -> list[str | None] | None:
    """The row's own emotion labels (our output re-imported) when they still fit its gpt turns, else None."""
    emotions = obj.get("emotions") if isinstance(obj, dict) else None
    if emotions is None:
        return None
    n_gpt = sum(m["from"] == "gpt" for m in turns)
    if (notes["consecutive gpt turns joined"] or notes["leading gpt turn dropped"]
            or not isinstance(emotions, list) or len(emotions) != n_gpt):
        notes["emotions dropped: not one label per gpt turn"] += 1
        return None
    if any(e is not None and not (isinstance(e, str) and (labels is None or e in labels)) for e in emotions):
        notes["emotions dropped: unknown label"] += 1
        return None
    return list(emotions)


def _shape(obj: Any) -> str:
    """What an item looks like, e.g. "a list of objects with keys from/value"."""
    def keys(dicts: list[dict]) -> str:
        names = list(dict.fromkeys(k for d in dicts for k in d))
        return "/".join(map(str, names[:8])) + ("/..." if len(names) > 8 else "")

    if isinstance(obj, dict):
        return f"an object with keys {keys([obj])}" if obj else "an empty object"
    if isinstance(obj, list):
        if obj and all(isinstance(m, dict) for m in obj):
            return f"a list of objects with keys {keys(obj)}"
        return f"a list of {'/'.join(sorted({_kind(m) for m in obj}))}" if obj else "an empty list"
    return f"a JSON {_kind(obj)}"


def _nothing_usable(layout: str, items: list[tuple[int, Any]], refused: list[tuple[int, str]]) -> str:
    """The one error of a file no conversation could be read from: its layout and the commonest reasons."""
    if not items:
        return f"no ShareGPT conversations ({layout})"
    shapes = Counter(_shape(obj) for _, obj in items if not isinstance(obj, InputError))
    if len(items) == 1 or len(shapes) == 0:
        seen = ", " + next(iter(shapes)) if shapes else ""
    elif len(shapes) == 1:
        seen = ", each " + next(iter(shapes))
    else:
        seen = ", such as " + "; ".join(f"{s} ({n})" for s, n in shapes.most_common(2))
    first: dict[str, int] = {}
    for line, reason in refused:
        first.setdefault(reason, line)
    counts = Counter(reason for _, reason in refused)
    why = "; ".join(f"{r} ({n} rows, first at line {first[r]})" if n > 1 else f"{r} (line {first[r]})"
                    for r, n in counts.most_common(3))
    more = f"; and {len(counts) - 3} other reasons" if len(counts) > 3 else ""
    return f"{layout}{seen}: no conversation could be read: {why}{more}"


def read_sharegpt(path: str | Path, labels: set[str] | None = None) -> ShareGPTFile:
    """Every conversation of a ShareGPT file from the wild, as build_sharegpt and `sharegpt-check` read it.

    Each row is imported by `import_conversation` (its fixes counted in `notes`) or refused with a reason and
    its line. Row ids are kept as `original_id`; emotion labels only while they still fit the gpt turns and,
    given `labels`, are known (else dropped and counted). Raises InputError naming the file when it cannot be
    read, and, naming the layout it saw and why rows were refused, when no conversation at all is usable:
    a file of which nothing is usable is a wrong layout or a failed download, not a run of bad rows.
    """
    layout, items = _items(Path(path))
    got = ShareGPTFile(str(path), layout)
    for line, obj in items:
        if isinstance(obj, InputError):
            got.refused.append((line, obj.reason))
            continue
        notes: Counter = Counter()
        try:
            turns = import_conversation(obj, notes)
        except ValueError as e:
            got.refused.append((line, str(e)))
            continue
        emotions = _emotions(obj, turns, labels, notes)
        got.notes.update(notes)
        row_id = obj.get("id") if isinstance(obj, dict) else None
        got.conversations.append(Conversation(line, turns, emotions,
                                              str(row_id) if type(row_id) in (str, int) else None))
    if not got.conversations:
        raise InputError(path, _nothing_usable(layout, items, got.refused))
    return got


def check_file(path: str | Path, labels: set[str] | None = None) -> list[str]:
    """`path:line: reason` for every row of a file that build_sharegpt would skip, or the one error that fails
    the whole file; empty when every row is usable. A thin report over `read_sharegpt`, so the check accepts
    exactly what the pipeline reads."""
    try:
        return read_sharegpt(path, labels).report()
    except InputError as e:
        return [str(e)]
