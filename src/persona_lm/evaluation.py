"""Evaluation of a model folder: what the evaluate stage measures.

Bits per byte on the corpus val split (comparable across tokenizers, unlike per-token loss), assistant-token
loss on ShareGPT val (per token, and in bits per byte of reply text, which compares a base model with ours), emotion accuracy / macro-F1 / confusion on held-out labelled replies, distinct-n and samples
from fixed prompts (the conversation probes are in persona_lm.probes). Everything here is deterministic for a
given model and params; timings are measured separately so the quality metrics reproduce exactly.
"""

from __future__ import annotations

import math
import time
from itertools import islice
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from persona_lm.generate import generate, generate_batch
from persona_lm.train.batches import IGNORE, collate_emotion, crop, pad_sequences


def _encoded(tok, texts: Iterable[str], batch: int = 64) -> Iterator[tuple[str, list[int]]]:
    """(text, ids) pairs, encoded `batch` texts at a time, read no further than the caller goes."""
    texts = iter(texts)
    while chunk := list(islice(texts, batch)):
        yield from zip(chunk, tok.encode_batch(chunk))


@torch.inference_mode()
def bits_per_byte(model, tok, texts: Iterable[str], max_tokens: int, batch_size: int = 8) -> dict:
    """Total next-token cross-entropy in bits over non-overlapping windows, divided by the UTF-8 bytes those
    tokens spell (each <|endoftext|> separator counted as one byte). Documents are taken in order, whole, up to
    `max_tokens`; `texts` is read only that far."""
    T = model.cfg.block_size
    ids, n_bytes = [], 0
    for text, doc in _encoded(tok, texts):
        if ids and len(ids) + len(doc) + 1 > max_tokens:
            break
        ids += doc + [tok.eot]
        n_bytes += len(text.encode("utf-8")) + 1
    stream = torch.tensor(ids, dtype=torch.long)
    windows = [stream[i:i + T + 1] for i in range(0, max(len(stream) - 1, 1), T)]
    nats, n_tok = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = [w for w in windows[b:b + batch_size] if len(w) > 1]
        x, y = pad_sequences([(w.tolist(), [1] * len(w)) for w in chunk], tok.pad)
        logits, _ = model(x)
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
        n_tok += int((y != IGNORE).sum())
    return {"bpb": nats / math.log(2) / max(n_bytes, 1), "tokens": n_tok, "bytes": n_bytes,
            "loss": nats / max(n_tok, 1)}


@torch.inference_mode()
def assistant_loss(model, tok, examples: list[tuple[list[int], list[int]]], batch_size: int = 16) -> dict:
    """The finetuning objective on held-out conversations: mean cross-entropy over the assistant's tokens
    (`loss`, nats per token), and the same total in bits per byte of reply text (`bpb`: each end-of-turn marker
    counted as one byte), which compares runs with different tokenizers, e.g. a base model against ours."""
    nats, n, n_bytes = 0.0, 0, 0
    for b in range(0, len(examples), batch_size):
        chunk = [crop(ids, mask, model.cfg.block_size) for ids, mask, *_ in examples[b:b + batch_size]]
        x, y = pad_sequences(chunk, tok.pad)
        logits, _ = model(x)
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
        n += int((y != IGNORE).sum())
        for ids, mask in chunk:
            targets = [t for t, m in zip(ids[1:], mask[1:]) if m]
            ends = sum(t in tok.stop_ids for t in targets)
            n_bytes += len(tok.decode([t for t in targets if t not in tok.stop_ids]).encode("utf-8")) + ends
    return {"loss": nats / max(n, 1), "bpb": nats / math.log(2) / max(n_bytes, 1)}


@torch.inference_mode()
def emotion_scores(model, tok, examples, labels: list[str], batch_size: int = 32) -> dict:
    """Accuracy, macro-F1 over the labels present in the data, and (actual, predicted) pairs for the
    confusion matrix."""
    pairs = []
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        batch = collate_emotion(chunk, model.cfg.block_size, tok.pad)
        _, emo = model(batch["x"], persona=batch["persona"], emotion_index=batch["emotion_index"])
        for actual, pred in zip(batch["emotion_label"].tolist(), emo.argmax(-1).tolist()):
            pairs.append({"actual": labels[actual], "predicted": labels[pred]})
    present = sorted({p["actual"] for p in pairs})
    f1s = []
    for label in present:
        tp = sum(p["actual"] == label and p["predicted"] == label for p in pairs)
        fp = sum(p["actual"] != label and p["predicted"] == label for p in pairs)
        fn = sum(p["actual"] == label and p["predicted"] != label for p in pairs)
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    acc = sum(p["actual"] == p["predicted"] for p in pairs) / max(len(pairs), 1)
    return {"accuracy": acc, "macro_f1": sum(f1s) / max(len(f1s), 1), "n": len(pairs), "pairs": pairs}


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over a set of replies: low values mean repetitive output."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def samples(model, tok, system_prompt: str, prompts: list[str], emotions: list[str], **sampling) -> tuple[list[dict], dict]:
    """Replies to fixed prompts, each sampled as `generate()` samples it alone with the same seed, decoded in one
    batch (a prompt too long for that is decoded alone, re-windowing as chat does); plus decode timings (kept
    apart from the deterministic metrics)."""
    t0 = time.perf_counter()
    encoded = [tok.prompt([{"from": "system", "value": system_prompt}, {"from": "human", "value": p}]) for p in prompts]
    room = model.cfg.block_size - sampling.get("max_new_tokens", 256)
    batched = [i for i, ids in enumerate(encoded) if len(ids) <= room]
    results = dict(zip(batched, generate_batch(model, tok, [encoded[i] for i in batched], emotions=emotions, **sampling)))
    results |= {i: generate(model, tok, ids, emotions=emotions, **sampling)
                for i, ids in enumerate(encoded) if i not in results}
    seconds = time.perf_counter() - t0
    out = [{"prompt": prompt, "reply": results[i].text, "emotion": results[i].emotion,
            "finish_reason": results[i].finish_reason} for i, prompt in enumerate(prompts)]
    n_new = sum(r.n_new for r in results.values())
    return out, {"generated_tokens": n_new, "generation_tokens_per_s": n_new / max(seconds, 1e-9)}
