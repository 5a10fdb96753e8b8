"""Stage train_tokenizer: filtered corpus + ShareGPT train text -> models/tokenizer/. The corpus is streamed
(the trainer keeps word counts, not texts), so it need not fit in memory.

From scratch, a tokenizer is trained (tokenizer.json). With `base.model` the base is located and checked
(before any weights are downloaded) and its own tokenizer and chat template are taken, with our markers added
as `base.markers` says (tokenizer files + chat.json, which records the base). Either way the metrics give the
vocabulary size and bytes per token on the held-out text (corpus val split + ShareGPT val), the figure that
makes tokenizers comparable.
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

from persona_lm import stage
from persona_lm.io import atomic_dir, write_json
from persona_lm.params import Params
from persona_lm.tokenizer import ChatTokenizer, TemplateTokenizer, iter_texts, save_tokenizer, train_tokenizer
from persona_lm.train.phase import TOKENIZER, sharegpt_rows
from persona_lm.train.tokens import corpus_batches, corpus_texts

log = logging.getLogger("persona_lm.train_tokenizer")


def main(p: Params) -> None:
    metrics = {}
    if p.base.model is None:
        texts = chain(corpus_texts("train"), iter_texts(sharegpt_rows("train")))
        tok = ChatTokenizer(train_tokenizer(texts, p.tokenizer.kind, p.tokenizer.vocab_size, p.persona.emotions,
                                            p.tokenizer.min_frequency))
        metrics["kind"] = p.tokenizer.kind
    else:
        from persona_lm import base

        folder, record = base.resolve(p.base)
        n_params = base.check(folder, p.base)
        tok = TemplateTokenizer.build(folder, p.base.markers, p.persona.emotions, record)
        metrics.update(kind="base", base=record["model"], base_params=n_params, new_tokens=tok.info["new_tokens"])
    n_bytes = n_tokens = 0
    for held_out in chain(corpus_batches("val"), [list(iter_texts(sharegpt_rows("val")))]):
        n_bytes += sum(len(t.encode("utf-8")) for t in held_out)
        n_tokens += sum(len(ids) for ids in tok.encode_batch(held_out))
    with atomic_dir(TOKENIZER) as tmp:
        if isinstance(tok, ChatTokenizer):
            save_tokenizer(tok.tok, tmp / "tokenizer.json")
        else:
            tok.save(tmp)
    metrics = {"vocab_size": tok.vocab_size, **metrics, "val_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
               "val_tokens": n_tokens}
    write_json(Path("reports/tokenizer.json"), metrics)
    log.info("tokenizer: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
