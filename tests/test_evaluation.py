"""Evaluation metrics that compare runs across tokenizers: the reply loss in bits per byte counts exactly the
reply text (plus one byte per end-of-turn marker), whatever the tokenizer."""

from __future__ import annotations

import math

import pytest

from bases import EMOTIONS, llama_base
from conftest import tiny_model_dir
from persona_lm.evaluation import assistant_loss
from persona_lm.train.checkpoint import load_model

pytest.importorskip("transformers")

TURNS = [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "*waves* Hi, café friend!"},
         {"from": "human", "value": "How are you?"}, {"from": "gpt", "value": "I am fine."}]
REPLY_BYTES = len("*waves* Hi, café friend!".encode()) + len("I am fine.".encode()) + 2  # + two end markers


def test_reply_bits_per_byte_counts_the_reply_text(tmp_path):
    from persona_lm import base
    from persona_lm.params import Base
    from persona_lm.tokenizer import TemplateTokenizer

    ours, ours_tok, _ = load_model(tiny_model_dir(tmp_path, ["hello there friend", "how are you"], EMOTIONS))
    folder = llama_base(tmp_path / "base")
    _, record = base.resolve(Base(model=str(folder)))
    for markers in ("text", "tokens"):
        tok = TemplateTokenizer.build(folder, markers, EMOTIONS, record)
        for model, t in ((ours, ours_tok), (base.new(record, tok, len(EMOTIONS), 128).eval(), tok)):
            ids, mask, _ = t.render(TURNS)
            got = assistant_loss(model, t, [(ids, mask)])
            n_targets = sum(mask[1:])
            assert got["bpb"] == pytest.approx(got["loss"] * n_targets / math.log(2) / REPLY_BYTES)
