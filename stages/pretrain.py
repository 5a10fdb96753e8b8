"""Stage pretrain (phase 1): next-token prediction on the corpus (tokenize_corpus's memory-mapped tokens), with
the user's own voice (transcripts and their side of message exports) mixed in at `pretrain.personal_mix`
-> models/pretrain/.

From scratch this trains a new model. With `base.model` it continues the base's pretraining (through LoRA when
`lora.phases` lists pretrain); `pretrain.max_iters: 0` uses the base as published and loads no weights here.
"""

from __future__ import annotations

from pathlib import Path

from persona_lm import stage
from persona_lm.params import Params
from persona_lm.tokenizer import load_tokenizer
from persona_lm.train import phase
from persona_lm.train.batches import CorpusBatches
from persona_lm.train.loop import train
from persona_lm.train.tokens import META

OUT, LIVE = Path("models/pretrain"), Path("reports/train/pretrain")


def main(p: Params) -> None:
    tok = load_tokenizer(phase.TOKENIZER)
    if p.base.model is not None and p.pretrain.max_iters == 0:
        phase.finish(p, "pretrain", phase.base_as_published(p, tok), phase.skipped(LIVE), OUT)
        return
    phase.check_lora(p, "pretrain", tok)
    personal = phase.personal_texts()
    batches = CorpusBatches(
        train=phase.corpus_tokens("train"),
        val=phase.corpus_tokens("val"),
        personal=phase.token_stream(tok, personal) if personal else None,
        personal_mix=p.pretrain.personal_mix, batch_size=p.pretrain.batch_size,
        block_size=p.model.block_size, seed=p.seed)
    model = phase.new_model(p, tok)
    inputs = [phase.TOKENIZER, phase.TOKENS / META, phase.TRANSCRIPTS, phase.MESSAGES]
    fp = phase.fingerprint(p, ["seed", "persona", "model", "base", "lora", "pretrain"], [f for f in inputs if f.exists()])
    result = train(model, p.pretrain, batches, phase.CHECKPOINTS / "pretrain", fp,
                   {"seed": p.seed, "live_dir": LIVE}, "pretrain")
    phase.finish(p, "pretrain", model, result, OUT)


if __name__ == "__main__":
    stage.run(main)
