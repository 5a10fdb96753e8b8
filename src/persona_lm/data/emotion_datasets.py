"""Emotion-labelled public dialogue data (GoEmotions, DailyDialog) as ShareGPT rows in our label set.

Both datasets have their own label names, so each gets a mapping table to the canonical persona labels.
GoEmotions' 28 labels follow the dataset authors' own Ekman grouping (goemotions/data/ekman_mapping.json),
except where our set has the finer label: love and caring stay `love`, curiosity stays `curiosity`.
DailyDialog's codes are Ekman labels already; "happiness" becomes `joy` and "no emotion" `neutral`.
A label whose canonical name is not in `persona.emotions` (a user can shrink the set) is a counted skip:
a GoEmotions comment is left out, a DailyDialog reply stays in its dialogue unlabelled.

DailyDialog dialogues become multi-turn conversations: speakers alternate human/gpt, and each gpt turn takes
its utterance's label. GoEmotions comments are single replies to a short neutral prompt, so the emotion is
carried by the reply alone; the prompt is picked from a few variants by a hash of the comment, which keeps
it deterministic and lets identical comments dedup. The dataset masks personal names as `[NAME]` (14% of the
training split) and religions as `[RELIGION]` (GoEmotions paper, section 3.1). A persona must not learn to say
"[NAME]", but dropping those comments would lose a seventh of the data, so each `[NAME]` becomes a given name
from `MASK_NAMES`, drawn by a hash of the comment and the mask's position (deterministic, and two masks in one
comment may be two people). `[RELIGION]` has no neutral stand-in, so those few comments are counted skips.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import re
from pathlib import Path

from persona_lm.data.sharegpt import make_row
from persona_lm.errors import InputError, Skips
from persona_lm.io import read_text

SOURCE = "emotion"

# Index order of the official emotions.txt (used when that file is not beside the .tsv).
GOEMOTIONS_LABELS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity",
    "desire", "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear", "gratitude",
    "grief", "joy", "love", "nervousness", "optimism", "pride", "realization", "relief", "remorse",
    "sadness", "surprise", "neutral",
)

GOEMOTIONS_TO_PERSONA = {
    "admiration": "joy", "amusement": "joy", "approval": "joy", "desire": "joy", "excitement": "joy",
    "gratitude": "joy", "joy": "joy", "optimism": "joy", "pride": "joy", "relief": "joy",
    "love": "love", "caring": "love",
    "sadness": "sadness", "disappointment": "sadness", "embarrassment": "sadness", "grief": "sadness",
    "remorse": "sadness",
    "anger": "anger", "annoyance": "anger", "disapproval": "anger",
    "fear": "fear", "nervousness": "fear",
    "surprise": "surprise", "realization": "surprise", "confusion": "surprise",
    "disgust": "disgust",
    "curiosity": "curiosity",
    "neutral": "neutral",
}

# DailyDialog emotion codes (dataset readme): 0 no emotion, 1 anger, 2 disgust, 3 fear, 4 happiness, ...
DAILYDIALOG_TO_PERSONA = {
    0: "neutral", 1: "anger", 2: "disgust", 3: "fear", 4: "joy", 5: "sadness", 6: "surprise",
}

PROMPTS = (
    "What's on your mind?",
    "How's it going?",
    "Tell me what you're thinking.",
    "Anything you want to share?",
)

# Stand-ins for GoEmotions' [NAME] mask: common given names from many languages, short and unambiguous as
# names, so a filled comment reads like the original did.
MASK_NAMES = (
    "Alex", "Maria", "James", "Aisha", "Chen", "Sofia", "Liam", "Priya", "Noah", "Emma", "Omar", "Hana",
    "Lucas", "Zoe", "Mateo", "Leila", "Daniel", "Yuki", "Ethan", "Grace", "Ivan", "Nadia", "Samuel", "Chloe",
    "Kofi", "Elena", "Ryan", "Mia", "Diego", "Sara", "Jonas", "Amara", "Felix", "Anna", "Ravi", "Julia",
    "Tom", "Lina", "Marco", "Ava",
)
_NAME_MASK = re.compile(r"\[NAME\]")
_RELIGION_MASK = "[RELIGION]"

# DailyDialog is tokenised ("Let ' s go , now .", "right.But", "Ma ’ am"); these undo it, in order.
# Apostrophes become ' (unless the utterance uses curly ‘quotes’). A quote that is left standing alone
# is rejoined as a pair when there are exactly two, and as a plural possessive ("five minutes' walk") when
# there is one after an s.
_DETOKENISE = [
    (re.compile(r"\s+([,.!?;:%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$£¥“‘])\s+"), r"\1"),
    (re.compile(r"\s+”"), "”"),
    (re.compile(r"(\w)\s*[’']\s*(s|t|re|ve|ll|d|m)\b", re.IGNORECASE), r"\1'\2"),
    (re.compile(r"\b(ma|o)\s*[’']\s*(am|clock)\b", re.IGNORECASE), r"\1'\2"),
    (re.compile(r"\b([OD]) ' (?=[A-Z])"), r"\1'"),
    (re.compile(r"([a-z][.!?])([A-Z])"), r"\1 \2"),
    (re.compile(r'"\s*([^"]*?)\s*"'), r'"\1"'),
    (re.compile(r"‘([^’]*?)\s+’"), r"‘\1’"),
]
_LONE_QUOTE = re.compile(r"(?<!\w)'|'(?!\w)")
_QUOTE_PAIR = re.compile(r"(?<!\w)'\s+([^']*?)\s+'(?!\w)")
_POSSESSIVE = re.compile(r"(?<=s) '(?= \w)")


def clean_dailydialog(text: str) -> str:
    text = " ".join(text.split())
    if "‘" not in text:
        text = text.replace("’", "'")
    for pattern, repl in _DETOKENISE:
        text = pattern.sub(repl, text)
    lone = len(_LONE_QUOTE.findall(text))
    if lone == 2:
        text = _QUOTE_PAIR.sub(r"'\1'", text)
    elif lone == 1:
        text = _POSSESSIVE.sub("'", text)
    return text


def _read(path: Path) -> str:
    """Text of a plain or gzipped file, with the same errors as persona_lm.io.read_text."""
    if path.suffix != ".gz":
        return read_text(path)
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, EOFError) as e:
        raise InputError(path, f"not a readable gzip file ({e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(path, "not valid UTF-8", line=data[: e.start].count(b"\n") + 1) from None


def _pick(key: str, choices: tuple[str, ...]) -> str:
    return choices[int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % len(choices)]


def _prompt(text: str) -> str:
    return _pick(text, PROMPTS)


def fill_name_masks(text: str) -> str:
    """`text` with each `[NAME]` replaced by a name from MASK_NAMES.

    The i-th mask's name is picked by SHA-1 of the comment and i, so the same comment always reads the same.
    """
    position = itertools.count()
    return _NAME_MASK.sub(lambda _: _pick(f"{text}\0{next(position)}", MASK_NAMES), text)


def read_goemotions(path: str | Path, labels: set[str], skips: Skips, max_rows: int | None = None) -> list[dict]:
    """A GoEmotions .tsv (`text<TAB>label ids<TAB>comment id`) -> one single-turn row per comment.

    A multi-label comment takes its first label whose canonical name is in `labels`. `[NAME]` masks are filled
    (see the module docstring).
    """
    path = Path(path)
    names_file = path.parent / "emotions.txt"
    names = read_text(names_file).split() if names_file.is_file() else list(GOEMOTIONS_LABELS)
    rows = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        parts = line.split("\t")
        try:
            ids = [int(i) for i in parts[1].split(",")] if len(parts) >= 2 else []
        except ValueError:
            ids = []
        if not ids or any(not 0 <= i < len(names) for i in ids):
            skips.add("goemotions: malformed line (expected text, label ids, comment id)", where)
            continue
        mapped = [GOEMOTIONS_TO_PERSONA.get(names[i]) for i in ids]
        label = next((m for m in mapped if m in labels), None)
        if label is None:
            skips.add(f"goemotions: label maps to {mapped[0]!r}, not in persona.emotions", where)
            continue
        text = " ".join(parts[0].split())
        if not text:
            skips.add("goemotions: empty text", where)
            continue
        if _RELIGION_MASK in text:
            skips.add("goemotions: [RELIGION] anonymisation mask in text", where)
            continue
        text = fill_name_masks(text)
        rows.append(make_row(SOURCE, [("human", _prompt(text)), ("gpt", text)], [label],
                             dataset="goemotions", origin=where))
    return rows


def dailydialog_labels_path(path: Path) -> Path:
    """dialogues_train.txt(.gz) -> dialogues_emotion_train.txt, dialogues_text.txt -> dialogues_emotion.txt."""
    stem = path.name.removesuffix(".gz").removesuffix(".txt")
    rest = stem.removeprefix("dialogues_text") if stem.startswith("dialogues_text") else stem.removeprefix("dialogues")
    name = f"dialogues_emotion{rest}.txt"
    for candidate in (path.parent / name, path.parent / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise InputError(path, f"DailyDialog emotion labels not found (expected {name} beside it)")


def iter_dailydialog(path: Path, skips: Skips):
    """(where, cleaned utterances, canonical emotion per utterance) of each well-formed dialogue of a DailyDialog
    file and its line-aligned labels file; malformed dialogues are counted skips. Raises InputError when the two
    files' line counts differ."""
    labels_path = dailydialog_labels_path(path)
    dialogues, codes = _read(path).splitlines(), _read(labels_path).splitlines()
    if len(dialogues) != len(codes):
        raise InputError(path, f"{len(dialogues)} dialogues but {len(codes)} label lines in {labels_path}")
    for lineno, (dialogue, code_line) in enumerate(zip(dialogues, codes), 1):
        if not dialogue.strip():
            continue
        where = f"{path}:{lineno}"
        utterances = [clean_dailydialog(u) for u in dialogue.split("__eou__")]
        if not utterances[-1]:
            utterances.pop()
        try:
            emotions = [DAILYDIALOG_TO_PERSONA[int(c)] for c in code_line.split()]
        except (ValueError, KeyError):
            skips.add("dailydialog: label line is not emotion codes 0-6", where)
            continue
        if len(emotions) != len(utterances):
            skips.add("dailydialog: utterance and label counts differ", where)
            continue
        if not all(utterances):
            skips.add("dailydialog: empty utterance", where)
            continue
        yield where, utterances, emotions


def read_dailydialog(path: str | Path, labels: set[str], skips: Skips, max_rows: int | None = None) -> list[dict]:
    """DailyDialog `dialogues_*.txt(.gz)` + its line-aligned `dialogues_emotion_*.txt` -> multi-turn rows.

    The first speaker is human, the second gpt. A trailing utterance with no reply is dropped. A reply whose
    label is not in `labels` stays in the conversation unlabelled, counted as a skipped label.
    """
    path = Path(path)
    rows = []
    for where, utterances, emotions in iter_dailydialog(path, skips):
        if max_rows is not None and len(rows) >= max_rows:
            break
        n = len(utterances) - len(utterances) % 2
        if n < 2:
            skips.add("dailydialog: fewer than two utterances", where)
            continue
        turns = [("human" if i % 2 == 0 else "gpt", utterances[i]) for i in range(n)]
        replies = []
        for e in emotions[1:n:2]:
            if e not in labels:
                skips.add(f"dailydialog: reply label {e!r} not in persona.emotions (left unlabelled)", where)
                e = None
            replies.append(e)
        rows.append(make_row(SOURCE, turns, replies, dataset="dailydialog", origin=where))
    return rows


def read_dataset(kind: str, path: str | Path, labels: set[str], skips: Skips,
                 max_rows: int | None = None) -> list[dict]:
    readers = {"goemotions": read_goemotions, "dailydialog": read_dailydialog}
    return readers[kind](path, labels, skips, max_rows)
