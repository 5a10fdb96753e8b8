"""Stage evaluate: models/final against the held-out splits -> reports/eval.json (metrics), the emotion
confusion matrix, samples and the markdown report card. Timings go to reports/speed/ so the quality metrics
reproduce exactly for the same params and seed."""

from __future__ import annotations

import logging
from pathlib import Path

from persona_lm import evaluation, report, stage
from persona_lm.io import write_json, write_text
from persona_lm.params import Params
from persona_lm.train import phase
from persona_lm.train.checkpoint import load_model

log = logging.getLogger("persona_lm.evaluate")


def main(p: Params) -> None:
    model, tok, _ = load_model(Path("models/final"))
    emotions, e = p.persona.emotions, p.eval
    val_rows = phase.sharegpt_rows("val")
    corpus = evaluation.bits_per_byte(model, tok, phase.corpus_texts("val"), e.corpus_max_tokens)
    chat = [tok.render(phase.with_system(p, row))[:2] for row in val_rows]
    emo = evaluation.emotion_scores(model, tok, phase.emotion_examples(p, tok, val_rows), emotions)
    greedy = {"max_new_tokens": e.max_new_tokens, "temperature": 0.0}
    checks = evaluation.persona_checks(model, tok, p.persona.system_prompt, e.persona_checks, p.persona.name,
                                       emotions, **greedy)
    sampled, speed = evaluation.samples(model, tok, p.persona.system_prompt, e.prompts, emotions,
                                        max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_k=e.top_k,
                                        top_p=e.top_p, repetition_penalty=e.repetition_penalty, seed=p.seed)
    reply = evaluation.assistant_loss(model, tok, chat)
    metrics = {
        "corpus_val_bpb": round(corpus["bpb"], 4),
        "chat_val_assistant_loss": round(reply["loss"], 4),
        "chat_val_bpb": round(reply["bpb"], 4),
        "emotion_accuracy": round(emo["accuracy"], 4),
        "emotion_macro_f1": round(emo["macro_f1"], 4),
        "emotion_val_replies": emo["n"],
        "persona_check_pass_rate": round(checks["pass_rate"], 4),
        "distinct_2": round(evaluation.distinct_n([s["reply"] for s in sampled]), 4),
        "params": model.param_counts()["total"],
    }
    write_json("reports/eval.json", metrics)
    write_json("reports/speed/evaluate.json", {k: round(v, 1) for k, v in speed.items()})
    write_json("reports/eval/emotion_confusion.json", emo["pairs"])
    write_json("reports/eval/samples.json", {"samples": sampled, "persona_checks": checks["results"]})
    write_text("reports/report_card.md", report.render(p, metrics, checks, sampled, model.param_counts()))
    log.info("evaluate: %s", metrics)


if __name__ == "__main__":
    stage.run(main)
