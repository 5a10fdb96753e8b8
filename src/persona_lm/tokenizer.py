"""Tokenizer training and loading (HF `tokenizers`), special tokens, and the chat template.

Two kinds: byte-level BPE (any text round-trips, no unknown tokens) and character-level (`tokenizer.kind:
char`, for nanoGPT-style experiments). Special tokens never split or merge, and user text can never produce
one: content is always encoded with `encode_special_tokens=True`, so a literal "<|user|>" typed by a user is
ordinary text; special ids are only ever inserted by `render`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from persona_lm.io import atomic_path

EOT, PAD = "<|endoftext|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ACTION_OPEN, ACTION_CLOSE = "<|action|>", "<|/action|>"
ROLE_TOKEN = {"system": SYSTEM, "human": USER, "gpt": ASSISTANT}
UNK = "<|unk|>"
_ACTION = re.compile(r"\*([^*\n]{1,200})\*")


def emotion_token(label: str) -> str:
    return f"<|emotion:{label}|>"


def special_tokens(emotions: Iterable[str]) -> list[str]:
    return [EOT, PAD, SYSTEM, USER, ASSISTANT, END, ACTION_OPEN, ACTION_CLOSE] + [emotion_token(e) for e in emotions]


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, emotions: list[str],
                    min_frequency: int = 2) -> Tokenizer:
    specials = special_tokens(emotions)
    if kind == "char":
        texts = list(texts)
        chars = sorted({c for t in texts for c in t})
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
