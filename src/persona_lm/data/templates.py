"""Persona dialogue templates: hand-written YAML in data/templates expanded into emotion-labelled rows.

The demo corpus has no dialogue in the persona's own voice, so a few hundred exchanges written for her,
multiplied by phrasing variants and slot values, are what teach the model who it is and how it talks.

Format. Every `*.yaml` file in the folder may hold three keys:

    slots:     {food: ["a cookie", ...], ...}    value lists, shared by all files; each slot defined once
    position:  first | any | last                where the file's templates may sit in a chained conversation
                                                 (default any: greetings come first, farewells last)
    templates: [...]                             the file's name (without .yaml) is their category

A template has an `id` (unique across files), an optional `position` overriding the file's, and either one
exchange written inline or a short dialogue under `turns`:

    - id: poke                                   - id: knock-knock
      user: ["*pokes {name}*", ...]                turns:
      reply:                                         - user: ["knock knock"]
        surprise: ["*jumps* Eep!", ...]                reply: {joy: ["Ooh! Who's there?"]}
        joy: ["Hehe, that tickles!", ...]            - user: [...]
                                                       reply: {...}

`user` lists phrasings of the human line; `reply` lists phrasings of the answer grouped by emotion label,
and every label must be one of params `persona.emotions`. Any line may use `{slot}`; `{name}` and `{user}`
are built in (params persona.name and persona.user_name), and so is every persona fact (`{home}` for
`persona.facts.home`), so no file ever spells the persona's name or facts: the identity check in evaluate
asks about the same facts, and a changed fact changes both.
Actions are ordinary text between asterisks, on either side: `*drags {name} to the corner*` -> `*wobbles*`.

Expansion. Each conversation opens with a random template, gets a budget of 1..max_turns exchanges (at
least the opener's length, so a joke keeps its punchline) and chains further templates that fit the rest
(not `first`, not a category already used) until the budget is spent or a `last` template ends it. Only a
dialogue longer than max_turns itself is cut, after a reply: every prefix of a dialogue is still one.
Each exchange takes one user phrasing and one reply phrasing (uniform over all reply phrasings), and each
slot takes one value per conversation, so "*gives {name} {food}*" and the reply name the same food. Row ids are conversation hashes that must be unique, so an exact repeat is resampled; when
the templates cannot yield that many distinct conversations the stage fails rather than pad with copies.
Everything is drawn from one `random.Random(seed)`, so the same seed gives byte-identical output. A row
carries one emotion label per reply, `template` and `category` (joined with "+" when chained) and no system
turn: the system prompt is added at training time.

Errors. Loading checks every file before expanding any: YAML syntax, unknown or missing keys, empty
variant lists, unknown slots, stray braces and unknown emotion labels are all reported together, one
`file:line: reason` per problem, as a TemplateError.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from persona_lm.data.sharegpt import make_row
from persona_lm.errors import InputError, PersonaError
from persona_lm.io import read_text

BUILTIN_SLOTS = ("name", "user")
POSITIONS = ("first", "any", "last")
SLOT = re.compile(r"\{(\w+)\}")
SENTENCE_START = re.compile(r"(^|[!?]\s+|[^.]\.\s+|\*\s+)$")  # "*gasps* {user}!" but not "That's... {food}"
ID = re.compile(r"^[A-Za-z0-9][\w-]*$")
ATTEMPTS_PER_ROW = 50


class TemplateError(PersonaError):
    """Every problem found in the template files; `problems` keeps each as an InputError."""

    def __init__(self, problems: list[InputError]):
        self.problems = problems
        head = f"{len(problems)} problem(s) in the persona templates:"
        super().__init__("\n".join([head] + [f"  {p}" for p in problems]))


@dataclass(frozen=True)
class Exchange:
    user: tuple[str, ...]
    replies: tuple[tuple[str, str], ...]  # (emotion, text) pairs


@dataclass(frozen=True)
class Template:
    id: str
    category: str
    position: str
    exchanges: tuple[Exchange, ...]


@dataclass(frozen=True)
class Bank:
    templates: tuple[Template, ...]
    slots: dict[str, tuple[str, ...]]

    @property
    def categories(self) -> list[str]:
        return sorted({t.category for t in self.templates})

    @property
    def emotions(self) -> list[str]:
        return sorted({e for t in self.templates for x in t.exchanges for e, _ in x.replies})


# ------------------------------------------------------------------------------------------------ YAML

class _Map(dict):
    """A YAML mapping that remembers the line of each key, so errors can point at the right line."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode):
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    data.update(loader.construct_mapping(node, deep=True))  # raises on unhashable keys
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in data.key_lines:
            # PyYAML keeps the last of two equal keys: a second `joy:` would silently drop the first's lines.
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {data.key_lines[key]})", key_node.start_mark)
        data.key_lines[key] = key_node.start_mark.line + 1


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


def _parse(path: Path, problems: list[InputError]):
    try:
        data = yaml.load(read_text(path), Loader=_Loader)
    except InputError as e:
        problems.append(e)
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = "not valid YAML: " + " ".join(str(s) for s in (e.context, e.problem) if s)
        problems.append(InputError(path, reason, line=mark.line + 1 if mark else None))
        return None
    except yaml.YAMLError as e:
        problems.append(InputError(path, f"not valid YAML: {e}"))
        return None
    if not isinstance(data, _Map):
        problems.append(InputError(path, "top level must be a mapping with 'slots' and/or 'templates'"))
        return None
    return data


# ------------------------------------------------------------------------------------------- checking

class _Checker:
    """Checks one file, recording each problem with its line; a helper returns None when it found one."""

    def __init__(self, path: Path, problems: list[InputError], slots: dict, labels: set[str],
                 builtins: tuple[str, ...] = BUILTIN_SLOTS):
        self.builtins = builtins
        self.path, self.problems, self.slots, self.labels = path, problems, slots, labels

    def fail(self, line: int | None, reason: str) -> None:
        self.problems.append(InputError(self.path, reason, line=line))

    def keys(self, m: _Map, allowed: set[str], required: set[str], what: str) -> bool:
        ok = True
        for k in m:
            if k not in allowed:
                self.fail(m.line_of(k), f"{what}: unknown key {k!r} (expected {', '.join(sorted(allowed))})")
                ok = False
        for k in sorted(required - set(m)):
            self.fail(m.line, f"{what}: missing key {k!r}")
            ok = False
        return ok

    def variants(self, m: _Map, key, what: str) -> tuple[str, ...] | None:
        v = m.get(key)
        if not isinstance(v, list) or not v:
            self.fail(m.line_of(key), f"{what}: '{key}' must be a non-empty list of phrasings")
            return None
        if not all(isinstance(s, str) and s.strip() for s in v):
            self.fail(m.line_of(key), f"{what}: '{key}' has an empty or non-text phrasing")
            return None
        return tuple(" ".join(s.split()) for s in v)

    def text(self, texts: tuple[str, ...], line: int, what: str) -> None:
        known = set(self.slots) | set(self.builtins)
        unknown = sorted({s for t in texts for s in SLOT.findall(t) if s not in known})
        if unknown:
            self.fail(line, f"{what}: unknown slot(s) {', '.join('{%s}' % s for s in unknown)} "
                            f"(defined: {', '.join('{%s}' % s for s in sorted(known))})")
        stray = [t for t in texts if set("{}") & set(SLOT.sub("", t))]
        if stray:
            self.fail(line, f"{what}: stray brace in {stray[0]!r} (a slot looks like {{food}})")

    def exchange(self, m, what: str, line: int) -> Exchange | None:
        before = len(self.problems)
        if not isinstance(m, _Map):
            self.fail(line, f"{what}: each turn must be a mapping with 'user' and 'reply'")
            return None
        if not self.keys(m, {"user", "reply"}, {"user", "reply"}, what):
            return None
        user = self.variants(m, "user", what)
        if user:
            self.text(user, m.line_of("user"), what)
        reply = m["reply"]
        if not isinstance(reply, _Map) or not reply:
            self.fail(m.line_of("reply"), f"{what}: 'reply' must map emotion labels to lists of phrasings")
            return None
        unknown = [e for e in reply if e not in self.labels]
        if unknown:
            known = ", ".join(sorted(self.labels))
            self.fail(reply.line_of(unknown[0]),
                      f"{what}: unknown emotion label(s) {sorted(map(str, unknown))} (persona.emotions: {known})")
        replies = []
        for emotion in reply:
            texts = self.variants(reply, emotion, what) or ()
            self.text(texts, reply.line_of(emotion), what)
            replies += [(str(emotion), t) for t in texts]
        if len(self.problems) > before:
            return None
        return Exchange(user, tuple(replies))

    def slot_defs(self, slots, defined: dict[str, str]) -> None:
        """Add this file's slots to the shared table; `defined` says where each one came from."""
        if not isinstance(slots, _Map):
            self.fail(None, "'slots' must map slot names to lists of values")
            return
        for name in slots:
            line = slots.line_of(name)
            if not isinstance(name, str) or not SLOT.fullmatch("{%s}" % name):
                self.fail(line, f"slot name {name!r} must be letters, digits and underscores")
            elif name in self.builtins:
                self.fail(line, f"slot {{{name}}} is built in (filled from params persona) and cannot be redefined")
            elif name in defined:
                self.fail(line, f"slot {{{name}}} is already defined in {defined[name]}")
            elif (values := self.variants(slots, name, f"slot {{{name}}}")) is not None:
                braced = [v for v in values if set("{}") & set(v)]
                if braced:
                    self.fail(line, f"slot {{{name}}}: values are plain text, no braces (got {braced[0]!r})")
                    continue
                defined[name] = f"{self.path}:{line}"
                self.slots[name] = values

    def template(self, t, i: int, position: str, seen: dict[str, str], line: int) -> Template | None:
        if not isinstance(t, _Map):
            self.fail(line, f"templates[{i}] must be a mapping")
            return None
        tid = t.get("id")
        what = f"template {tid!r}" if isinstance(tid, str) else f"templates[{i}]"
        if not self.keys(t, {"id", "position", "user", "reply", "turns"}, {"id"}, what):
            return None
        if not isinstance(tid, str) or not ID.match(tid):
            self.fail(t.line_of("id"), f"{what}: id must be letters, digits, '-' or '_'")
            return None
        if tid in seen:
            self.fail(t.line_of("id"), f"{what}: duplicate id (first in {seen[tid]})")
            return None
        seen[tid] = f"{self.path}:{t.line}"
        position = t.get("position", position)
        if position not in POSITIONS:
            self.fail(t.line_of("position"), f"{what}: position must be one of {', '.join(POSITIONS)}")
            return None
        if "turns" in t:
            if "user" in t or "reply" in t:
                self.fail(t.line, f"{what}: use either 'turns' or 'user'/'reply', not both")
                return None
            turns = t["turns"]
            if not isinstance(turns, list) or not turns:
                self.fail(t.line_of("turns"), f"{what}: 'turns' must be a non-empty list of exchanges")
                return None
        else:
            inline = _Map({k: t[k] for k in ("user", "reply") if k in t})
            inline.line, inline.key_lines = t.line, t.key_lines
            turns = [inline]
        exchanges = [self.exchange(x, what, t.line_of("turns")) for x in turns]
        if not all(exchanges):
            return None
        return Template(tid, self.path.stem, position, tuple(exchanges))


def load(folder: str | Path, labels, facts=()) -> Bank:
    """Read and check every template file in `folder`; raise TemplateError listing every problem.
    `facts`: the persona fact keys, built-in slots like {name}."""
    builtins = BUILTIN_SLOTS + tuple(k for k in facts if k not in BUILTIN_SLOTS)
    folder = Path(folder)
    labels = set(labels)
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        raise TemplateError([InputError(folder, "no *.yaml template files found")])
    problems: list[InputError] = []
    docs = [(path, _parse(path, problems)) for path in files]
    docs = [(path, doc) for path, doc in docs if doc is not None]

    slots: dict[str, tuple[str, ...]] = {}
    defined: dict[str, str] = {}
    for path, doc in docs:  # slots first: any file may use a slot another file defines
        c = _Checker(path, problems, slots, labels, builtins)
        c.keys(doc, {"slots", "position", "templates"}, set(), "file")
        if "slots" in doc:
            c.slot_defs(doc["slots"], defined)

    templates: list[Template] = []
    seen: dict[str, str] = {}
    for path, doc in docs:
        c = _Checker(path, problems, slots, labels, builtins)
        position = doc.get("position", "any")
        if position not in POSITIONS:
            c.fail(doc.line_of("position"), f"position must be one of {', '.join(POSITIONS)} (got {position!r})")
            continue
        items = doc.get("templates", [])
        if not isinstance(items, list):
            c.fail(doc.line_of("templates"), "'templates' must be a list")
            continue
        found = [c.template(t, i, position, seen, doc.line_of("templates")) for i, t in enumerate(items)]
        templates += [t for t in found if t]
    if problems:
        raise TemplateError(problems)
    if not templates:
        raise TemplateError([InputError(folder, "no templates defined (only slots)")])
    return Bank(tuple(templates), slots)


# ------------------------------------------------------------------------------------------ expansion

def _fill(text: str, values: dict[str, str], slots: dict, rng: random.Random) -> str:
    """Fill each slot, drawing a value on its first use; a slot that opens a sentence is capitalised."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            values[key] = rng.choice(slots[key])
        value = values[key]
        if SENTENCE_START.search(text, 0, m.start()):
            value = value[:1].upper() + value[1:]
        return value

    return SLOT.sub(sub, text)


def _conversation(bank: Bank, max_turns: int, rng: random.Random, name: str, user: str, facts: dict):
    """One chain of templates and its rendered turns; only a dialogue longer than max_turns is ever cut."""
    first = rng.choice(bank.templates)
    budget = max(rng.randint(1, max_turns), min(len(first.exchanges), max_turns))
    chain = [first]
    length = min(len(first.exchanges), budget)
    while length < budget and chain[-1].position != "last":
        used = {t.category for t in chain}
        options = [t for t in bank.templates if t.position != "first" and t.category not in used
                   and len(t.exchanges) <= budget - length]
        if not options:
            break
        chain.append(rng.choice(options))
        length += len(chain[-1].exchanges)

    values = {**facts, "name": name, "user": user}
    turns, emotions = [], []
    for x in [x for t in chain for x in t.exchanges][:budget]:
        emotion, reply = rng.choice(x.replies)
        turns += [("human", _fill(rng.choice(x.user), values, bank.slots, rng)),
                  ("gpt", _fill(reply, values, bank.slots, rng))]
        emotions.append(emotion)
    return turns, emotions, chain


def expand(bank: Bank, n: int, max_turns: int, seed: int, name: str, user: str,
           facts: dict[str, str] | None = None) -> list[dict]:
    """Exactly `n` distinct ShareGPT rows (no system turn: that is added at training time); `facts` fills
    the persona fact slots."""
    facts = facts or {}
    rng = random.Random(seed)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > ATTEMPTS_PER_ROW * n:
            raise PersonaError(
                f"the templates yield only {len(rows)} distinct conversations in {attempts - 1} draws, "
                f"fewer than templates.conversations={n}: lower it or add templates, phrasings or slot values")
        turns, emotions, chain = _conversation(bank, max_turns, rng, name, user, facts)
        row = make_row("templates", turns, emotions, template="+".join(t.id for t in chain),
                       category="+".join(t.category for t in chain))
        if row["id"] in seen:
            continue
        seen.add(row["id"])
        rows.append(row)
    return rows
