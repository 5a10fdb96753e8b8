"""The emotion head against public emotion benchmarks, next to two text-only baselines.

A benchmark (`eval.emotion_benchmarks`) is a GoEmotions .tsv (Demszky et al. 2020) or a DailyDialog
`dialogues_*.txt(.gz)` (Li et al. 2017), read with the label mapping of `persona_lm.data.emotion_datasets`.
Every labelled utterance is one item:

- GoEmotions: each comment, as the reply to the same short prompt the training rows use (read_goemotions:
  a multi-label comment takes its first label in `persona.emotions`; `[NAME]` masks are filled
  with names there, and comments with a `[RELIGION]` mask are skipped there and counted here).
- DailyDialog: each utterance of both speakers, in its dialogue context. Utterance i is rendered as the
  assistant's (gpt) reply after utterances 0..i-1, whose roles alternate backwards from it: i-1 is human,
  i-2 gpt, and so on. So the same context is seen from whichever side speaks, and utterance 0 is a reply with
  no user turn before it.

Each item is scored three ways, all on the same items: the emotion head (argmax of its logits at the
reply's end-of-turn slot), a majority-class baseline (sklearn DummyClassifier, most_frequent) and TF-IDF +
logistic regression (sklearn; word unigrams and bigrams, seeded, deterministic). The baselines learn from
exactly the replies the head learned from, weighted as the head was (`emotion.class_weights`): every
labelled gpt turn of data/processed/sharegpt/train.jsonl, as (reply text, label); they read an item's
utterance text alone, the text its label is about.

Metrics per predictor: accuracy, macro-F1 over the labels present in the benchmark's gold labels, and
per-label F1 (sklearn.metrics). Labels are our set, so figures are not those of the papers' label sets.

Leakage: a benchmark row whose text is in the training rows is an overlap, checked at the unit that leaks:
a GoEmotions comment (its normalised text equals a train turn's) or a DailyDialog dialogue (its normalised
text, cut to the even number of utterances the training reader keeps, equals a train row's conversation).
Normalised = casefolded, every run of non-word characters one space. An overlapping benchmark is refused
with a PersonaError naming the file and the count; `drop_overlap: true` drops those rows and reports how many.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from persona_lm.data.emotion_datasets import dailydialog_labels_path, iter_dailydialog, read_goemotions
from persona_lm.data.sharegpt import normalise
from persona_lm.errors import ParamsError, PersonaError, Skips
from persona_lm.io import atomic_dir, write_json
from persona_lm.params import EmotionBenchmark, Params


@dataclass
class Bench:
    """A benchmark's items: `rows` are ShareGPT rows each ending in the one labelled gpt reply scored;
    `texts` the replies' text, `labels` their gold labels, `units` each row's overlap key."""

    name: str
    path: str
    rows: list[dict] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_overlap: int = 0

    def add(self, turns: list[tuple[str, str]], label: str, unit: str) -> None:
        self.rows.append({"conversations": [{"from": r, "value": v} for r, v in turns],
                          "emotions": [None] * (sum(r == "gpt" for r, _ in turns) - 1) + [label]})
        self.texts.append(turns[-1][1])
        self.labels.append(label)
        self.units.append(unit)


def check_paths(benchmarks: list[EmotionBenchmark]) -> None:
    """Refuse a missing benchmark file (or DailyDialog label file) before any work, naming the key."""
    for i, b in enumerate(benchmarks):
        if not Path(b.path).is_file():
            raise ParamsError(f"params.yaml: eval.emotion_benchmarks[{i}].path: file not found: {b.path}")
        if b.kind == "dailydialog":
            try:
                dailydialog_labels_path(Path(b.path))
            except PersonaError as e:
                raise ParamsError(f"params.yaml: eval.emotion_benchmarks[{i}].path: {e}") from None


def read_benchmark(b: EmotionBenchmark, labels: list[str]) -> Bench:
    """Every labelled utterance of the file as a Bench (see the module docstring for the rendering rule)."""
    bench, skips = Bench(b.report_name, b.path), Skips(f"{b.report_name} row")
    if b.kind == "goemotions":
        for row in read_goemotions(b.path, set(labels), skips, b.max_rows):
            turns = [(m["from"], m["value"]) for m in row["conversations"]]
            bench.add(turns, row["emotions"][-1], normalise(turns[-1][1]))
    else:
        _read_dailydialog(bench, Path(b.path), set(labels), skips, b.max_rows)
    bench.skipped = skips.as_dict()
    return bench


def _read_dailydialog(bench: Bench, path: Path, labels: set[str], skips: Skips, max_rows: int | None) -> None:
    n_dialogues = 0
    for where, utterances, emotions in iter_dailydialog(path, skips):
        if max_rows is not None and n_dialogues >= max_rows:
            break
        n_dialogues += 1
        kept = max(2, len(utterances) - len(utterances) % 2)  # what read_dailydialog trains on
        unit = normalise(" ".join(utterances[:kept]))
        for i, label in enumerate(emotions):
            if label not in labels:
                skips.add(f"dailydialog: label {label!r} not in persona.emotions", where)
                continue
            turns = [("gpt" if (i - j) % 2 == 0 else "human", utterances[j]) for j in range(i + 1)]
            bench.add(turns, label, unit)


def training_units(train_rows: list[dict]) -> tuple[set[str], set[str]]:
    """(normalised text of every train turn, normalised text of every train conversation), system turns left out."""
    turns, conversations = set(), set()
    for row in train_rows:
        values = [m["value"] for m in row["conversations"] if m["from"] != "system"]
        turns.update(normalise(v) for v in values)
        conversations.add(normalise(" ".join(values)))
    return turns, conversations


def drop_overlap(bench: Bench, b: EmotionBenchmark, units: tuple[set[str], set[str]]) -> Bench:
    """Refuse (PersonaError: file and count) or, with `drop_overlap`, drop the items whose unit is in training."""
    seen = units[0] if b.kind == "goemotions" else units[1]
    overlap = [u in seen for u in bench.units]
    n_items = sum(overlap)
    if not n_items:
        return bench
    n_units = len({u for u, o in zip(bench.units, overlap) if o})
    what = "comments" if b.kind == "goemotions" else "dialogues"
    if not b.drop_overlap:
        raise PersonaError(f"{b.path}: {n_units} {what} ({n_items} labelled utterances) of this benchmark are in "
                           "the training data (data/processed/sharegpt/train.jsonl): not held out; set drop_overlap: "
                           "true to score the rest")
    keep = [i for i, o in enumerate(overlap) if not o]
    out = Bench(bench.name, bench.path, [bench.rows[i] for i in keep], [bench.texts[i] for i in keep],
                [bench.labels[i] for i in keep], [bench.units[i] for i in keep], bench.skipped, n_units)
    return out


def train_texts(train_rows: list[dict], labels: list[str]) -> tuple[list[str], list[str]]:
    """(reply text, label) of every labelled gpt turn of the train rows: what the emotion head learned from."""
    texts, gold = [], []
    for row in train_rows:
        replies = [m["value"] for m in row["conversations"] if m["from"] == "gpt"]
        for text, label in zip(replies, row.get("emotions") or []):
            if label in labels:
                texts.append(text)
                gold.append(label)
    return texts, gold


def fit_baselines(texts: list[str], gold: list[str], seed: int, class_weight: str | None = None) -> dict:
    """{"majority": DummyClassifier(most_frequent), "tfidf_lr": TF-IDF (1-2 grams, sublinear tf, min_df 2) +
    LogisticRegression (lbfgs, C=1, `class_weight` None or "balanced")}, fitted on (texts, gold).
    Deterministic for the same inputs and seed. ~1 min for 75k replies on 2 CPU cores."""
    from sklearn.dummy import DummyClassifier
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(gold)) < 2:
        raise PersonaError(f"emotion benchmarks: the train split has {len(set(gold))} emotion label(s) among its "
                           "labelled replies; the baselines need at least two")
    majority = DummyClassifier(strategy="most_frequent").fit(texts, gold)
    tfidf_lr = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                             LogisticRegression(max_iter=1000, random_state=seed, class_weight=class_weight))
    tfidf_lr.fit(texts, gold)
    return {"majority": majority, "tfidf_lr": tfidf_lr}


def scores(gold: list[str], predicted: list[str]) -> dict:
    """accuracy, macro_f1 over the labels present in `gold`, and per_label F1 for those labels (sorted)."""
    from sklearn.metrics import accuracy_score, f1_score

    present = sorted(set(gold))
    per_label = f1_score(gold, predicted, labels=present, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(gold, predicted)) if gold else 0.0,
            "macro_f1": float(per_label.mean()) if present else 0.0,
            "per_label": {label: float(f) for label, f in zip(present, per_label)}}


def run(p: Params, model, tok, train_rows: list[dict]) -> dict:
    """Score every `eval.emotion_benchmarks` entry -> {name: {"n", "skipped", "dropped_overlap", "support",
    "head" | "majority" | "tfidf_lr": scores(), "pairs": [{"actual", "predicted"}] of the head}}."""
    from persona_lm.evaluation import emotion_scores
    from persona_lm.train import phase

    if not p.eval.emotion_benchmarks:
        return {}
    labels = p.persona.emotions
    units = training_units(train_rows)
    benches = [drop_overlap(read_benchmark(b, labels), b, units) for b in p.eval.emotion_benchmarks]
    weighting = "balanced" if p.emotion.class_weights == "balanced" else None  # the head's own weighting
    baselines = fit_baselines(*train_texts(train_rows, labels), seed=p.seed, class_weight=weighting)
    out = {}
    for bench in benches:
        if not bench.labels:
            raise PersonaError(f"{bench.path}: no labelled utterance left to score")
        examples = phase.emotion_examples(p, tok, bench.rows)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # batches of like lengths pad less
        by_length = emotion_scores(model, tok, [examples[i] for i in order], labels)["pairs"]
        pairs = [None] * len(order)
        for i, pair in zip(order, by_length):
            pairs[i] = pair
        head = {"pairs": pairs}
        result = {"n": len(bench.labels), "skipped": bench.skipped, "dropped_overlap": bench.dropped_overlap,
                  "support": dict(sorted(Counter(bench.labels).items())),
                  "head": scores(bench.labels, [x["predicted"] for x in head["pairs"]])}
        for name, clf in baselines.items():
            result[name] = scores(bench.labels, [str(x) for x in clf.predict(bench.texts)])
        result["pairs"] = head["pairs"]
        out[bench.name] = result
    return out


def metrics(results: dict) -> dict:
    """The compact metrics (reports/eval/details.json): {name: {n, head_accuracy, head_macro_f1, tfidf_lr_macro_f1,
    majority_macro_f1}}, rounded to 4 places."""
    return {name: {"n": r["n"], "head_accuracy": round(r["head"]["accuracy"], 4),
                   "head_macro_f1": round(r["head"]["macro_f1"], 4),
                   "tfidf_lr_macro_f1": round(r["tfidf_lr"]["macro_f1"], 4),
                   "majority_macro_f1": round(r["majority"]["macro_f1"], 4)}
            for name, r in results.items()}


def write(results: dict, report_path: str | Path, pairs_dir: str | Path) -> None:
    """The full tables (no pairs) to `report_path`; one `<name>.json` of the head's (actual, predicted) pairs
    per benchmark in `pairs_dir`, a folder replaced as a whole (empty when there are no benchmarks)."""
    write_json(report_path, {name: {k: v for k, v in r.items() if k != "pairs"} for name, r in results.items()})
    with atomic_dir(pairs_dir) as tmp:
        for name, r in results.items():
            write_json(tmp / f"{name}.json", r["pairs"])
