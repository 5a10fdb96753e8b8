"""Stage finetune (phase 2): the pretrained model learns the persona from ShareGPT train, with loss on the
assistant's tokens only, each source sampled at its `sharegpt.shares` fraction of the tokens, and an optional
share of corpus batches replayed -> models/finetune/. All weights are
trained, or LoRA adapters when `lora.r > 0` and `lora.phases` lists finetune."""

from __future__ import annotations

from pathlib import Path

from persona_lm import stage
from persona_lm.params import Params
from persona_lm.train import phase
from persona_lm.train.batches import ChatBatches
from persona_lm.train.loop import train
from persona_lm.train.tokens import META

IN, OUT = Path("models/pretrain"), Path("models/finetune")


def main(p: Params) -> None:
    model, tok = phase.load_phase_model(IN, p, "finetune")
    train_rows, val_rows = phase.sharegpt_rows("train"), phase.sharegpt_rows("val")
    train_ex, val_ex = phase.chat_examples(p, tok, train_rows), phase.chat_examples(p, tok, val_rows)
    batches = ChatBatches(
        train=train_ex, val=val_ex,
        train_weights=phase.share_weights(p, train_rows, train_ex),
        val_weights=phase.share_weights(p, val_rows, val_ex),
        corpus=phase.corpus_tokens("train") if p.finetune.replay > 0 else None,
        replay=p.finetune.replay, batch_size=p.finetune.batch_size, block_size=model.cfg.block_size,
        pad_id=tok.pad, seed=p.seed)
    fp = phase.fingerprint(p, ["seed", "persona", "model", "base", "lora", "finetune"], [IN, phase.SHAREGPT, phase.TOKENS / META])
    result = train(model, p.finetune, batches, phase.CHECKPOINTS / "finetune", fp,
                   {"seed": p.seed, "live_dir": "reports/train/finetune"}, "finetune")
    phase.finish(p, "finetune", model, result, OUT)


if __name__ == "__main__":
    stage.run(main)
