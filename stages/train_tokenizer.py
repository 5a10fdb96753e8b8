"""Stage train_tokenizer: filtered corpus + ShareGPT train text -> models/tokenizer/tokenizer.json.

Reports vocabulary size and bytes per token on the held-out text (corpus val split + ShareGPT val), the
figure that makes tokenizers comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path

from persona_lm import stage
from persona_lm.io import write_json
from persona_lm.params import Params
from persona_lm.tokenizer import ChatTokenizer, iter_texts, save_tokenizer, train_tokenizer
from persona_lm.train.phase import TOKENIZER, corpus_texts, sharegpt_rows

log = logging.getLogger("persona_lm.train_tokenizer")


def main(p: Params) -> None:
    texts = corpus_texts("train") + list(iter_texts(sharegpt_rows("train")))
    tok = train_tokenizer(texts, p.tokenizer.kind, p.tokenizer.vocab_size, p.persona.emotions,
                          p.tokenizer.min_frequency)
    held_out = corpus_texts("val") + list(iter_texts(sharegpt_rows("val")))
    chat = ChatTokenizer(tok)
    n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
    n_tokens = sum(len(ids) for ids in chat.encode_batch(held_out))
    save_tokenizer(tok, TOKENIZER)
    metrics = {"vocab_size": chat.vocab_size, "kind": p.tokenizer.kind,
               "val_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4), "val_tokens": n_tokens}
    write_json(Path("reports/tokenizer.json"), metrics)
    log.info("tokenizer: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
