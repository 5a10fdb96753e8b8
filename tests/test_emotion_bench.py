"""Emotion benchmarks: items (every labelled utterance, both DailyDialog speakers), the overlap guard, the
baselines, the metrics, the reports, and the balanced class weights of the emotion loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from persona_lm import emotion_bench as eb
from persona_lm.errors import ParamsError, PersonaError
from persona_lm.params import EmotionBenchmark, parse_params

EMOTIONS = ["neutral", "joy", "sadness", "anger", "fear", "surprise", "disgust", "love", "curiosity"]
NAMES = ["admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity", "desire",
         "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear", "gratitude", "grief",
         "joy", "love", "nervousness", "optimism", "pride", "realization", "relief", "remorse", "sadness",
         "surprise", "neutral"]
GO = {name: i for i, name in enumerate(NAMES)}


def goemotions(tmp: Path, lines: list[tuple[str, str]], name: str = "dev.tsv") -> Path:
    path = tmp / name
    path.write_text("".join(f"{text}\t{GO[label]}\tid{i}\n" for i, (text, label) in enumerate(lines)))
    return path


def dailydialog(tmp: Path, dialogues: list[list[tuple[str, int]]]) -> Path:
    path = tmp / "dialogues_validation.txt"
    path.write_text("".join(" __eou__ ".join(u for u, _ in d) + " __eou__\n" for d in dialogues))
    (tmp / "dialogues_emotion_validation.txt").write_text("".join(" ".join(str(c) for _, c in d) + "\n"
                                                                 for d in dialogues))
    return path


def row(*turns: tuple[str, str], emotions=None) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns],
            "emotions": emotions or [None] * sum(r == "gpt" for r, _ in turns)}


DIALOGUES = [
    [("Hi , how are you ?", 0), ("Great , thanks !", 4), ("I lost my keys .", 5)],
    [("Watch out !", 3), ("What ? !", 6)],
]


def test_dailydialog_scores_every_labelled_utterance_of_both_speakers(tmp_path):
    b = EmotionBenchmark(kind="dailydialog", path=str(dailydialog(tmp_path, DIALOGUES)))
    bench = eb.read_benchmark(b, EMOTIONS)
    assert bench.name == "dailydialog_validation"
    assert bench.labels == ["neutral", "joy", "sadness", "fear", "surprise"]
    assert bench.texts == ["Hi, how are you?", "Great, thanks!", "I lost my keys.", "Watch out!", "What?!"]
    roles = [[m["from"] for m in r["conversations"]] for r in bench.rows]
    # the scored utterance is the gpt reply; earlier ones alternate roles backwards from it
    assert roles == [["gpt"], ["human", "gpt"], ["gpt", "human", "gpt"], ["gpt"], ["human", "gpt"]]
    assert [r["emotions"][-1] for r in bench.rows] == bench.labels
    assert all(e is None for r in bench.rows for e in r["emotions"][:-1])
    # one unit per dialogue, cut to the even number of utterances the training reader keeps
    assert bench.units[0] == bench.units[1] == bench.units[2] == "hi how are you great thanks"


def test_dailydialog_labels_outside_the_set_are_counted_skips(tmp_path):
    b = EmotionBenchmark(kind="dailydialog", path=str(dailydialog(tmp_path, DIALOGUES)))
    bench = eb.read_benchmark(b, ["neutral", "joy", "sadness"])
    assert bench.labels == ["neutral", "joy", "sadness"]
    assert sum(bench.skipped.values()) == 2


def test_goemotions_items_are_replies_to_the_training_prompts(tmp_path):
    path = goemotions(tmp_path, [("I love this so much", "love"), ("Why would you do that?", "curiosity"),
                                 ("a [RELIGION] thing", "joy")])
    bench = eb.read_benchmark(EmotionBenchmark(kind="goemotions", path=str(path)), EMOTIONS)
    assert bench.name == "goemotions_dev"
    assert bench.labels == ["love", "curiosity"]
    assert [[m["from"] for m in r["conversations"]] for r in bench.rows] == [["human", "gpt"]] * 2
    assert sum(bench.skipped.values()) == 1  # the masked comment, as the training reader skips it


def test_overlap_is_refused_with_file_and_count_or_dropped(tmp_path):
    path = goemotions(tmp_path, [("I love this so much!", "love"), ("Why would you do that?", "curiosity"),
                                 ("That is scary", "fear")])
    train = [row(("human", "hi"), ("gpt", "i LOVE this, so much"), emotions=["love"])]
    units = eb.training_units(train)
    b = EmotionBenchmark(kind="goemotions", path=str(path))
    with pytest.raises(PersonaError, match=rf"{path}: 1 comments \(1 labelled utterances\)"):
        eb.drop_overlap(eb.read_benchmark(b, EMOTIONS), b, units)
    b = EmotionBenchmark(kind="goemotions", path=str(path), drop_overlap=True)
    kept = eb.drop_overlap(eb.read_benchmark(b, EMOTIONS), b, units)
    assert kept.labels == ["curiosity", "fear"] and kept.dropped_overlap == 1


def test_dailydialog_overlap_is_a_whole_dialogue(tmp_path):
    path = dailydialog(tmp_path, DIALOGUES)
    # the first dialogue as the training reader writes it: an odd last utterance dropped
    train = [row(("human", "Hi, how are you?"), ("gpt", "Great, thanks!"), emotions=["joy"]),
             row(("human", "Watch out!"), ("gpt", "Something else"))]
    b = EmotionBenchmark(kind="dailydialog", path=str(path))
    with pytest.raises(PersonaError, match=r"1 dialogues \(3 labelled utterances\)"):
        eb.drop_overlap(eb.read_benchmark(b, EMOTIONS), b, eb.training_units(train))
    b = EmotionBenchmark(kind="dailydialog", path=str(path), drop_overlap=True)
    kept = eb.drop_overlap(eb.read_benchmark(b, EMOTIONS), b, eb.training_units(train))
    assert kept.texts == ["Watch out!", "What?!"] and kept.dropped_overlap == 1


def test_missing_benchmark_file_names_the_key(tmp_path):
    p = parse_params({"eval": {"emotion_benchmarks": [
        {"kind": "goemotions", "path": str(goemotions(tmp_path, [("ok", "neutral")]))},
        {"kind": "dailydialog", "path": str(tmp_path / "nope" / "dialogues_test.txt")}]}})
    with pytest.raises(ParamsError, match=r"eval\.emotion_benchmarks\[1\]\.path: file not found"):
        eb.check_paths(p.eval.emotion_benchmarks)
    with pytest.raises(ParamsError, match=r"emotion_benchmarks\[1\]\.name: 'goemotions_dev' is used twice"):
        parse_params({"eval": {"emotion_benchmarks": [{"kind": "goemotions", "path": "a/dev.tsv"},
                                                      {"kind": "goemotions", "path": "b/dev.tsv"}]}})


TOY = [("so happy and glad today", "joy"), ("happy happy fun", "joy"), ("glad it worked, happy", "joy"),
       ("sad and crying", "sadness"), ("tears, so sad", "sadness"), ("ok noted", "neutral"),
       ("noted, ok then", "neutral"), ("fine ok", "neutral"), ("ok", "neutral")]


def test_baselines_are_deterministic_and_fit_a_separable_set():
    texts, gold = [t for t, _ in TOY], [g for _, g in TOY]
    probe = ["happy and glad", "sad tears", "ok noted", "so sad crying"]
    first = {k: list(m.predict(probe)) for k, m in eb.fit_baselines(texts, gold, seed=1).items()}
    again = {k: list(m.predict(probe)) for k, m in eb.fit_baselines(texts, gold, seed=1).items()}
    assert first == again
    assert first["tfidf_lr"] == ["joy", "sadness", "neutral", "sadness"]
    assert first["majority"] == ["neutral"] * 4
    balanced = [list(eb.fit_baselines(texts, gold, seed=1, class_weight="balanced")["tfidf_lr"].predict(probe))
                for _ in range(2)]
    assert balanced[0] == balanced[1] == ["joy", "sadness", "neutral", "sadness"]
    with pytest.raises(PersonaError, match="at least two"):
        eb.fit_baselines(["a", "b"], ["joy", "joy"], seed=1)


def test_train_texts_are_the_labelled_replies():
    rows = [row(("human", "hi"), ("gpt", "yay"), ("human", "hm"), ("gpt", "meh"), emotions=["joy", None]),
            row(("system", "s"), ("human", "q"), ("gpt", "oh no"), emotions=["sadness"])]
    assert eb.train_texts(rows, EMOTIONS) == (["yay", "oh no"], ["joy", "sadness"])


def test_scores_on_hand_made_pairs():
    gold = ["joy", "joy", "joy", "sadness", "neutral", "neutral"]
    pred = ["joy", "joy", "neutral", "joy", "neutral", "fear"]
    s = eb.scores(gold, pred)
    assert s["accuracy"] == pytest.approx(3 / 6)
    # joy: tp 2, fp 1, fn 1 -> 2/3; sadness: 0; neutral: tp 1, fp 1, fn 1 -> 1/2; fear is not in gold
    assert s["per_label"] == pytest.approx({"joy": 2 / 3, "neutral": 1 / 2, "sadness": 0.0})
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_run_writes_compact_metrics_and_the_full_tables(tmp_path):
    from conftest import tiny_model_dir
    from persona_lm.train.checkpoint import load_model

    go = goemotions(tmp_path, [("what a happy day", "joy"), ("this is sad", "sadness"), ("ok then", "neutral")])
    dd = dailydialog(tmp_path, DIALOGUES)
    p = parse_params({"eval": {"emotion_benchmarks": [{"kind": "goemotions", "path": str(go)},
                                                      {"kind": "dailydialog", "path": str(dd), "name": "dd"}]}})
    lines = [t for t, _ in TOY] + [u for d in DIALOGUES for u, _ in d]
    model, tok, _ = load_model(tiny_model_dir(tmp_path, lines, EMOTIONS))
    train = [row(("human", "hey"), ("gpt", t), emotions=[g]) for t, g in TOY]
    results = eb.run(p, model, tok, train)
    assert list(results) == ["goemotions_dev", "dd"]
    assert results["dd"]["n"] == 5 and len(results["dd"]["pairs"]) == 5
    assert results["dd"]["support"] == {"fear": 1, "joy": 1, "neutral": 1, "sadness": 1, "surprise": 1}
    m = eb.metrics(results)
    assert set(m["dd"]) == {"n", "head_accuracy", "head_macro_f1", "tfidf_lr_macro_f1", "majority_macro_f1"}
    # `dvc metrics show` makes a column of every key: five per benchmark, the per-label tables stay in the report
    assert sum(len(v) for v in m.values()) == 10
    eb.write(results, tmp_path / "r" / "emotion_bench.json", tmp_path / "r" / "emotion_bench")
    report = json.loads((tmp_path / "r" / "emotion_bench.json").read_text())
    assert set(report["dd"]["head"]["per_label"]) == {"fear", "joy", "neutral", "sadness", "surprise"}
    assert "pairs" not in report["dd"]
    pairs = json.loads((tmp_path / "r" / "emotion_bench" / "dd.json").read_text())
    assert set(pairs[0]) == {"actual", "predicted"}
    eb.write({}, tmp_path / "r" / "emotion_bench.json", tmp_path / "r" / "emotion_bench")
    assert list((tmp_path / "r" / "emotion_bench").iterdir()) == []
    assert eb.run(parse_params({}), model, tok, train) == {}


def test_balanced_class_weights_and_their_effect_on_the_loss():
    from persona_lm.model import GPT, GPTConfig
    from persona_lm.train.batches import collate_emotion
    from persona_lm.train.loop import batch_loss
    from persona_lm.train.phase import emotion_class_weights

    examples = [([5, 6, 7, 8], [0, 0, 1, 1], label, 0) for label in (0, 0, 0, 1)]
    assert emotion_class_weights(parse_params({}), examples) is None
    w = emotion_class_weights(parse_params({"emotion": {"class_weights": "balanced"}}), examples)
    # n / (k * count): 4 / (2 * 3) for label 0, 4 / (2 * 1) for label 1; absent labels 1
    assert w.tolist() == pytest.approx([4 / 6, 2.0] + [1.0] * (len(EMOTIONS) - 2))

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8, n_emotions=len(EMOTIONS)))
    batch = collate_emotion(examples, 8, 0)
    with torch.no_grad():
        plain, _ = batch_loss(model, batch, 1.0, 4.0, 0.0)
        weighted, _ = batch_loss(model, batch, 1.0, 4.0, 0.0, w)
        _, emo = model(batch["x"], persona=batch["persona"], emotion_index=batch["emotion_index"])
    per_reply = torch.nn.functional.cross_entropy(emo.float(), batch["emotion_label"], reduction="none")
    assert float(plain) == pytest.approx(float(per_reply.mean()), rel=1e-5)
    assert float(weighted) == pytest.approx(float((per_reply * w[batch["emotion_label"]]).sum() / 4), rel=1e-5)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)


def test_real_benchmarks(shared_data):
    """The shared copies: every DailyDialog validation utterance is an item; the known train duplicates are
    caught as overlap at the dialogue unit."""
    from persona_lm.data.emotion_datasets import read_dailydialog
    from persona_lm.errors import Skips

    dd = shared_data / "emotion/dailydialog"
    b = EmotionBenchmark(kind="dailydialog", path=str(dd / "validation/dialogues_validation.txt"))
    bench = eb.read_benchmark(b, EMOTIONS)
    assert len(bench.labels) == 8069  # SOURCES.md: 1,000 dialogues / 8,069 utterances
    assert bench.labels.count("neutral") == 7108
    train = read_dailydialog(dd / "train/dialogues_train.txt.gz", set(EMOTIONS), Skips("row"))
    with pytest.raises(PersonaError, match=r"dialogues_validation\.txt: \d+ dialogues") as e:
        eb.drop_overlap(bench, b, eb.training_units(train))
    assert int(str(e.value).split(": ")[1].split()[0]) >= 77  # the 77 verbatim duplicates, at least
