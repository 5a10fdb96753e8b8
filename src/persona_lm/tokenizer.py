"""Tokenizer training and loading (HF `tokenizers`), special tokens, and the chat template.

Two kinds are trained here: byte-level BPE (any text round-trips, no unknown tokens) and character-level
(`tokenizer.kind: char`, for nanoGPT-style experiments). Special tokens never split or merge, and user text can
never produce one: content is always encoded with `encode_special_tokens=True`, so a literal "<|user|>" typed
by a user is ordinary text; special ids are only ever inserted by `render`.

A run on a pretrained base uses the base's own tokenizer and chat template instead (`TemplateTokenizer`, same
interface); `load_tokenizer` reads either kind from a folder.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from persona_lm.errors import PersonaError
from persona_lm.io import atomic_path, write_json

EOT, PAD = "<|endoftext|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ACTION_OPEN, ACTION_CLOSE = "<|action|>", "<|/action|>"
ROLE_TOKEN = {"system": SYSTEM, "human": USER, "gpt": ASSISTANT}
UNK = "<|unk|>"
_ACTION = re.compile(r"\*([^*\n]{1,200})\*")


# Our chat format as a Jinja chat template, for tools that render conversations themselves (exports, and bases
# that come without a template). It renders exactly what ChatTokenizer.render/prompt produce, except that a
# template cannot turn `*action*` spans into action markers.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM +
    "{%- elif message['role'] == 'user' -%}" + USER +
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT +
    "{%- else -%}{{ raise_exception('unknown role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{{- message['content'] -}}" + END +
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def chat_template(system_prompt: str | None = None) -> str:
    """CHAT_TEMPLATE; with `system_prompt`, a conversation that does not open with a system message gets that one
    first, as `chat` and `serve` give it (for tools that only have the template: llama.cpp, LM Studio). The prompt
    is literal template text, so one containing a Jinja delimiter gets the plain template."""
    if not system_prompt or any(d in system_prompt for d in ("{{", "{%", "{#", "}}", "%}", "#}")):
        return CHAT_TEMPLATE
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}" + SYSTEM + system_prompt + END
            + "{%- endif -%}" + CHAT_TEMPLATE)


def emotion_token(label: str) -> str:
    return f"<|emotion:{label}|>"


def special_tokens(emotions: Iterable[str]) -> list[str]:
    return [EOT, PAD, SYSTEM, USER, ASSISTANT, END, ACTION_OPEN, ACTION_CLOSE] + [emotion_token(e) for e in emotions]


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, emotions: list[str],
                    min_frequency: int = 2) -> Tokenizer:
    specials = special_tokens(emotions)
    if kind == "char":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        chars = sorted(seen)
        vocab = {tok: i for i, tok in enumerate(specials + [UNK] + chars)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
        # isolate every character so BPE never sees long "words"; Fuse joins the pieces back on decode
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(specials)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tok.save(str(tmp))


class ChatTokenizer:
    """A trained tokenizer plus the chat template: text <-> ids, conversations -> ids and loss mask."""

    decode_needs_context = False  # byte-level BPE: a token decodes the same wherever it stands

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.tok.encode_special_tokens = True
        self.vocab_size = tok.get_vocab_size()
        vocab = tok.get_vocab()
        self.eot, self.pad, self.end = vocab[EOT], vocab[PAD], vocab[END]
        self.role = {r: vocab[t] for r, t in ROLE_TOKEN.items()}
        self.action_open, self.action_close = vocab[ACTION_OPEN], vocab[ACTION_CLOSE]
        self.emotion_ids = {m.group(1): i for t, i in vocab.items() if (m := re.fullmatch(r"<\|emotion:(.+)\|>", t))}
        self.special_ids = {i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
        # a reply ends at <|end|>; <|endoftext|> and a role marker can never be part of one either
        self.stop_ids = {self.end, self.eot, *self.role.values()}

    @classmethod
    def from_file(cls, path: str | Path) -> "ChatTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids; special-token strings inside `text` stay ordinary text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; action markers come back as *...*, other special tokens are dropped."""
        out, chunk = [], []
        for i in ids:
            if i in (self.action_open, self.action_close):
                out.append(self.tok.decode(chunk, skip_special_tokens=True))
                out.append("*")
                chunk = []
            else:
                chunk.append(i)
        out.append(self.tok.decode(chunk, skip_special_tokens=True))
        return "".join(out)

    def encode_content(self, text: str) -> list[int]:
        """A message body: `*action*` spans become action markers so actions are atomic in the model's eyes."""
        ids, pos = [], 0
        for m in _ACTION.finditer(text):
            ids += self.encode(text[pos:m.start()]) + [self.action_open] + self.encode(m.group(1)) + [self.action_close]
            pos = m.end()
        return ids + self.encode(text[pos:])

    def render(self, turns: list[dict], emotions: list[str | None] | None = None,
               emotion_prefix: bool = False) -> tuple[list[int], list[int], list[int]]:
        """Render ShareGPT turns as `<|role|> content <|end|>` blocks.

        With `emotion_prefix`, a labelled reply starts with its emotion token as *input* (not a target): the
        model learns to speak in a requested mood, and the emotion head never sees the answer in its context.
        Returns (ids, mask, reply_ends): mask is 1 on tokens the model must learn to produce (reply content
        and its <|end|>); reply_ends holds the index of each gpt turn's <|end|> token.
        """
        ids, mask, ends = [], [], []
        labels = iter(emotions or [])
        for m in turns:
            role = m["from"]
            ids.append(self.role[role])
            mask.append(0)
            if role == "gpt":
                label = next(labels, None)
                if emotion_prefix and label in self.emotion_ids:
                    ids.append(self.emotion_ids[label])
                    mask.append(0)
            body = self.encode_content(m["value"]) + [self.end]
            ids += body
            mask += [1 if role == "gpt" else 0] * len(body)
            if role == "gpt":
                ends.append(len(ids) - 1)
        return ids, mask, ends

    def prompt(self, turns: list[dict], emotion: str | None = None) -> list[int]:
        """A conversation ending in a user turn plus the assistant marker (and an optional requested mood)."""
        ids, _, _ = self.render(turns)
        return ids + [self.role["gpt"]] + ([self.emotion_ids[emotion]] if emotion else [])


def iter_texts(rows: Iterable[dict]) -> Iterator[str]:
    for row in rows:
        for m in row["conversations"]:
            yield m["value"]


# ------------------------------------------------------------------------------------------ a base's tokenizer

_ROLE = {"system": "system", "human": "user", "gpt": "assistant"}
_SLOT = "PersonaLmSlot{}x"  # stands in for a message's content while the template's own text is located
# Llama 3.x templates print today's date unless they are given one; a fixed date keeps runs reproducible
# (this is the date those templates fall back to themselves).
_DATE = "26 Jul 2024"
_PROBE = [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi there!"},
          {"from": "gpt", "value": "Hello, friend."}, {"from": "human", "value": "How are you?"},
          {"from": "gpt", "value": "Fine, thanks."}]


class TemplateTokenizer:
    """A pretrained base's tokenizer and chat template behind ChatTokenizer's interface.

    Conversations are rendered by the base's own Jinja chat template (through transformers) and the rendered
    text is tokenized as a whole, as `apply_chat_template` does, so the ids trained on are the ids a user's
    tools produce for the exported model. Where each message's content lies in that text is learnt by rendering
    the same roles with placeholder contents; the loss mask then covers each assistant reply and the marker the
    template closes it with (`close`, e.g. `<|im_end|>`), whose first token is `end`. A message containing a
    special-token string is tokenized piece by piece instead, its content with special tokens disabled, so typed
    text never becomes a control token.

    Emotion and action markers (`markers`) are plain text (`[joy]` before a reply, `*waves*` as written) or
    special tokens added to the vocabulary, whose embedding rows are then trained. A base without a chat
    template gets ours (CHAT_TEMPLATE), its role and end markers added as special tokens.
    """

    def __init__(self, hf, info: dict):
        self.hf, self.info = hf, info
        self.tok = hf.backend_tokenizer                      # parses special-token strings (template text)
        self.text_tok = Tokenizer.from_str(self.tok.to_str())  # never does (message content)
        self.text_tok.encode_special_tokens = True
        self.markers, self.close = info["markers"], info["close"]
        self.end, self.eot, self.pad = info["end"], info["eot"], info["pad"]
        self.stop_ids = set(info["stop_ids"])
        self.vocab_size = len(hf)
        self.marker_ids = info["marker_ids"]  # control tokens whose embedding rows are trained (see build)
        self.special_ids = {i for i, t in hf.added_tokens_decoder.items() if t.special} | set(hf.all_special_ids)
        vocab = hf.get_vocab()
        if self.markers == "tokens":
            self.emotion_ids = {e: vocab[emotion_token(e)] for e in info["emotions"]}
            self.action_open, self.action_close = vocab[ACTION_OPEN], vocab[ACTION_CLOSE]
        else:
            self.emotion_ids = {}
        # sentencepiece-style decoders drop a word's leading space at the start of a decode: TextStream then
        # decodes each new piece after one token of context
        self.decode_needs_context = type(self.tok.decoder).__name__ != "ByteLevel"

    # -------------------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, folder: str | Path, markers: str, emotions: list[str], base: dict) -> "TemplateTokenizer":
        """The tokenizer of the base model in `folder`, with our markers added as `markers` asks.
        Raises PersonaError when the template cannot be used (it drops or rewrites message content, or renders
        the start of a conversation differently once more turns follow)."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises many kinds; the message is what the user needs
            raise PersonaError(f"base.model: cannot load the tokenizer of {base['model']}: {e}") from None
        n_before = len(hf)
        own_template = not hf.chat_template
        new = []
        if own_template:
            hf.chat_template = CHAT_TEMPLATE
            new += [SYSTEM, USER, ASSISTANT, END]
        if markers == "tokens":
            new += [ACTION_OPEN, ACTION_CLOSE] + [emotion_token(e) for e in emotions]
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
        vocab = hf.get_vocab()
        info = {"kind": "template", "markers": markers, "emotions": emotions, "own_template": own_template,
                "new_tokens": len(hf) - n_before, "base": base}
        probe = cls(hf, {**info, "marker_ids": [], "close": "", "end": 0, "eot": 0, "pad": 0, "stop_ids": []})
        info["close"] = close = probe._close(base["model"])
        # The rows of every control token a conversation uses are trained: ours, and the template's own (role
        # headers, end of turn), which a base that never learnt its template (a base rather than an instruct
        # model, or an export of a model only pretrained) needs; it costs a few embedding rows.
        template = "".join(probe._layout(tuple(_ROLE[m["from"]] for m in _PROBE), True))
        used = set(probe.tok.encode(template, add_special_tokens=False).ids) & probe.special_ids
        info["marker_ids"] = sorted(used | {vocab[t] for t in new})
        end = probe.tok.encode(close, add_special_tokens=False).ids[0]
        eos = hf.eos_token_id if hf.eos_token_id is not None else end
        stop = {end, eos}
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            ids = json.loads(gen.read_text()).get("eos_token_id")
            stop |= set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        # Batches are right-padded and padding is never a target, so any id serves; the end-of-text id rather
        # than the base's pad id, which GPT-2 models take as a sign of a missing attention mask (a needless
        # warning: with the padding after the text, causal attention never reads it).
        info.update(end=end, eot=eos, stop_ids=sorted(stop), pad=eos)
        tok = cls(hf, info)
        tok._check(base["model"])
        return tok

    def _close(self, name: str) -> str:
        """The text the template ends an assistant turn with, up to and including its first special token."""
        segments = self._layout(("user", "assistant"), False, name)
        close = segments[-1]
        specials = [t.content for t in self.hf.added_tokens_decoder.values() if t.special]
        cut = min((close.find(s) + len(s) for s in specials if s and close.find(s) >= 0), default=len(close.rstrip()))
        close = close[:cut]
        if not close.strip():
            raise PersonaError(f"base.model: the chat template of {name} ends an assistant turn with nothing, so a "
                               "reply could never end; use a base with a chat template that closes turns")
        return close

    def _check(self, name: str) -> None:
        """Our ids must be the template's own, and generation continues `prompt(turns)`, which must be exactly
        how training saw the start of each reply."""
        full, _, _ = self.render(_PROBE)
        messages = [{"role": _ROLE[m["from"]], "content": m["value"]} for m in _PROBE]
        if full != self.tok.encode(self._apply(messages, False), add_special_tokens=False).ids:
            raise PersonaError(f"base.model: the chat template of {name} rewrites message content, so persona-lm "
                               "cannot reproduce what it renders")
        for k in range(1, len(_PROBE)):
            if _PROBE[k]["from"] == "gpt" and full[:len(head := self.prompt(_PROBE[:k]))] != head:
                raise PersonaError(f"base.model: the chat template of {name} renders the start of a conversation "
                                   "differently once more turns follow, so training and chatting would disagree")

    def save(self, folder: str | Path) -> None:
        """The tokenizer files (transformers' layout, chat template included) plus our chat.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        write_json(folder / "chat.json", self.info)

    @classmethod
    def load(cls, folder: str | Path) -> "TemplateTokenizer":
        from transformers import AutoTokenizer

        folder = Path(folder)
        return cls(AutoTokenizer.from_pretrained(str(folder)), json.loads((folder / "chat.json").read_text()))

    # ---------------------------------------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        return self.text_tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.text_tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; with token markers, action markers come back as *...*; special tokens are dropped."""
        if self.markers != "tokens":
            return self.tok.decode(list(ids), skip_special_tokens=True)
        out, chunk = [], []
        for i in ids:
            if i in (self.action_open, self.action_close):
                out += [self.tok.decode(chunk, skip_special_tokens=True), "*"]
                chunk = []
            else:
                chunk.append(i)
        return "".join(out + [self.tok.decode(chunk, skip_special_tokens=True)])

    def encode_content(self, text: str) -> list[int]:
        """A message body; with token markers, `*action*` spans become action markers."""
        if self.markers != "tokens":
            return self.encode(text)
        ids, pos = [], 0
        for m in _ACTION.finditer(text):
            ids += self.encode(text[pos:m.start()]) + [self.action_open] + self.encode(m.group(1)) + [self.action_close]
            pos = m.end()
        return ids + self.encode(text[pos:])

    # ------------------------------------------------------------------------------------- conversations

    def render(self, turns: list[dict], emotions: list[str | None] | None = None,
               emotion_prefix: bool = False) -> tuple[list[int], list[int], list[int]]:
        """(ids, mask, reply_ends) as ChatTokenizer.render: mask 1 on each reply and its closing marker,
        reply_ends the index of each reply's `end` token; a requested emotion (`emotion_prefix`) is input only."""
        labels = iter(emotions or [])
        prefixes = []
        for m in turns:
            label = next(labels, None) if m["from"] == "gpt" else None
            prefixes.append(self._emotion_text(label) if emotion_prefix and label in self.info["emotions"] else "")
        return self._encode(turns, prefixes, False)

    def prompt(self, turns: list[dict], emotion: str | None = None) -> list[int]:
        """The conversation, ending in a user turn, plus the template's assistant header (and a requested mood)."""
        return self._encode(turns, [""] * len(turns), True, self._emotion_text(emotion) if emotion else "")[0]

    def _emotion_text(self, label: str) -> str:
        return emotion_token(label) if self.markers == "tokens" else f"[{label}]\n"

    @functools.lru_cache(maxsize=256)
    def _layout(self, roles: tuple[str, ...], generation_prompt: bool, name: str = "the base") -> list[str]:
        """The template's own text around the messages: len(roles) + 1 strings."""
        text = self._apply([{"role": r, "content": _SLOT.format(i)} for i, r in enumerate(roles)], generation_prompt)
        out, pos = [], 0
        for i in range(len(roles)):
            slot = _SLOT.format(i)
            at = text.find(slot, pos)
            if at < 0 or text.count(slot) != 1:
                raise PersonaError(f"base.model: the chat template of {name} drops, repeats, reorders or rewrites "
                                   "message content, so persona-lm cannot find the replies to train on in what it "
                                   "renders")
            out.append(text[pos:at])
            pos = at + len(slot)
        out.append(text[pos:])
        return out

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                               date_string=_DATE)
        except Exception as e:  # a template's raise_exception(), e.g. for a role it does not support
            raise PersonaError(f"base.model: its chat template refused the conversation: {e}") from None

    def _encode(self, turns: list[dict], prefixes: list[str], generation_prompt: bool,
                tail: str = "") -> tuple[list[int], list[int], list[int]]:
        segments = self._layout(tuple(_ROLE[m["from"]] for m in turns), generation_prompt)
        pieces = [(segments[0], "template")]  # kinds: template, content, reply (a target), close (a target)
        for m, prefix, after in zip(turns, prefixes, segments[1:]):
            # templates such as Llama 3's trim content; trimming always keeps our text equal to theirs
            body = m["value"].strip()
            if prefix:
                pieces.append((prefix, "template"))
            if m["from"] != "gpt":
                pieces += [(body, "content"), (after, "template")]
                continue
            if not after.startswith(self.close):
                raise PersonaError(f"base chat template: an assistant turn is not closed with {self.close!r}")
            pieces += [(body, "reply"), (self.close, "close"), (after[len(self.close):], "template")]
        if tail:
            pieces.append((tail, "template"))
        if any(s in text for text, kind in pieces if kind in ("content", "reply") for s in self._specials):
            return self._encode_pieces(pieces)
        texts = [self._marked(t) if kind in ("content", "reply") else t for t, kind in pieces]
        enc = self.tok.encode("".join(texts), add_special_tokens=False)
        starts, stops = [s for s, _ in enc.offsets], [e for _, e in enc.offsets]
        mask, ends, pos = [0] * len(enc.ids), [], 0
        for text, (_, kind) in zip(texts, pieces):
            a, b, pos = pos, pos + len(text), pos + len(text)
            if kind in ("reply", "close"):  # every token overlapping the text is a target
                for i in range(bisect.bisect_right(stops, a), bisect.bisect_left(starts, b)):
                    mask[i] = 1
            if kind == "close":
                ends.append(bisect.bisect_left(starts, a))
        return enc.ids, mask, ends

    def _encode_pieces(self, pieces: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int]]:
        ids, mask, ends = [], [], []
        for text, kind in pieces:
            part = (self.encode_content(text) if kind in ("content", "reply")
                    else self.tok.encode(text, add_special_tokens=False).ids)
            if kind == "close":
                ends.append(len(ids))
            ids += part
            mask += [int(kind in ("reply", "close"))] * len(part)
        return ids, mask, ends

    def _marked(self, text: str) -> str:
        if self.markers != "tokens":
            return text
        return _ACTION.sub(lambda m: f"{ACTION_OPEN}{m.group(1)}{ACTION_CLOSE}", text)

    @functools.cached_property
    def _specials(self) -> list[str]:
        return [t.content for t in self.hf.added_tokens_decoder.values() if t.special]


def load_tokenizer(folder: str | Path) -> ChatTokenizer | TemplateTokenizer:
    """The tokenizer in a tokenizer or model folder: ours (tokenizer.json) or a base's (chat.json beside it)."""
    folder = Path(folder)
    if (folder / "chat.json").is_file():
        return TemplateTokenizer.load(folder)
    return ChatTokenizer.from_file(folder / "tokenizer.json")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files of folder `src` into folder `dst` (one file for ours, several for a base's)."""
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copyfile(f, Path(dst) / f.name)
