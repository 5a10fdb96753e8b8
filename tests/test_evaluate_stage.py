"""The evaluate stage on a from-scratch model: the real stage scripts on a tiny project; the probe metrics land in
reports/eval.json with their probe counts, every verdict in samples.json, a section per probe in the report
card, progress in the log, and the same metrics on a second run."""

from __future__ import annotations

import json

import pytest

from bases import run_all, stage, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("own-eval")
    params = {"base": {"model": None}, "lora": {"r": 0}, "tokenizer": {"vocab_size": 400},
              "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 256},
              "eval": {"max_new_tokens": 8, "prompts": ["Hi!", "Good night!"], "memory_gaps": [1, 3]}}
    return run_all(write_project(d, params))


def test_probe_metrics_are_rates_with_their_counts(project):
    m = json.loads((project / "reports/eval.json").read_text())
    assert list(m) == ["identity", "consistency", "memory", "emotion_fit", "emotion_f1", "chat_bpb", "corpus_bpb"]
    for name in ("identity", "consistency", "memory", "emotion_fit"):
        assert m[name] is None or 0 <= m[name] <= 1
    d = json.loads((project / "reports/eval/details.json").read_text())
    assert d["probes"]["identity"] == 24 and d["probes"]["emotion_fit"] > 0
    assert set(k for k in d if k.startswith("memory_gap_")) == {"memory_gap_1", "memory_gap_3"}
    assert d["probes"]["beyond_window"] == 2 * 5 and 0 <= d["memory_beyond_window"] <= 1
    assert 0 <= d["repetitive"] <= 1 and 0 <= d["copied"] <= 1
    samples = json.loads((project / "reports/eval/samples.json").read_text())
    assert len(samples["identity"]) == 24 and {"samples", "self_consistency", "in_context_memory"} <= samples.keys()
    card = (project / "reports/report_card.md").read_text()
    assert "## Identity (" in card and "## Emotion fit (" in card


def test_evaluate_logs_progress_and_reproduces_its_metrics(project):
    before = (project / "reports/eval.json").read_text()
    proc = stage(project, "evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluate 1/6: bits per byte" in proc.stderr and "evaluate 6/6: done in" in proc.stderr
    assert "probes 1/5 identity" in proc.stderr and "probes 5/5 emotion_fit" in proc.stderr
    assert (project / "reports/eval.json").read_text() == before
