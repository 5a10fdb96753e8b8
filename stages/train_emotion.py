"""Stage train_emotion (phase 3): the emotion head learns to read the mood of a reply, jointly with the LM
loss at `emotion.lm_weight` (or alone, on a frozen backbone) -> models/final/. The backbone trains all its
weights, or LoRA adapters when `lora.r > 0` and `lora.phases` lists emotion. Then the diagonal Fisher of the final
model on `weight_memory.fisher_examples` ShareGPT train conversations goes beside its weights (fisher.safetensors),
for weight memory's EWC penalty."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from persona_lm import memory, stage
from persona_lm.errors import PersonaError
from persona_lm.params import Params
from persona_lm.train import phase
from persona_lm.train.batches import EmotionBatches
from persona_lm.train.loop import resolve_device, train

IN, OUT = Path("models/finetune"), Path("models/final")


def main(p: Params) -> None:
    model, tok = phase.load_phase_model(IN, p, "emotion")
    train_ex = phase.emotion_examples(p, tok, phase.sharegpt_rows("train"))
    val_ex = phase.emotion_examples(p, tok, phase.sharegpt_rows("val"))
    if not train_ex or not val_ex:
        raise PersonaError(f"train_emotion needs labelled replies in both splits (train {len(train_ex)}, "
                           f"val {len(val_ex)}): keep templates in the mix or add emotion.datasets")
    if p.emotion.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("emotion_head")
    batches = EmotionBatches(train=train_ex, val=val_ex, batch_size=p.emotion.batch_size,
                             block_size=model.cfg.block_size, pad_id=tok.pad, seed=p.seed)
    if p.model.memory.enabled:  # memory attention also learns from long dialogues that outgrow the window
        batches = phase.memory_batches(p, tok, batches)
    fp = phase.fingerprint(p, ["seed", "persona", "model", "base", "lora", "emotion"], [IN, phase.SHAREGPT])
    result = train(model, p.emotion, batches, phase.CHECKPOINTS / "train_emotion", fp,
                   {"seed": p.seed, "live_dir": "reports/train/emotion"}, "train_emotion",
                   lm_weight=p.emotion.lm_weight, class_weights=phase.emotion_class_weights(p, train_ex))
    phase.finish(p, "train_emotion", model, result, OUT)
    if p.weight_memory.fisher_examples and result.main:
        rows = phase.sharegpt_rows("train")
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(p.seed))[:p.weight_memory.fisher_examples]
        examples = [(ids, mask) for ids, mask, _ in phase.chat_examples(p, tok, [rows[i] for i in pick.tolist()])]
        log = logging.getLogger("persona_lm.train")
        try:
            path, seconds = memory.write_fisher(OUT, examples, resolve_device(p.emotion.device))
        except PersonaError as e:  # the model is written and good: weight memory then learns without EWC
            log.warning("train_emotion: no %s written: %s", memory.FISHER_FILE, e)
        else:
            log.info("train_emotion: Fisher of %d conversations -> %s in %.1f s", len(examples), path, seconds)


if __name__ == "__main__":
    stage.run(main)
