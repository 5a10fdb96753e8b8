"""What the three training stages share: reading their inputs as token data, building or loading the model
(ours, or a pretrained base) and setting what the phase trains (all weights or LoRA adapters), fingerprinting a
run for safe resumption, writing the phase's model folder and metrics, and the long dialogues phase 3 trains
memory attention on."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import torch

import persona_lm
from persona_lm.data.build import mix_shares
from persona_lm.errors import PersonaError
from persona_lm.io import read_jsonl, write_json
from persona_lm import lora
from persona_lm.model import GPT, GPTConfig
from persona_lm.params import Params
from persona_lm.tokenizer import ChatTokenizer, load_tokenizer
from persona_lm.train import checkpoint
from persona_lm.train.batches import EmotionBatches, MemoryBatches
from persona_lm.train.loop import PhaseResult
from persona_lm.train.tokens import TOKENS, load_tokens
from persona_lm.user_facts import make_facts, slots

TRANSCRIPTS = Path("data/interim/transcripts.parquet")
MESSAGES = Path("data/interim/dialogues/messages.jsonl")
SHAREGPT = Path("data/processed/sharegpt")
TOKENIZER = Path("models/tokenizer")
# Where a phase's resumable checkpoints go; the tournament gives each candidate its own folder (where checkpoints
# live changes no result, so it is not a param).
CHECKPOINTS = Path(os.environ.get("PERSONA_LM_CHECKPOINTS", "models/.checkpoints"))


def fingerprint(p: Params, sections: list[str], files: list[Path]) -> str:
    """Hash of the params sections, input files and code a phase depends on: a checkpoint is only resumed
    when all are unchanged, so an edited param, new data or changed code never continues a stale run. A phase's
    `stop_at` is left out: where a run stops does not change its steps, so a later stop continues the run."""
    h = hashlib.sha256()
    dump = p.model_dump(mode="json")
    for section in dump.values():
        if isinstance(section, dict):
            section.pop("stop_at", None)
    h.update(json.dumps({s: dump[s] for s in sections}, sort_keys=True).encode())
    code = sorted(Path(persona_lm.__file__).parent.rglob("*.py")) + [Path(sys.argv[0])]
    for f in [*files, *code]:
        for part in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if part.is_file():
                h.update(part.name.encode())
                with open(part, "rb") as f:  # in chunks: an input may be larger than memory
                    h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def token_stream(tok: ChatTokenizer, texts: list[str]) -> torch.Tensor:
    """Documents encoded and joined with <|endoftext|>, the boundary the model learns to respect."""
    ids: list[int] = []
    for doc in tok.encode_batch(texts):
        ids += doc + [tok.eot]
    return torch.tensor(ids, dtype=torch.long)


def corpus_tokens(split: str) -> np.ndarray:
    """The split's tokens from tokenize_corpus, memory-mapped: (tokens,) uint16 or uint32."""
    return load_tokens(TOKENS, split)


def personal_texts() -> list[str]:
    """The user's own voice: transcript utterances and their side (gpt) of imported messages."""
    texts = []
    if TRANSCRIPTS.exists():
        df = pl.read_parquet(TRANSCRIPTS, columns=["video_id", "text"])
        for _, group in df.group_by("video_id", maintain_order=True):
            texts.append(" ".join(group["text"].to_list()))
    if MESSAGES.exists():
        for _, row in read_jsonl(MESSAGES):
            texts += [m["value"] for m in row["conversations"] if m["from"] == "gpt"]
    return [t for t in texts if t.strip()]


def sharegpt_rows(split: str) -> list[dict]:
    path = SHAREGPT / f"{split}.jsonl"
    if not path.exists():
        raise PersonaError(f"{path} is missing: run `dvc repro build_sharegpt` first")
    return [row for _, row in read_jsonl(path)]


def with_system(p: Params, row: dict) -> list[dict]:
    turns = row["conversations"]
    if turns and turns[0]["from"] == "system":
        return turns
    return [{"from": "system", "value": p.persona.system_prompt}] + turns


def persona_id(p: Params, row: dict) -> int:
    """A row's `persona` field (0 when absent) picks the persona embedding it trains."""
    pid = row.get("persona", 0)
    if not isinstance(pid, int) or not 0 <= pid < p.model.n_personas:
        raise PersonaError(f"row {row.get('id')}: persona {pid!r} is not in 0..{p.model.n_personas - 1} "
                           "(raise model.n_personas)")
    return pid


def chat_examples(p: Params, tok: ChatTokenizer, rows: list[dict]) -> list[tuple[list[int], list[int], int]]:
    """Rendered conversations. Half of them (by a stable hash of the id) carry the emotion of each labelled
    reply as an input prefix, so the model learns to follow a requested mood and to speak without one."""
    out = []
    for row in rows:
        prefix = zlib.crc32(row["id"].encode()) % 2 == 0
        ids, mask, _ = tok.render(with_system(p, row), row.get("emotions"), emotion_prefix=prefix)
        out.append((ids, mask, persona_id(p, row)))
    return out


def share_weights(p: Params, rows: list[dict], examples: list[tuple]) -> torch.Tensor | None:
    """Sampling weight (N,) of each finetune example, so that each source gets its `sharegpt.shares` fraction
    of the tokens: a source's share / its total tokens, spread evenly over its rows. None when that is
    uniform (the shares match the sizes), so such a run samples exactly as a run without shares."""
    tokens: dict[str, float] = {}
    for row, ex in zip(rows, examples):
        tokens[row["source"]] = tokens.get(row["source"], 0) + min(len(ex[0]), p.model.block_size + 1)
    shares = mix_shares(p.sharegpt.shares, tokens)
    weights = torch.tensor([shares[row["source"]] / tokens[row["source"]] for row in rows], dtype=torch.float64)
    return None if torch.allclose(weights, weights[:1].expand_as(weights), rtol=1e-9, atol=0) else weights


def emotion_examples(p: Params, tok: ChatTokenizer, rows: list[dict]) -> list[tuple[list[int], list[int], int, int]]:
    """One example per labelled reply: the conversation up to and including that reply (no emotion prefix).
    Replies of the public emotion datasets teach the head only (their LM mask is zero): they already had their
    `sharegpt.shares` fraction in finetune, and phase 3 reads all of them."""
    index = {label: i for i, label in enumerate(p.persona.emotions)}
    out = []
    for row in rows:
        turns = with_system(p, row)
        labels = row.get("emotions") or []
        gpt_seen = 0
        for k, m in enumerate(turns):
            if m["from"] != "gpt":
                continue
            label = labels[gpt_seen] if gpt_seen < len(labels) else None
            gpt_seen += 1
            if label in index:  # the conversation up to this reply's end token (a template may add text after it)
                ids, mask, ends = tok.render(turns[: k + 1])
                mask = [0] * (ends[-1] + 1) if row.get("source") == "emotion" else mask[:ends[-1] + 1]
                out.append((ids[:ends[-1] + 1], mask, index[label], persona_id(p, row)))
    return out


def emotion_class_weights(p: Params, examples: list[tuple[list[int], list[int], int, int]]) -> torch.Tensor | None:
    """`emotion.class_weights` as a (n_emotions,) float tensor, or None for `none`.

    balanced: n / (k * count(label)) over the labelled replies in `examples` (n replies, k labels present), as
    sklearn's compute_class_weight("balanced") computes it (King & Zeng 2001); a label absent from the data
    gets 1.0 (no reply carries it, so its weight never enters the loss). With GoEmotions + DailyDialog, where
    neutral and joy are most replies, this raises rare moods' share of the gradient (README, Emotion benchmarks).
    """
    if p.emotion.class_weights == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([label for _, _, label, _ in examples])
    present = np.unique(labels)
    weights = np.ones(len(p.persona.emotions))
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def check_lora(p: Params, phase: str, tok) -> None:
    """Check `lora.target_modules` before any weights are loaded or downloaded: on a weightless skeleton of
    the base (built from its config.json), or of our model."""
    if not lora.uses_lora(p, phase) or p.lora.target_modules is None:
        return
    if p.base.model is None:
        with torch.device("meta"):
            lora.check_targets(_own(p, tok), p.lora.target_modules, own=True)
        return
    from persona_lm import base

    record = tok.info["base"]
    lora.check_targets(base.skeleton(base.config_folder(record), record["model"]), p.lora.target_modules, own=False)


def _own(p: Params, tok) -> GPT:
    arch = {**p.model.model_dump(exclude={"memory"}), "n_kv_head": p.model.n_kv_head or p.model.n_head}
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_emotions=len(p.persona.emotions), **arch))


def memory_config(p: Params) -> dict:
    """`model.memory` as GPTConfig fields (no memory layers when it is off)."""
    m = p.model.memory
    layers = (list(range(p.model.n_layer)) if m.layers is None else m.layers) if m.enabled else []
    return {"memory_layers": tuple(layers), "memory_compression": m.compression, "memory_slots": m.slots}


def check_memory(p: Params) -> None:
    if p.model.memory.enabled and p.base.model is not None:
        raise PersonaError(f"model.memory.enabled: memory attention is an option of our own model; it does not apply "
                           f"to base.model {p.base.model} (set model.memory.enabled: false or base.model: null)")


def new_model(p: Params, tok) -> torch.nn.Module:
    """The model phase 1 starts from: ours, randomly initialised, or the base as published; set to train what
    `pretrain` trains."""
    torch.manual_seed(p.seed)
    check_memory(p)
    if p.base.model is None:
        model = _own(p, tok)
    else:
        from persona_lm import base

        model = base.new(tok.info["base"], tok, len(p.persona.emotions), p.model.block_size)
    lora.apply(model, p, "pretrain", p.seed)
    model.emotion_head.requires_grad_(False)  # trained in phase 3 only; frozen it gets no decay and no DDP hook
    return model


def base_as_published(p: Params, tok):
    """The base with no weights loaded (a meta-device skeleton): enough for a folder that records it, when
    pretraining is skipped."""
    from persona_lm import base

    record = tok.info["base"]
    model = base.BaseLM(base.skeleton(base.config_folder(record), record["model"]), record,
                        len(p.persona.emotions), p.model.block_size)
    model.marker_ids = list(tok.marker_ids)
    return model


def skipped(live_dir: Path) -> PhaseResult:
    """The result of a phase with nothing to train; its curves folder is emptied (no curve is the truth)."""
    metrics = Path(live_dir) / "plots" / "metrics"
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir(parents=True)
    return PhaseResult(step=0, train_loss=math.nan, val_loss=math.nan, tokens_per_s=0.0, resumed_from=None, extra={})


def load_phase_model(path: Path, p: Params, phase: str) -> tuple[torch.nn.Module, ChatTokenizer]:
    """The previous phase's model, set to train what `phase` ("finetune" | "emotion") trains. Memory attention
    (`model.memory`) is turned on here for phase 3, which trains it; the earlier phases read single windows and
    are the same with or without it."""
    check_lora(p, phase, load_tokenizer(path))
    check_memory(p)
    model, tok, config = checkpoint.load_model(path, merge=False, trainable=True)
    if isinstance(model, GPT):
        model.set_memory(**{**memory_config(p), **({} if phase == "emotion" else {"memory_layers": ()})})
    if config.get("emotions") != p.persona.emotions:
        raise PersonaError(f"{path} was trained with emotions {config.get('emotions')}, params say "
                           f"{p.persona.emotions}: rerun the pipeline from pretrain")
    lora.apply(model, p, phase, p.seed)
    for name, param in model.named_parameters():
        if name.endswith("memory_bias"):  # memory attention's own weights train with adapters too
            param.requires_grad_(True)
    model.train()
    model.emotion_head.requires_grad_(phase == "emotion")
    torch.manual_seed(p.seed)  # dropout draws start from the seed, whatever loading the model drew before
    return model, tok


# What the assistant says when told a fact: never the fact itself, so that only the user's turn holds it.
ACKNOWLEDGEMENTS = ("Got it!", "Oh, nice!", "I'll remember that.", "Thanks for telling me!", "Good to know!",
                    "Ooh, I like that.", "Noted! *scribbles on a tiny notepad*")


def memory_dialogues(p: Params, tok: ChatTokenizer, rows: list[dict], n: int,
                     seed: int) -> list[tuple[list[int], list[int], int]]:
    """`n` long multi-turn dialogues that need memory, as (ids, mask, persona): the system prompt, then
    `model.memory.episodes` times: the user tells `model.memory.facts` facts (user_facts.make_facts, each with a
    short acknowledgement) and asks about one of them at once (in the window: the same skill without memory),
    exchanges (a user turn and its reply) from ShareGPT conversations of one persona follow until at least
    block_size tokens have passed (so the facts have left the window), then the user asks about each. Questions
    are training questions (never a test_question: those are the benchmark's held-out paraphrases), replies the
    fact's answer.
    Facts are distinct within a dialogue (at most the 21 slots of user_facts). Loss on assistant tokens, as in
    finetune."""
    block = p.model.block_size
    rng = random.Random(seed)
    fillers: dict[int, list[tuple[list[int], list[int]]]] = {}
    for row in rows:  # exchanges short enough that the facts stay within memory's reach
        turns = row["conversations"]
        for a, b in zip(turns, turns[1:]):
            if a["from"] == "human" and b["from"] == "gpt":
                ids, mask, _ = tok.render([a, b])
                if len(ids) <= block // 2:
                    fillers.setdefault(persona_id(p, row), []).append((ids, mask))
    if not fillers:
        raise PersonaError(f"model.memory: no ShareGPT train exchange (a user turn and its reply) of at most "
                           f"{block // 2} tokens to build long dialogues from")
    personas = sorted(fillers)
    per = p.model.memory.facts
    n_facts = min(per * p.model.memory.episodes, len(slots()))
    out = []
    for _ in range(n):
        persona = rng.choice(personas)
        ids, mask, _ = tok.render([{"from": "system", "value": p.persona.system_prompt}])
        facts = make_facts(n_facts, rng.randrange(1 << 30))
        for e in range(0, n_facts, per):
            told = facts[e:e + per]
            exchanges = [(f.statement, rng.choice(ACKNOWLEDGEMENTS)) for f in told]
            near = rng.choice(told)
            exchanges.append((rng.choice(near.train_questions), near.answer))
            for said, reply in exchanges:
                more, more_mask, _ = tok.render([{"from": "human", "value": said}, {"from": "gpt", "value": reply}])
                ids, mask = ids + more, mask + more_mask
            mark = len(ids)
            while len(ids) - mark < block:
                more, more_mask = rng.choice(fillers[persona])
                ids, mask = ids + more, mask + more_mask
            for f in rng.sample(told, len(told)):
                turn = [{"from": "human", "value": rng.choice(f.train_questions)}, {"from": "gpt", "value": f.answer}]
                more, more_mask, _ = tok.render(turn)
                ids, mask = ids + more, mask + more_mask
        out.append((ids, mask, persona))
    return out


def memory_batches(p: Params, tok: ChatTokenizer, emotion: EmotionBatches) -> MemoryBatches:
    """Phase 3's batches with memory attention on: the emotion batches plus long dialogues (`model.memory.share`)."""
    dialogues = memory_dialogues(p, tok, sharegpt_rows("train"), p.model.memory.dialogues, p.seed)
    return MemoryBatches(emotion=emotion, dialogues=dialogues, share=p.model.memory.share,
                         batch_size=p.model.memory.batch_size, block_size=emotion.block_size, pad_id=emotion.pad_id,
                         seed=emotion.seed)


def finish(p: Params, name: str, model: GPT, result: PhaseResult, out: Path) -> dict | None:
    """Write the phase's model folder, its metrics (losses, parameter breakdown: reproducible) and its
    throughput (reports/speed/: a timing, kept apart so metrics compare exactly across runs). Under DDP only
    rank 0 writes: every rank holds the same weights, and two renames onto one folder would collide."""
    if not result.main:
        return None
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    if isinstance(model, GPT):
        lora.merge(model)  # our model's folders hold plain weights: decoding keeps the lean path
    checkpoint.save_model_dir(out, model, TOKENIZER, {
        "emotions": p.persona.emotions, "persona": p.persona.name, "system_prompt": p.persona.system_prompt,
        "phase": name, "step": result.step, "git_sha": checkpoint.git_sha(),
    })
    metrics = {"step": result.step, "train_loss": _round(result.train_loss), "val_loss": _round(result.val_loss),
               **{k: _round(v) for k, v in result.extra.items()}, "params": model.param_counts(),
               "trainable_params": trainable}
    write_json(Path(f"reports/{name}.json"), metrics)
    write_json(Path(f"reports/speed/{name}.json"), {"train_tokens_per_s": round(result.tokens_per_s, 1),
                                                   **peak_memory_mb()})
    return metrics


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory (MB, the kernel's high-water mark: weights, optimizer state,
    activations and the phase's data together) and, after CUDA training, the peak CUDA memory torch allocated."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    return out


def _round(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None  # JSON has no NaN (a phase of 0 steps has no loss)
