"""Phase-specific batches: corpus sequences (pretrain), rendered conversations (finetune), labelled replies
(train_emotion), and with memory attention long dialogues cut into consecutive windows (train_emotion).

Labels are shifted exactly once, here: a sequence of n+1 tokens gives inputs `ids[:-1]` and targets
`ids[1:]`; the model never shifts. Targets are -100 wherever no loss is wanted (prompt tokens, padding).
Sampling is stateless: batch `step` of rank `rank` draws from a generator seeded by (seed, split, step,
rank), so a resumed run sees exactly the batches an uninterrupted one would, with no sampler state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from persona_lm.model import window_stride

IGNORE = -100
_SPLIT_SALT = {"train": 0, "val": 1}


def generator(seed: int, split: str, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + _SPLIT_SALT[split]) * 1_000_033 + step) * 257 + rank)


def sample_windows(stream: torch.Tensor | np.ndarray, n: int, block_size: int,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random windows of block_size+1 tokens from a 1-D token stream -> (inputs, targets), each (n, block_size)
    int64. The stream is a tensor or a numpy array such as tokenize_corpus's memmap, of which only the windows'
    pages are read; the same generator draws the same windows from either."""
    if len(stream) <= block_size + 1:
        reps = (block_size + 2) // max(len(stream), 1) + 1
        stream = torch.as_tensor(np.asarray(stream, dtype=np.int64)).repeat(reps)
    starts = torch.randint(0, len(stream) - block_size - 1, (n,), generator=g)
    idx = starts[:, None] + torch.arange(block_size + 1)
    if isinstance(stream, np.ndarray):
        windows = torch.from_numpy(stream[idx.numpy()].astype(np.int64))
    else:
        windows = stream[idx]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def pad_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) pairs of n+1 tokens -> right-padded (inputs, targets) with targets -100 where mask is 0."""
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        y[b, :n] = torch.where(keep, tgt, IGNORE)
    return x, y


@dataclass
class CorpusBatches:
    """Pretraining: windows from the corpus stream, a `personal_mix` share from the personal-voice stream."""

    train: torch.Tensor | np.ndarray  # (tokens,); tokenize_corpus's memmap in the pretrain stage
    val: torch.Tensor | np.ndarray
    personal: torch.Tensor | None
    personal_mix: float
    batch_size: int
    block_size: int
    seed: int

    def get(self, split: str, step: int, rank: int = 0) -> dict:
        g = generator(self.seed, split, step, rank)
        if split == "val" or self.personal is None or self.personal_mix == 0:
            x, y = sample_windows(self.train if split == "train" else self.val, self.batch_size, self.block_size, g)
            return {"x": x, "y": y}
        n_personal = int((torch.rand(self.batch_size, generator=g) < self.personal_mix).sum())
        x, y = sample_windows(self.train, self.batch_size - n_personal, self.block_size, g)
        if n_personal:
            px, py = sample_windows(self.personal, n_personal, self.block_size, g)
            x, y = torch.cat([x, px]), torch.cat([y, py])
        return {"x": x, "y": y}


def pick(pool: list, n: int, g: torch.Generator) -> list:
    return [pool[i] for i in torch.randint(0, len(pool), (n,), generator=g).tolist()]


def crop(ids: list[int], mask: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """Keep the first block_size+1 tokens: the system prompt and the opening turns are what chat sees first."""
    return ids[: block_size + 1], mask[: block_size + 1]


@dataclass
class ChatBatches:
    """Finetuning: rendered conversations with loss on assistant tokens only, plus optional corpus replay.
    Each example is (ids, mask, persona id); replayed corpus text is persona 0's."""

    train: list[tuple[list[int], list[int], int]]
    val: list[tuple[list[int], list[int], int]]
    corpus: torch.Tensor | np.ndarray | None
    replay: float
    batch_size: int
    block_size: int
    pad_id: int
    seed: int
    train_weights: torch.Tensor | None = None  # (N,) sampling weights of train (the source shares); None = uniform
    val_weights: torch.Tensor | None = None

    def get(self, split: str, step: int, rank: int = 0) -> dict:
        g = generator(self.seed, split, step, rank)
        pool = self.train if split == "train" else self.val
        if split == "train" and self.corpus is not None and self.replay > 0:
            if float(torch.rand(1, generator=g)) < self.replay:
                x, y = sample_windows(self.corpus, self.batch_size, self.block_size, g)
                return {"x": x, "y": y}
        weights = self.train_weights if split == "train" else self.val_weights
        if weights is None:
            picks = pick(pool, self.batch_size, g)
        else:
            picks = [pool[i] for i in torch.multinomial(weights, self.batch_size, replacement=True, generator=g).tolist()]
        x, y = pad_sequences([crop(ids, mask, self.block_size) for ids, mask, _ in picks], self.pad_id)
        return {"x": x, "y": y, "persona": torch.tensor([persona for _, _, persona in picks])}


@dataclass
class EmotionBatches:
    """Emotion phase: each example is a conversation up to a labelled reply; the head reads the position that
    predicts the reply's end-of-turn token, and the LM loss on the reply keeps the model a good speaker."""

    train: list[tuple[list[int], list[int], int, int]]   # (ids, mask, label, persona), ids ending at <|end|>
    val: list[tuple[list[int], list[int], int, int]]
    batch_size: int
    block_size: int
    pad_id: int
    seed: int

    def get(self, split: str, step: int, rank: int = 0) -> dict:
        g = generator(self.seed, split, step, rank)
        pool = self.train if split == "train" else self.val
        return collate_emotion(pick(pool, self.batch_size, g), self.block_size, self.pad_id)


def collate_emotion(examples, block_size: int, pad_id: int) -> dict:
    """Crop each example from the left (the reply is at the end), pad, and point at the <|end|>-predicting slot."""
    seqs, labels, index, personas = [], [], [], []
    for ids, mask, label, persona in examples:
        ids, mask = ids[-(block_size + 1):], mask[-(block_size + 1):]
        seqs.append((ids, mask))
        labels.append(label)
        index.append(len(ids) - 2)
        personas.append(persona)
    x, y = pad_sequences(seqs, pad_id)
    return {"x": x, "y": y, "emotion_index": torch.tensor(index), "emotion_label": torch.tensor(labels),
            "persona": torch.tensor(personas)}


@dataclass
class MemoryBatches:
    """Phase 3 with memory attention: a `share` of the training batches are long dialogues cut into windows
    (collate_windows), the model carrying memory from each to the next; the other batches, and every val batch,
    are the emotion phase's own. The choice draws from its own generator, so the emotion batches are those a
    run without memory gets at the same step."""

    emotion: EmotionBatches
    dialogues: list[tuple[list[int], list[int], int]]  # (ids, mask, persona), any length
    share: float
    batch_size: int
    block_size: int
    pad_id: int
    seed: int

    def get(self, split: str, step: int, rank: int = 0) -> dict:
        if split == "train":
            g = generator(self.seed + 1, split, step, rank)
            if float(torch.rand(1, generator=g)) < self.share:
                return collate_windows(pick(self.dialogues, self.batch_size, g), self.block_size, self.pad_id)
        return self.emotion.get(split, step, rank)


def collate_windows(examples, block_size: int, pad_id: int) -> dict:
    """(ids, mask, persona) sequences -> inputs (B, K, block_size): K windows window_stride apart, as
    generate.Decoder re-windows a long conversation, and targets (B, L) for the L positions they cover, in order
    (GPT.windows gives one set of logits per position). Rows are right-padded; padding has no targets."""
    stride = window_stride(block_size)
    n = max(len(ids) for ids, _, _ in examples) - 1
    K = 1 + max(0, -(-(n - block_size) // stride))
    x, y = pad_sequences([(ids, mask) for ids, mask, _ in examples], pad_id)
    width = (K - 1) * stride + block_size
    x = torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad_id)
    y = torch.nn.functional.pad(y, (0, width - y.shape[1]), value=IGNORE)
    x = x[:, torch.arange(K)[:, None] * stride + torch.arange(block_size)]
    return {"x": x, "y": y, "persona": torch.tensor([persona for _, _, persona in examples])}
