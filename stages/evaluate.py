"""Stage evaluate: models/final against the held-out splits -> reports/eval.json (metrics), the emotion
confusion matrix, samples and the markdown report card. Timings go to reports/speed/ so the quality metrics
reproduce exactly for the same params and seed."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from persona_lm import emotion_bench, evaluation, probes, report, stage
from persona_lm.io import write_json, write_text
from persona_lm.params import Params
from persona_lm.train import phase
from persona_lm.train.checkpoint import load_model
from persona_lm.train.tokens import corpus_texts

log = logging.getLogger("persona_lm.evaluate")


def main(p: Params) -> None:
    emotion_bench.check_paths(p.eval.emotion_benchmarks)
    model, tok, _ = load_model(Path("models/final"))
    emotions, e = p.persona.emotions, p.eval
    val_rows, train_rows = phase.sharegpt_rows("val"), phase.sharegpt_rows("train")
    steps = Steps(6)
    with steps("bits per byte on the corpus val split"):
        corpus = evaluation.bits_per_byte(model, tok, corpus_texts("val"), e.corpus_max_tokens)
    with steps("reply loss on ShareGPT val"):
        reply = evaluation.assistant_loss(model, tok, [tok.render(phase.with_system(p, row))[:2] for row in val_rows])
    with steps("emotion head on labelled val replies"):
        emo = evaluation.emotion_scores(model, tok, phase.emotion_examples(p, tok, val_rows), emotions)
    with steps("conversation probes"):
        prober = probes.Prober(model, tok, p.persona.system_prompt, emotions, e.max_new_tokens)
        train_replies = probes.train_reply_set(train_rows)
        probed = probes.run_all(prober, p, train_replies)
    with steps("samples"):
        sampled, speed = evaluation.samples(model, tok, p.persona.system_prompt, e.prompts, emotions,
                                            max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                                            top_k=e.top_k, top_p=e.top_p, repetition_penalty=e.repetition_penalty,
                                            seed=p.seed)
    with steps(f"emotion benchmarks ({len(e.emotion_benchmarks)})"):
        bench = emotion_bench.run(p, model, tok, train_rows)
    rep = probes.repetition(prober.replies + [s["reply"] for s in sampled], e.repeat_ngram, train_replies)
    # The headline, short-named so that `dvc metrics show reports/eval.json` fits 120 columns; the rest
    # (probe counts, rates by gap, repetition, the benchmarks) is the second metrics file.
    headline = {
        "identity": _round(probed["identity"]["rate"]),
        "consistency": _round(probed["self_consistency"]["rate"]),
        "memory": _round(probed["in_context_memory"]["rate"]),
        "emotion_fit": _round(probed["emotion_fit"]["rate"]),
        "emotion_f1": round(emo["macro_f1"], 4),
        "chat_bpb": round(reply["bpb"], 4),
        "corpus_bpb": round(corpus["bpb"], 4),
    }
    details = {
        "probes": {name: r["n"] for name, r in probed.items()},
        **{f"memory_gap_{k}": _round(v) for k, v in probed["in_context_memory"]["by_gap"].items()},
        "memory_beyond_window": _round(probed["beyond_window"]["rate"]),
        "repetitive": _round(rep["repetitive"]),
        "copied": _round(rep["copied"]),
        "distinct_1": round(evaluation.distinct_n([s["reply"] for s in sampled], 1), 4),
        "distinct_2": round(evaluation.distinct_n([s["reply"] for s in sampled]), 4),
        "chat_loss": round(reply["loss"], 4),
        "emotion_accuracy": round(emo["accuracy"], 4),
        "emotion_val_replies": emo["n"],
        "params": model.param_counts()["total"],
    }
    if bench:
        details["emotion_bench"] = emotion_bench.metrics(bench)
    write_json("reports/eval.json", headline)
    write_json("reports/eval/details.json", details)
    emotion_bench.write(bench, "reports/eval/emotion_bench.json", "reports/eval/emotion_bench")
    write_json("reports/speed/evaluate.json", {k: round(v, 1) for k, v in speed.items()})
    write_json("reports/eval/emotion_confusion.json", emo["pairs"])
    write_json("reports/eval/samples.json", {"samples": sampled, **{k: r["results"] for k, r in probed.items()}})
    write_text("reports/report_card.md", report.render(p, {**headline, **details}, probed, sampled,
                                                         model.param_counts()))
    log.info("evaluate: %s", headline)


class Steps:
    """Logs each step of the stage as it starts and how long it took: evaluating a real run takes minutes."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    @contextmanager
    def __call__(self, what: str):
        self.done += 1
        log.info("evaluate %d/%d: %s", self.done, self.total, what)
        t0 = time.perf_counter()
        yield
        log.info("evaluate %d/%d: done in %.1f s", self.done, self.total, time.perf_counter() - t0)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


if __name__ == "__main__":
    stage.run(main)
