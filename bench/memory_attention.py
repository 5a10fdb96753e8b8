"""Recall of user facts pushed out of the context window: memory attention against the same model without it.

--scale pipeline (default): from a finetuned model folder, phase 3 is trained as the train_emotion stage trains it with params.yaml's
settings (emotion batches, plus the long dialogues of `model.memory` at `model.memory.share`), twice:
- `memory`: model.memory.enabled, the long dialogues read window by window with memory carried across;
- `no memory`: the same batches and steps, each window read on its own (memory attention off): the same data,
  so any difference is the mechanism, not the answer format it learns.
Each model then answers --n conversations through the chat layer (persona_lm.chat.Chat, greedy, no repetition
penalty, which would penalise repeating the fact): the user tells a fact (user_facts.make_facts, seeds unused in
training), the persona acknowledges, ShareGPT *val* conversations follow until the telling lies --gap tokens or
more behind (default block_size: out of the window), and the user asks a held-out test_question. A reply counts
when `user_facts.recalled` says it names the fact's value and no other candidate. The memory model is also
asked with its memory switched off (the chat then drops the turns that do not fit, as for any model), and both
with the question right after the telling (gap 0: in the window), the control that the answer is learnt at all;
and with the reply started up to the value ("Your dog is called"), which asks for the value alone.

--scale small: the same comparison on a model small enough to learn the task from scratch on 2 CPU cores in a
few minutes: a BPE tokenizer (--vocab) trained on the ShareGPT train text and the facts' statements, training
questions and answers; the model of params.yaml's family with --layers/--embd and block_size --block; trained
only on the long dialogues (phase.memory_dialogues at that block size, collate_windows, the training loop),
once with memory attention and once without. Recall is measured with the held-out test questions and, as a
second figure, with unseen facts asked by training questions.

--scale synthetic: key-value recall with the same model code and windows, no language to learn first: two pairs
`k1 v1 k2 v2`, a question `? k v` answered in the window, 20 noise tokens past the 16-token window, then a
question about one of the pairs (keys 8, values 20: chance 1 in 20), loss on the two answers only.

Usage (from the repo root, after `dvc repro build_sharegpt` (small) or `dvc repro finetune` (pipeline)):
    .venv/bin/python bench/memory_attention.py [--finetune models/finetune] [--iters 200] [--n 40] [--set k=v ...]
    .venv/bin/python bench/memory_attention.py --scale small [--block 64 --layers 2 --embd 64 --iters 1500]
    .venv/bin/python bench/memory_attention.py --scale synthetic [--iters 2000] [--set model.memory.compression=1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from persona_lm.chat import Chat
from persona_lm.generate import generate
from persona_lm.params import load_params, parse_params
from persona_lm.train import phase
from persona_lm.train.batches import EmotionBatches, collate_windows, generator, pick
from persona_lm.train.loop import train
from persona_lm.user_facts import make_facts, recalled


def with_overrides(p, sets: list[str], memory: bool):
    data = p.model_dump(mode="json")
    for item in sets:
        key, _, value = item.partition("=")
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        try:
            node[last] = json.loads(value)
        except ValueError:
            node[last] = value
    data["model"]["memory"]["enabled"] = memory
    return parse_params(data)


def train_phase3(p, finetune: Path, iters: int, memory_data: bool, seconds: dict, name: str):
    """Phase 3 as stages/train_emotion.py runs it; `memory_data` adds the long dialogues even without memory."""
    model, tok = phase.load_phase_model(finetune, p, "emotion")
    train_ex = phase.emotion_examples(p, tok, phase.sharegpt_rows("train"))
    val_ex = phase.emotion_examples(p, tok, phase.sharegpt_rows("val"))
    batches = EmotionBatches(train=train_ex, val=val_ex, batch_size=p.emotion.batch_size,
                             block_size=model.cfg.block_size, pad_id=tok.pad, seed=p.seed)
    if memory_data:
        batches = phase.memory_batches(p, tok, batches)
    settings = p.emotion.model_copy(update={"max_iters": iters, "eval_interval": iters, "ckpt_interval": iters})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model, settings, batches, Path(tmp) / "ck", name, {"seed": p.seed, "live_dir": Path(tmp) / "live"},
                       name, lm_weight=p.emotion.lm_weight, class_weights=phase.emotion_class_weights(p, train_ex))
    seconds[name] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {iters} steps in {seconds[name]} s, val loss {result.val_loss:.4f}", file=sys.stderr, flush=True)
    return model.eval(), tok


def conversations(p, tok, n: int, gap: int, questions: str = "test_questions") -> list[tuple[list[dict], str, object]]:
    """(history, question, fact): the fact told, acknowledged, then val conversations until `gap` tokens passed."""
    import random

    rng = random.Random(12345)
    fillers = [[m for m in row["conversations"] if m["from"] != "system"] for row in phase.sharegpt_rows("val")]
    fillers = [f for f in fillers if len(tok.render(f)[0]) <= p.model.block_size // 2]
    out = []
    for i in range(n):
        fact = make_facts(1, 900_000 + i)[0]
        history = [{"from": "human", "value": fact.statement},
                   {"from": "gpt", "value": phase.ACKNOWLEDGEMENTS[i % len(phase.ACKNOWLEDGEMENTS)]}]
        told = len(tok.render(history)[0])
        while len(tok.render(history)[0]) - told < gap:
            history += rng.choice(fillers)
        asked = getattr(fact, questions)
        out.append((history, asked[i % len(asked)], fact))
    return out


def recall(model, tok, config: dict, convs, prefixed: bool = False) -> tuple[float, list[str]]:
    """Share of replies that recall their fact. `prefixed`: the reply is started with the fact's answer up to
    the value ("Your dog is called"), so only the value itself is asked of the model (memory, not the format)."""
    hits, replies = 0, []
    for history, question, fact in convs:
        chat = Chat(model, tok, config, temperature=0, repetition_penalty=1.0, max_new_tokens=24, warn=lambda m: None)
        chat.history = list(history)
        if prefixed:
            head = fact.answer.split(fact.value)[0].rstrip()
            ids, _ = chat.fit(question)
            reply = head + generate(model, tok, ids + tok.encode_content(head), max_new_tokens=8, temperature=0).text
        else:
            reply = "".join(chat.reply(question))
        hits += recalled(reply, fact)
        replies.append(reply)
    return hits / len(convs), replies


class Windows:
    """Batches of long dialogues only, each cut into windows (collate_windows), for the small scale."""

    def __init__(self, train_rows, val_rows, batch_size: int, block_size: int, pad_id: int, seed: int):
        self.rows = {"train": train_rows, "val": val_rows}
        self.batch_size, self.block_size, self.pad_id, self.seed = batch_size, block_size, pad_id, seed

    def get(self, split: str, step: int, rank: int = 0) -> dict:
        g = generator(self.seed, split, step, rank)
        return collate_windows(pick(self.rows[split], self.batch_size, g), self.block_size, self.pad_id)


def small_scale(args, base) -> None:
    from persona_lm.params import Pretrain
    from persona_lm.tokenizer import ChatTokenizer, train_tokenizer
    from persona_lm.user_facts import slots

    # a short system prompt: at block_size 64 the chat must still fit it, a question and a reply in the window
    base = with_overrides(base, ["persona.system_prompt=You are Rosie, a desktop companion."], False)
    facts = [f for seed in range(200) for f in make_facts(len(slots()), seed)]
    texts = [m["value"] for row in phase.sharegpt_rows("train") for m in row["conversations"]]
    texts += [t for f in facts for t in (f.statement, *f.train_questions, f.answer)] + list(phase.ACKNOWLEDGEMENTS)
    texts.append(base.persona.system_prompt)
    tok = ChatTokenizer(train_tokenizer(texts, "bpe", args.vocab, base.persona.emotions))
    arch = {"block_size": args.block, "n_layer": args.layers, "n_head": 4, "n_kv_head": None, "n_embd": args.embd}
    sets = [f"model.{k}={json.dumps(v)}" for k, v in arch.items()] + args.set
    p_mem, p_off = with_overrides(base, sets, True), with_overrides(base, sets, False)
    train_d = phase.memory_dialogues(p_mem, tok, phase.sharegpt_rows("train"), p_mem.model.memory.dialogues, 0)
    val_d = phase.memory_dialogues(p_mem, tok, phase.sharegpt_rows("val"), 64, 1)
    settings = Pretrain(max_iters=args.iters, batch_size=args.batch, lr=args.lr, min_lr=args.lr / 10, warmup_iters=50,
                        eval_interval=args.iters, eval_iters=8, ckpt_interval=args.iters, device="cpu",
                        precision="fp32")
    models, seconds = {}, {}
    for name, p in (("memory", p_mem), ("no memory", p_off))[:1 if args.no_baseline else 2]:
        model = phase._own(p, tok)
        model.set_memory(**phase.memory_config(p))
        batches = Windows(train_d, val_d, args.batch, args.block, tok.pad, base.seed)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train(model, settings, batches, Path(tmp) / "ck", name, {"live_dir": Path(tmp) / "live"}, name)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {args.iters} steps in {seconds[name]} s, val loss {result.val_loss:.4f}", file=sys.stderr,
              flush=True)
        models[name] = model.eval()
    config = {"persona": base.persona.name, "system_prompt": base.persona.system_prompt}
    gap = args.gap or args.block
    sets_of = {"test questions": conversations(p_mem, tok, args.n, gap),
               "training questions, new facts": conversations(p_mem, tok, args.n, gap, "train_questions"),
               "test questions, in window": conversations(p_mem, tok, args.n, 0)}
    results, replies = {}, {}
    for name, model in models.items():
        for what, convs in sets_of.items():
            results[f"{name}, {what}"], got = recall(model, tok, config, convs)
            replies.setdefault(name, got) if what == "test questions" else None
    print(json.dumps({"scale": "small", "n": args.n, "gap_tokens": gap, "iters": args.iters, "batch": args.batch,
                      "lr": args.lr, "vocab": args.vocab, "arch": arch,
                      "params": models["memory"].param_counts()["total"], "memory": p_mem.model.memory.model_dump(),
                      "recall": {k: round(v, 3) for k, v in results.items()}, "seconds": seconds,
                      "examples": [{"question": q, "value": f.value, **{k: v[i] for k, v in replies.items()}}
                                   for i, (_, q, f) in enumerate(sets_of["test questions"][:8])]}, indent=2))


def synthetic(args, base) -> None:
    import torch.nn.functional as F

    from persona_lm.model import GPT, GPTConfig

    def data(n, g):
        rows = []
        for _ in range(n):
            keys, vals = (torch.randperm(8, generator=g)[:2] + 2).tolist(), torch.randint(10, 30, (2,), generator=g).tolist()
            near, far = torch.randint(0, 2, (2,), generator=g).tolist()
            ids = [keys[0], vals[0], keys[1], vals[1], 1, keys[near], vals[near]]
            ids += torch.randint(30, 60, (20,), generator=g).tolist() + [1, keys[far], vals[far]]
            rows.append((ids, [0] * 6 + [1] + [0] * 22 + [1], 0))
        return rows

    m = with_overrides(base, args.set, True).model.memory
    results, seconds = {}, {}
    for name, layers in (("memory", (0, 1)), ("no memory", ())):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=64, memory_layers=layers,
                              memory_compression=m.compression, memory_slots=m.slots))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        g = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            batch = collate_windows(data(32, g), 16, 0)
            loss = F.cross_entropy(model(batch["x"])[0].flatten(0, 1), batch["y"].flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds[name] = round(time.perf_counter() - t0, 1)
        batch = collate_windows(data(args.n, torch.Generator().manual_seed(99)), 16, 0)
        with torch.no_grad():
            pred = model.eval()(batch["x"])[0].argmax(-1)
        y = batch["y"]
        results[f"{name}, in window"] = round(float((pred[:, 5] == y[:, 5]).float().mean()), 3)
        results[f"{name}, out of window"] = round(float((pred[:, 28] == y[:, 28]).float().mean()), 3)
    print(json.dumps({"scale": "synthetic", "n": args.n, "iters": args.iters, "lr": args.lr,
                      "compression": m.compression, "slots": m.slots, "chance": 0.05, "recall": results,
                      "seconds": seconds}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finetune", default="models/finetune")
    ap.add_argument("--iters", type=int, default=200, help="phase 3 steps of each model")
    ap.add_argument("--n", type=int, default=40, help="conversations per measurement")
    ap.add_argument("--gap", type=int, default=0, help="tokens between the telling and the question (0 = block_size)")
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. model.memory.compression=2")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip training the no-memory model")
    ap.add_argument("--scale", choices=["pipeline", "small", "synthetic"], default="pipeline")
    ap.add_argument("--block", type=int, default=64, help="small: block_size")
    ap.add_argument("--layers", type=int, default=2, help="small: n_layer")
    ap.add_argument("--embd", type=int, default=64, help="small: n_embd")
    ap.add_argument("--vocab", type=int, default=1024, help="small: BPE vocabulary")
    ap.add_argument("--batch", type=int, default=16, help="small: dialogues per batch")
    ap.add_argument("--lr", type=float, default=3e-3, help="small: peak learning rate")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_params()
    if args.scale == "small":
        return small_scale(args, base)
    if args.scale == "synthetic":
        return synthetic(args, base)
    p_mem, p_off = with_overrides(base, args.set, True), with_overrides(base, args.set, False)
    seconds: dict[str, float] = {}
    mem_model, tok = train_phase3(p_mem, Path(args.finetune), args.iters, True, seconds, "memory")
    off_model = None if args.no_baseline else train_phase3(p_off, Path(args.finetune), args.iters, True, seconds,
                                                             "no_memory")[0]
    config = {"persona": base.persona.name, "system_prompt": base.persona.system_prompt}
    gap = args.gap or base.model.block_size
    far, near = conversations(base, tok, args.n, gap), conversations(base, tok, args.n, 0)
    results = {}
    t0 = time.perf_counter()
    models = {"memory": mem_model, "no memory": off_model}
    replies = {}
    for name, model in models.items():
        if model is None:
            continue
        results[name], replies[name] = recall(model, tok, config, far)
        results[f"{name}, answer prefix given"], _ = recall(model, tok, config, far, prefixed=True)
        results[f"{name}, in window"], _ = recall(model, tok, config, near)
    layers = mem_model.cfg.memory_layers
    mem_model.cfg.memory_layers = ()  # the same weights, memory attention switched off
    results["memory model, memory off"], _ = recall(mem_model, tok, config, far)
    results["memory model, memory off, answer prefix given"], _ = recall(mem_model, tok, config, far, prefixed=True)
    mem_model.cfg.memory_layers = layers
    seconds["recall"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"n": args.n, "gap_tokens": gap, "iters": args.iters, "overrides": args.set,
                      "memory": p_mem.model.memory.model_dump(),
                      "recall": {k: round(v, 3) for k, v in results.items()}, "seconds": seconds,
                      "examples": [{"question": q, "value": f.value, **{k: v[i] for k, v in replies.items()}}
                                   for i, (_, q, f) in enumerate(far[:8])]}, indent=2))


if __name__ == "__main__":
    main()
