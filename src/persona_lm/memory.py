"""Weight memory: what a user tells the companion is trained into a small LoRA adapter, not kept in a database.

"Teach a fact, wipe the context, ask it back": `/remember my dog is called Rex` (or `persona-lm remember`)
turns the fact into a few conversations, trains a LoRA adapter (peft, through persona_lm.lora's config) on them,
and the model answers "What's my dog called?" in a fresh conversation from its weights alone.

- Facts -> training data. A fact `user_facts.parse_fact` reads is asked back in many ways (its train questions,
  the same in a few openers, its slot alone) and answered by its answer; text no pattern reads is restated by
  swapping pronouns ("I work at the bakery" -> "You work at the bakery.") as the answer to "what do you remember
  about me?". The held-out `test_questions` are never trained on. Anchors: questions about what was not told
  (other slots' train questions) and about the companion itself ("What is your name?"), answered by the model
  before it learns and trained alongside, so only what was told changes (on the default model they are what
  keeps its identity answers). Conversations are rendered by the tokenizer's
  `render` under the persona's system prompt, as the finetune phase renders rows, loss on the replies only.
- Forgetting. Learning a fact must not wear away what the model knows. Two regularisers, usable together:
  EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks"): the base weights are
  frozen, so the penalty is on the adapter's change of each adapted weight, dW = (alpha / r) B @ A:
  lambda / 2 * sum(F * dW^2), F the diagonal Fisher of W estimated once on finetune conversations by the
  train_emotion stage (`fisher.safetensors` beside the weights). And replay: a `replay_share` of every batch
  is drawn from the ShareGPT train rows (data/processed/sharegpt/train.jsonl, when it is there).
- Store. Per user, a private folder (0700) under the memory root: `facts.json` (the user's own words, for
  /memories, /forget and re-teaching) and `adapter/` (peft's `adapter_config.json` + `adapter_model.safetensors`
  and `memory.json`: the fingerprint of the model it was trained for and of the facts it holds). Every file is
  written atomically; an adapter whose model or facts no longer match is re-taught from the facts, and a file
  that cannot be read is skipped with a message (never unpickled: safetensors and JSON only).
- A base-model run is loaded merged (its run adapter folded into the weights) and the memory adapter attached on
  top of the transformers model, so one code path serves both kinds. With no memory nothing is attached: chat,
  serve and generate keep the plain model and its lean decode path.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from persona_lm import lora
from persona_lm.errors import PersonaError
from persona_lm.io import atomic_dir, atomic_path, write_json
from persona_lm.train.batches import IGNORE, crop, generator, pad_sequences, pick
from persona_lm.user_facts import parse_fact, slots

log = logging.getLogger("persona_lm.memory")

ADAPTER = "memory"                # the peft adapter name in chat and in teach()
FISHER_FILE = "fisher.safetensors"
SHAREGPT_TRAIN = Path("data/processed/sharegpt/train.jsonl")
DEFAULT_ROOT = Path("memory")
ABOUT_ME = ("What do you remember about me?", "What do you know about me?", "Tell me what you know about me.")
FORMAT = 1                        # memory.json layout


# ------------------------------------------------------------------------------------ facts -> conversations

_FIRST_PERSON = {"i": "you", "i'm": "you're", "im": "you're", "i've": "you've", "i'll": "you'll", "i'd": "you'd",
                 "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are", "was": "were"}
_WORD = re.compile(r"[A-Za-z']+")


def second_person(text: str) -> str:
    """A first-person statement restated to its speaker: "I'm a nurse and my cat is old" -> "You're a nurse and
    your cat is old." Only first-person singular words change ("am"/"was" after "I" become "are"/"were")."""
    words = list(_WORD.finditer(text))
    out, pos, prev = [], 0, ""
    for m in words:
        w = m.group(0)
        low = w.lower()
        new = _FIRST_PERSON.get(low) if low not in ("am", "was") or prev == "i" else None
        if new is not None:  # "I" and its contractions are capitalised anywhere, their replacements only first
            i_form = low == "i" or low.startswith("i'")
            new = new.capitalize() if w[0].isupper() and (not i_form or not text[:m.start()].strip()) else new
        out.append(text[pos:m.start()] + (new or w))
        pos, prev = m.end(), low
    restated = ("".join(out) + text[pos:]).strip()
    restated = restated[:1].upper() + restated[1:]
    return restated if restated.endswith((".", "!", "?")) else restated + "."


# How a fact is asked besides its own train questions: the slot alone, and the train questions in a few openers,
# so that the answer hangs on what is asked about rather than on one phrasing. (The held-out test questions stay
# unseen; on the default model these raise recall of them from 0.57 to 0.82, bench/weight_memory.py.)
BARE = {"name": "my name?", "home": "my home town?", "pet": "my {detail}'s name?",
        "favourite": "my favourite {detail}?", "plan": "my plans for {detail}?"}
FRAMES = ("Hey, ", "Tell me, ", "Quick question: ")
# Questions about the companion itself, always among the anchors: its identity is what a write must not wear
# away. None is one of the identity check's held-out questions (params persona.facts). Mirrors of the other kinds
# ("What is your favourite fruit?" beside the user's "my favourite fruit") cost recall on the default model (0.83 ->
# 0.70 over 3 seeds of 5 facts, identity the same): "your" and "my" are one token apart, and a 1M model merges them.
SELF = ("What is your name?", "Who are you?", "What are you called?", "How are you?", "Tell me about yourself.",
        "What do you like?")


def _qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def questions(fact) -> list[str]:
    """Every question a memory adapter learns `fact` from: its train questions, the same in FRAMES, its slot
    alone. Never its test questions."""
    detail = fact.slot.partition(":")[2]
    framed = [f + q[0].lower() + q[1:] for f in FRAMES for q in fact.train_questions]
    return [*fact.train_questions, *framed, BARE[fact.kind].format(detail=detail)]


def conversations(texts: list[str]) -> list[list[dict]]:
    """The conversations (ShareGPT turns, no system turn) that teach `texts`, the user's own sentences: each fact
    `user_facts.parse_fact` reads, asked every way `questions` gives, answered by its answer; the others, restated
    in the second person, as the answer to "what do you remember about me?" (listing the read facts there too
    would make that long answer's first fact the reply to anything the model is unsure of: measured, it is)."""
    convs, restated = [], []
    for text in texts:
        fact = parse_fact(text)
        if fact is None:
            restated.append(second_person(text))
        else:
            convs += [_qa(q, fact.answer) for q in questions(fact)]
    if restated:
        convs += [_qa(q, " ".join(restated)) for q in ABOUT_ME]
    return convs


def anchor_questions(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """Questions the model answers itself while it learns `texts` (see `anchors`): SELF, and `n` train questions
    of the user's slots no fact in `texts` fills, drawn by `seed`. They teach the adapter where a fact ends: "my
    fruit" changes its answer, "your name", "my dog" (untold) and the rest keep theirs."""
    taught = {f.slot for f in map(parse_fact, texts) if f is not None}
    untold = [q for make, values in slots() if (other := make(values[0])).slot not in taught
              for q in other.train_questions]
    random.Random(seed).shuffle(untold)
    return list(dict.fromkeys([*SELF, *untold[:n]]))


def anchors(model, tokenizer, questions: list[str], system: str | None, max_new_tokens: int = 32) -> list[list[dict]]:
    """The model's own greedy replies to `questions`, as it is now (call it before the adapter trains): trained
    alongside the facts, they keep what it says about itself while it learns what the user said about themselves
    (self-distillation, as in Li & Hoiem 2016, "Learning without Forgetting")."""
    from persona_lm.generate import generate_batch

    head = [{"from": "system", "value": system}] if system else []
    convs = [[{"from": "human", "value": q}] for q in questions]
    fits = [c for c in convs if len(tokenizer.prompt(head + c)) + max_new_tokens <= model.cfg.block_size]
    if not fits:
        return []
    replies = generate_batch(model, tokenizer, [tokenizer.prompt(head + c) for c in fits], temperature=0.0,
                             max_new_tokens=max_new_tokens)
    return [c + [{"from": "gpt", "value": r.text.strip()}] for c, r in zip(fits, replies) if r.text.strip()]


def render(tokenizer, turns: list[dict], system: str | None) -> tuple[list[int], list[int]]:
    """(ids, loss mask) as the finetune phase renders a row: the system turn first, loss on the replies."""
    if system and (not turns or turns[0]["from"] != "system"):
        turns = [{"from": "system", "value": system}] + turns
    ids, mask, _ = tokenizer.render(turns)
    return ids, mask


def replay_examples(tokenizer, rows: list[dict], system: str | None) -> list[tuple[list[int], list[int]]]:
    """Rendered ShareGPT rows of persona 0 (the one chat speaks as) with at least one reply token."""
    out = []
    for row in rows:
        if row.get("persona", 0) != 0:
            continue
        ids, mask = render(tokenizer, row["conversations"], system)
        if any(mask):
            out.append((ids, mask))
    return out


def read_rows(path: Path = SHAREGPT_TRAIN) -> list[dict]:
    """ShareGPT rows from a JSON-lines file for replay; [] when it is absent or unreadable (replay is then off)."""
    from persona_lm.errors import InputError
    from persona_lm.io import read_jsonl

    if not Path(path).is_file():
        return []
    try:
        return [row for _, row in read_jsonl(path) if isinstance(row, dict) and isinstance(row.get("conversations"), list)]
    except InputError as e:
        log.warning("memory: no replay rows: %s", e)
        return []


# --------------------------------------------------------------------------------------- adapters on a model

def _root(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the module adapters go into, whether it is our own model). A base model must be loaded merged."""
    from persona_lm.base import BaseLM

    if isinstance(model, BaseLM):
        if model.adapter is not None:
            raise PersonaError("weight memory needs the base model loaded merged (load_model(..., merge=True))")
        return model.hf, False
    return model, True


def _lora_layers(root: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer)]


def adapters(model: nn.Module) -> set[str]:
    """Names of the memory adapters attached to `model`."""
    root, _ = _root(model)
    return set(getattr(root, "peft_config", {}))


def attach(model: nn.Module, cfg, name: str = ADAPTER, seed: int = 0, lora_config=None) -> None:
    """Inject a fresh LoRA adapter `name` (peft) into `model`, in place, and make it the active one. `cfg` is
    params `weight_memory` (rank, alpha, dropout, target modules); `lora_config` a ready peft LoraConfig
    instead (a stored adapter's). A is seeded, B starts at zero: the model is unchanged until it trains."""
    from peft import inject_adapter_in_model

    root, own = _root(model)
    if name in adapters(model):
        detach(model, name)
    if lora_config is None:
        targets = lora.check_targets(root, cfg.target_modules, own=own)
        lora_config = lora.config(cfg, targets, causal_lm=not own)
    flags = {n: p.requires_grad for n, p in root.named_parameters()}
    device = next(root.parameters()).device
    # the adapter's initialisation is seeded without touching the RNG that sampling draws from
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore")  # peft warns that a second adapter makes a multi-adapter model: it is meant to
        inject_adapter_in_model(lora_config, root, adapter_name=name)
    for n, p in root.named_parameters():  # peft froze the model: put its flags back, adapters frozen until taught
        p.requires_grad = "lora_" not in n and flags.get(n.replace(".base_layer.", "."), False)
    activate(model, name)


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter `name` (None: every memory adapter). When none is left the adapted layers are put back as
    plain layers, so the model is exactly the one loaded and decodes on its lean path."""
    root, _ = _root(model)
    configs = getattr(root, "peft_config", {})
    names = list(configs) if name is None else [name]
    layers = _lora_layers(root)
    for n in names:
        if n in configs:
            for _, m in layers:
                m.delete_adapter(n)
            del configs[n]
    if configs:
        return
    for lname, m in layers:
        parent, _, leaf = lname.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, m.get_base_layer())
    if hasattr(root, "peft_config"):
        del root.peft_config


def activate(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one the model runs with (None: no adapter, the model as loaded). Only switches
    which adapter each layer applies; call it between forward passes, never during one."""
    root, _ = _root(model)
    for _, m in _lora_layers(root):
        if name is None:
            m.enable_adapters(False)
            continue
        if m.disable_adapters:
            m.enable_adapters(True)
        m.set_adapter(name, inference_mode=True)


def adapter_parameters(model: nn.Module, name: str = ADAPTER) -> list[nn.Parameter]:
    root, _ = _root(model)
    return [p for n, p in root.named_parameters() if "lora_" in n and f".{name}." in n + "."]


# ------------------------------------------------------------------------------------------------------- EWC

def fisher_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a memory adapter may change, by their name in the adapted module (`blocks.0.attn.c_attn.weight`,
    a base's `model.layers.0.self_attn.q_proj.weight`): the keys of the Fisher."""
    root, own = _root(model)
    if _lora_layers(root):
        raise PersonaError("estimate the Fisher on the model without memory adapters")
    return {f"{n}.weight": root.get_submodule(n).weight for n in lora.adaptable(root, own)}


def estimate_fisher(model: nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the adaptable weights, per token: the mean over `examples` (rendered
    conversations, (ids, mask)) of g^2 / n, g the gradient of the example's summed reply log-likelihood and n its
    reply tokens. Summed per example then divided by n, it estimates the per-token Fisher, i.e. the curvature of
    the mean finetune loss, so that 1/2 sum(F * dW^2) predicts that loss's rise (nats per token) for a change dW.
    float32 on the model's device; the model is left as it was."""
    targets = fisher_targets(model)
    device = next(model.parameters()).device
    flags = {n: w.requires_grad for n, w in targets.items()}
    was_training = model.training
    model.eval()
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in targets.items()}
    block = model.cfg.block_size
    used = 0
    try:
        for w in targets.values():
            w.requires_grad_(True)
        for ids, mask in examples:
            x, y = pad_sequences([crop(ids, mask, block)], pad_id)
            n = int((y != IGNORE).sum())
            if n == 0:
                continue
            logits, _ = model(x.to(device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            for f, g in zip(fisher.values(), torch.autograd.grad(loss, list(targets.values()))):
                f.add_(g.float().square(), alpha=1.0 / n)
            used += 1
    finally:
        for n, w in targets.items():
            w.requires_grad_(flags[n])
        model.train(was_training)
    if used == 0:
        raise PersonaError("no conversation with a reply token to estimate the Fisher on")
    return {n: f / used for n, f in fisher.items()}


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write the Fisher as safetensors (bfloat16: the importance weights need range, not digits), atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({n: f.detach().to("cpu", torch.bfloat16).contiguous() for n, f in fisher.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (meta or {}).items()})


def load_fisher(model_dir: Path, model: nn.Module, say: Callable[[str], None] | None = None) -> dict[str, torch.Tensor] | None:
    """The Fisher beside the weights in `model_dir`, float32 on the model's device; None (with a message through
    `say`) when it is absent, unreadable or was estimated for another model: memory then trains without EWC."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    say = say or log.warning
    path = Path(model_dir) / FISHER_FILE
    if not path.is_file():
        say(f"[memory: no {FISHER_FILE} in {model_dir}; facts are learnt without EWC]")
        return None
    try:
        fisher = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        say(f"[memory: skipping {path}: unreadable ({e}); facts are learnt without EWC]")
        return None
    want = fisher_targets(model)
    bad = [n for n, w in want.items() if n not in fisher or fisher[n].shape != w.shape]
    if bad or not want:
        say(f"[memory: skipping {path}: it does not fit this model ({bad[0] if bad else 'no weights'}); facts are "
            "learnt without EWC]")
        return None
    device = next(model.parameters()).device
    return {n: fisher[n].to(device, torch.float32) for n in want}


def ewc_terms(model: nn.Module, fisher: dict[str, torch.Tensor], name: str = ADAPTER) -> list[tuple[nn.Module, torch.Tensor]]:
    """(LoRA layer, Fisher of its base weight) for every layer adapter `name` adapts."""
    root, _ = _root(model)
    terms = []
    for lname, m in _lora_layers(root):
        f = fisher.get(f"{lname}.weight")
        if f is not None and name in m.lora_A:
            terms.append((m, f))
    return terms


def ewc_penalty(terms: list[tuple[nn.Module, torch.Tensor]], lam: float, name: str = ADAPTER) -> torch.Tensor:
    """lambda / 2 * sum over adapted weights of F * dW^2, dW = peft's delta weight ((alpha / r) B @ A, laid out
    as the base weight). Differentiable in A and B."""
    total = sum((f * m.get_delta_weight(name).square()).sum() for m, f in terms)
    return 0.5 * lam * total


# ------------------------------------------------------------------------------------------------------ teach

def _mean_loss(model, rows, block: int, pad_id: int, device) -> torch.Tensor:
    """Mean cross-entropy over the reply tokens of `rows` ((ids, mask) pairs)."""
    x, y = pad_sequences([crop(ids, mask, block) for ids, mask in rows], pad_id)
    logits, _ = model(x.to(device))
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE)


@dataclass
class TeachReport:
    seconds: float
    steps: int
    examples: int
    replay_examples: int
    loss: float
    ewc: float


def teach(model: nn.Module, tokenizer, texts: list[str], cfg, fisher: dict[str, torch.Tensor] | None = None,
          replay_rows: list[dict] | None = None, *, system: str | None = None, name: str = ADAPTER, seed: int = 0,
          report: list | None = None, convs: list[list[dict]] | None = None) -> nn.Module:
    """Train a fresh memory adapter `name` on `texts` (the user's sentences) and leave it active on `model`; in
    memory, no files. Returns `model`.

    `cfg`: params `weight_memory`. `fisher`: see load_fisher (None or ewc_lambda 0: no EWC). `replay_rows`:
    ShareGPT rows, a `replay_share` of each batch (None or share 0: no replay). `system`: the persona's system
    prompt, as chat and serve put it first (the config's `system_prompt`). `convs` replaces the conversations
    built from `texts` (to measure other designs). A TeachReport is appended to `report` when given.

    A compact loop rather than train.loop.train: a memory write is tens of steps in a live process, with none of
    that loop's checkpoints, resumption, DDP or logging; and fact and replay tokens are averaged apart (a replayed
    conversation has ten times a fact's reply tokens and would drown it in one token mean), in batches of their own.
    """
    t0 = time.perf_counter()
    fact_ex = [render(tokenizer, c, system) for c in (convs if convs is not None else conversations(texts))]
    if not fact_ex:
        raise PersonaError("nothing to remember")
    if name in adapters(model):
        detach(model, name)
    if cfg.anchors:
        activate(model, None)
        own = anchors(model, tokenizer, anchor_questions(texts, cfg.anchors, seed), system)
        fact_ex += [render(tokenizer, c, system) for c in own]
    block = model.cfg.block_size
    replay_ex = replay_examples(tokenizer, replay_rows, system) if replay_rows and cfg.replay_share > 0 else []
    replay_ex = [(ids, mask) for ids, mask in replay_ex if any(mask[1:block + 1])]  # a reply within the window
    n_replay = min(cfg.batch_size - 1, round(cfg.batch_size * cfg.replay_share)) if replay_ex else 0
    n_fact = cfg.batch_size - n_replay
    attach(model, cfg, name, seed)
    params = adapter_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    terms = ewc_terms(model, fisher, name) if fisher is not None and cfg.ewc_lambda > 0 else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.train()
    loss = penalty = torch.zeros(())
    try:
        for step in range(cfg.steps):
            g = generator(seed, "train", step)
            loss = _mean_loss(model, pick(fact_ex, n_fact, g), block, tokenizer.pad, device)
            if n_replay:  # a batch of its own: padded together, short facts would pay for long conversations
                loss = loss + _mean_loss(model, pick(replay_ex, n_replay, g), block, tokenizer.pad, device)
            penalty = ewc_penalty(terms, cfg.ewc_lambda, name) if terms else torch.zeros((), device=device)
            opt.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    if not math.isfinite(loss.item()):
        detach(model, name)
        raise PersonaError(f"memory training diverged (loss {loss.item()}); lower weight_memory.lr")
    if report is not None:
        report.append(TeachReport(time.perf_counter() - t0, cfg.steps, len(fact_ex), len(replay_ex),
                                  loss.item(), penalty.item()))
    return model


# ------------------------------------------------------------------------------------------------------ store

def default_user() -> str:
    """The operating-system user's name (the default memory owner), or "default" where there is none."""
    try:
        return getpass.getuser() or "default"
    except (OSError, KeyError):
        return "default"


def user_folder(root: Path, user: str) -> Path:
    """A user's folder under `root`: the id itself when it is a plain name, else a hash of it ("~" + 32 hex),
    so that any OpenAI `user` string is a safe folder name and two ids never share one."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", user):
        return Path(root) / user
    return Path(root) / ("~" + hashlib.sha256(user.encode()).hexdigest()[:32])


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of a model folder's config and weight files (the Fisher aside): a retrained model has another."""
    h = hashlib.sha256()
    folder = Path(model_dir)
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if f.name == FISHER_FILE or not f.is_file():
            continue
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def facts_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def _parse_facts(path: Path) -> list[dict]:
    """The facts of a facts.json; ValueError (or OSError) when it is not one."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not (isinstance(data, dict) and isinstance(data.get("facts"), list)
            and all(isinstance(f, dict) and isinstance(f.get("text"), str) for f in data["facts"])):
        raise ValueError('expected {"user": ..., "facts": [{"text": ...}, ...]}')
    return [{"text": f["text"], "added": f.get("added")} for f in data["facts"]]


def _private(folder: Path) -> None:
    """Create `folder` (and parents) readable by the owner only: memories are personal."""
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)


@dataclass
class UserStore:
    """One user's memory on disk: facts.json and adapter/. Reading never raises for a bad file: it is skipped
    and `say` tells why."""

    root: Path
    user: str
    say: Callable[[str], None] = log.warning
    facts: list[dict] = field(default_factory=list)   # {"text": ..., "added": ISO time}, oldest first

    @property
    def folder(self) -> Path:
        return user_folder(self.root, self.user)

    @property
    def texts(self) -> list[str]:
        return [f["text"] for f in self.facts]

    def read_facts(self) -> list[dict]:
        """The stored facts ([] when there are none, or when facts.json is unreadable: said, and kept aside at
        the next write)."""
        path = self.folder / "facts.json"
        self.facts = []
        if not path.is_file():
            return self.facts
        try:
            self.facts = _parse_facts(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self.say(f"[memory: skipping {path}: unreadable ({e}); it is kept as facts.corrupt-*.json when new "
                     "facts are written]")
        return self.facts

    def add(self, text: str) -> list[str]:
        """Add a fact; returns the texts it replaces (a newer fact about the same slot, e.g. the dog's name,
        replaces the older one)."""
        text = " ".join(text.split())
        if not text:
            raise PersonaError("nothing to remember: the fact is empty")
        new = parse_fact(text)
        replaced = [f["text"] for f in self.facts if f["text"] == text
                    or (new is not None and (old := parse_fact(f["text"])) is not None and old.slot == new.slot)]
        self.facts = [f for f in self.facts if f["text"] not in replaced]
        self.facts.append({"text": text, "added": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return replaced

    def remove(self, which: str) -> list[str]:
        """Remove fact number `which` (1-based, as listed) or "all"; returns the removed texts. Raises
        PersonaError for anything else."""
        which = which.strip().lower()
        if which == "all":
            removed, self.facts = self.texts, []
            return removed
        if not which.isdigit() or not 1 <= int(which) <= len(self.facts):
            raise PersonaError(f"/forget needs a fact number from 1 to {len(self.facts)} or 'all', got {which!r}"
                               if self.facts else "there is nothing to forget")
        return [self.facts.pop(int(which) - 1)["text"]]

    def write_facts(self) -> None:
        """facts.json, atomically; an unreadable earlier one is kept aside first, never overwritten."""
        _private(self.root)
        _private(self.folder)
        path = self.folder / "facts.json"
        if path.is_file():
            try:
                _parse_facts(path)
            except (OSError, UnicodeDecodeError, ValueError):
                aside = path.with_name(f"facts.corrupt-{time.strftime('%Y%m%d-%H%M%S')}.json")
                os.replace(path, aside)
                self.say(f"[memory: the unreadable {path.name} is kept as {aside}]")
        write_json(path, {"user": self.user, "facts": self.facts})

    def write_adapter(self, model: nn.Module, fingerprint: str, name: str = ADAPTER) -> None:
        """The trained adapter in peft's format plus memory.json, swapped in as one folder; with no facts the
        adapter folder is removed."""
        import shutil

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = self.folder / "adapter"
        if not self.facts:
            shutil.rmtree(folder, ignore_errors=True)
            return
        root, _ = _root(model)
        _private(self.folder)
        with atomic_dir(folder) as tmp:
            root.peft_config[name].save_pretrained(str(tmp))
            state = get_peft_model_state_dict(root, adapter_name=name)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            write_json(tmp / "memory.json", {"format": FORMAT, "model": fingerprint, "facts": facts_digest(self.texts)})

    def read_adapter(self, model: nn.Module, fingerprint: str, name: str = ADAPTER) -> str:
        """Attach the stored adapter as `name` when it was trained for this model and these facts. Returns
        "loaded", "none" (no adapter stored), "stale" (another model or other facts: re-teach) or "bad" (an
        unreadable file, said; re-teach)."""
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = self.folder / "adapter"
        if not folder.is_dir():
            return "none"
        try:
            meta = json.loads((folder / "memory.json").read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"unknown layout {meta!r:.60}")
            if meta.get("model") != fingerprint or meta.get("facts") != facts_digest(self.texts):
                return "stale"
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            lora_config = LoraConfig(r=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                                     lora_dropout=float(config.get("lora_dropout") or 0.0),
                                     target_modules=config["target_modules"],
                                     fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))
            state = load_file(str(folder / "adapter_model.safetensors"))
            attach(model, None, name, lora_config=lora_config)
            result = set_peft_model_state_dict(_root(model)[0], state, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if result.unexpected_keys or missing or not state:
                raise ValueError(f"weights do not fit this model ({(result.unexpected_keys or missing or ['none'])[0]})")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            if name in adapters(model):
                detach(model, name)
            self.say(f"[memory: skipping the adapter in {folder}: unreadable ({e}); it is learnt again]")
            return "bad"
        return "loaded"


class Memory:
    """One user's weight memory bound to a loaded model: what chat and `persona-lm remember` use.

    `start()` reads the facts and attaches their adapter (re-teaching it when it was trained for another model,
    other facts, or cannot be read); `remember` and `forget` change the facts, re-teach from all that remain,
    and write both atomically. With no facts the model stays exactly as loaded."""

    def __init__(self, model, tokenizer, config: dict, model_dir: Path, cfg, root: Path = DEFAULT_ROOT,
                 user: str | None = None, say: Callable[[str], None] | None = None,
                 replay_path: Path = SHAREGPT_TRAIN):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.system = config.get("system_prompt") or None
        self.model_dir, self.replay_path = Path(model_dir), Path(replay_path)
        self.say = say or log.warning
        self.store = UserStore(Path(root), user or default_user(), self.say)
        self.store.read_facts()
        self._fisher: dict | None | bool = False  # False = not read yet

    @functools.cached_property
    def fingerprint(self) -> str:  # hashing the weights costs a moment: only when there are memories
        return model_fingerprint(self.model_dir)

    @property
    def user(self) -> str:
        return self.store.user

    @property
    def texts(self) -> list[str]:
        return self.store.texts

    def start(self) -> None:
        if not self.store.facts:
            return
        state = self.store.read_adapter(self.model, self.fingerprint)
        if state != "loaded":
            why = {"none": "no adapter stored", "stale": "learnt for another model or other facts",
                   "bad": "its adapter was unreadable"}[state]
            self.say(f"[memory: re-learning {len(self.texts)} fact(s) of {self.user} ({why})]")
            self._learn()

    def remember(self, text: str) -> tuple[list[str], TeachReport]:
        """Add a fact and learn; returns (the facts it replaced, the TeachReport)."""
        replaced = self.store.add(text)
        self.store.write_facts()  # the user's words first: whatever happens next, nothing they said is lost
        return replaced, self._learn()

    def forget(self, which: str) -> list[str]:
        """Forget fact `which` ("3" or "all"), then re-learn what remains (or drop the adapter)."""
        removed = self.store.remove(which)
        self.store.write_facts()
        if self.store.facts:
            self._learn()
        else:
            detach(self.model, ADAPTER)
            self.store.write_adapter(self.model, self.fingerprint)
        return removed

    def fisher(self):
        if self._fisher is False:
            self._fisher = load_fisher(self.model_dir, self.model, self.say) if self.cfg.ewc_lambda > 0 else None
        return self._fisher

    def _learn(self) -> TeachReport:
        reports: list[TeachReport] = []
        rows = read_rows(self.replay_path) if self.cfg.replay_share > 0 else None
        teach(self.model, self.tok, self.texts, self.cfg, self.fisher(), rows, system=self.system, report=reports)
        self.store.write_adapter(self.model, self.fingerprint)
        return reports[0]


class Bank:
    """Every user's memory for the server, on one model: each user's adapter is loaded on their first request
    (and again when their files change), and `switcher(user)` gives the function the engine calls before every
    step of that user's generation, so interleaved replies each run with their own user's adapter and a request
    without memory with none. Never trains: an adapter learnt for another model is skipped with a message.
    Everything here runs on the engine thread, between forward passes."""

    def __init__(self, model, model_dir: Path, root: Path, say: Callable[[str], None] | None = None):
        self.model, self.root = model, Path(root)
        self.say = say or log.warning
        self.fingerprint = model_fingerprint(model_dir)
        self.loaded: dict[str, tuple[str | None, tuple]] = {}  # user -> (adapter name or None, file stamps)
        self.active: str | None = None

    def switcher(self, user: str | None) -> Callable[[], None]:
        name, ready = None, False

        def switch() -> None:
            nonlocal name, ready
            if not ready:
                name, ready = (self._load(user) if user else None), True
            if name != self.active:
                activate(self.model, name)
                self.active = name

        return switch

    def _stamp(self, store: UserStore) -> tuple:
        stamps = []
        for f in (store.folder / "facts.json", store.folder / "adapter" / "memory.json"):
            try:
                stamps.append(f.stat().st_mtime_ns)
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self, user: str) -> str | None:
        store = UserStore(self.root, user, self.say)
        stamp = self._stamp(store)
        cached = self.loaded.get(user)
        if cached is not None and cached[1] == stamp:
            return cached[0]
        name = "u" + hashlib.sha256(user.encode()).hexdigest()[:16]
        if name in adapters(self.model):
            detach(self.model, name)
        self.active = "?"  # attaching and detaching change what the layers run with
        store.read_facts()
        state = store.read_adapter(self.model, self.fingerprint, name) if store.facts else "none"
        if state == "stale":
            self.say(f"[memory: the memory of user {user!r} was learnt for another model (or is being rewritten); "
                     f"`persona-lm chat --user {user}` learns it again]")
        self.loaded[user] = (name if state == "loaded" else None, stamp)
        return self.loaded[user][0]


def write_fisher(model_dir: Path, examples: list[tuple[list[int], list[int]]], device: str = "cpu") -> tuple[Path, float]:
    """Estimate the Fisher of the model in `model_dir` (loaded merged) on `examples` and write it beside the
    weights. Returns (the file, seconds taken)."""
    from persona_lm.train.checkpoint import load_model

    t0 = time.perf_counter()
    model, tok, _ = load_model(Path(model_dir), device=device)
    fisher = estimate_fisher(model, examples, tok.pad)
    path = Path(model_dir) / FISHER_FILE
    save_fisher(path, fisher, {"examples": len(examples), "per": "token"})
    return path, time.perf_counter() - t0


def load_config(path: Path = Path("params.yaml")):
    """Params `weight_memory` from params.yaml when there is one (validated: an error names the key), else the
    defaults, so that chat and remember work on a model folder outside the project too."""
    import yaml

    from persona_lm.errors import ParamsError
    from persona_lm.params import Params, WeightMemory, parse_params

    path = Path(path)
    if not path.is_file():
        return WeightMemory()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    section = data.get("weight_memory") if isinstance(data, dict) else None
    if section is None:
        return Params().weight_memory
    return parse_params({"weight_memory": section}, str(path)).weight_memory
