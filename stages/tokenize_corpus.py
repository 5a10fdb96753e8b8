"""Stage tokenize_corpus: the filtered corpus, encoded with models/tokenizer -> data/processed/tokens/
(train.bin, val.bin: flat token ids, documents joined by <|endoftext|>; meta.json: dtype, counts, SHA-256).

Pretraining and finetune's corpus replay memory-map these files (persona_lm.train.tokens), so a corpus larger
than RAM trains; this stage streams the corpus a batch at a time, so it does not need it in memory either. When
the corpus has no val documents, val.bin holds the first train document, so pretraining's val loss is defined.
"""

from __future__ import annotations

import logging
import sys
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from persona_lm import stage
from persona_lm.io import atomic_dir, write_json
from persona_lm.params import Params
from persona_lm.tokenizer import load_tokenizer
from persona_lm.train.tokens import META, TOKENS, corpus_batches, corpus_docs, corpus_texts, token_dtype, write_tokens

log = logging.getLogger("persona_lm")


def main(p: Params) -> None:
    tok = load_tokenizer(Path("models/tokenizer"))
    docs = corpus_docs()
    splits = {}
    with atomic_dir(TOKENS) as tmp:
        for split in ("train", "val"):
            with tqdm(total=docs.get(split, 0), unit="doc", desc=f"tokenize_corpus {split}", file=sys.stderr,
                      mininterval=1.0 if sys.stderr.isatty() else 15.0) as bar:
                batches = (bar.update(len(texts)) or texts for texts in corpus_batches(split))
                splits[split] = write_tokens(tok, batches, tmp / f"{split}.bin")
        if splits["val"]["docs"] == 0:
            splits["val"] = {**write_tokens(tok, [list(islice(corpus_texts("train"), 1))], tmp / "val.bin"),
                             "from_train": True}
        write_json(tmp / META, {"dtype": token_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size,
                                "eot": tok.eot, "splits": splits})
    for split, info in splits.items():
        log.info("tokenize_corpus: %s: %d documents, %d tokens (%.2f bytes/token)", split, info["docs"],
                 info["tokens"], info["bytes"] / max(info["tokens"], 1))


if __name__ == "__main__":
    stage.run(main)
