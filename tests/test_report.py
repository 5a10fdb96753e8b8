"""The report card and its figures: PNGs written beside the card (valid, of the stated size, the same bytes for
the same data) and linked from it, curves labelled with what they measure, no "None" for a defaulted value."""

import json
import struct
import zlib
from pathlib import Path

import pytest

from persona_lm import figures, report
from persona_lm.params import Params

EMOTIONS = ["neutral", "joy", "sadness"]
PAIRS = [{"actual": a, "predicted": p} for a in EMOTIONS for p in EMOTIONS for _ in range(1 + 3 * (a == p))]


def write_tsv(path: Path, key: str, rows: list[tuple[int, float]]) -> None:
    """A dvclive metric file, as train/loop.py leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step\t{key}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


def write_run(root: Path, phases=("pretrain", "finetune", "emotion")) -> None:
    for phase in phases:
        metrics = root / "reports/train" / phase / "plots/metrics"
        write_tsv(metrics / "train/loss.tsv", "loss", [(s, 5.0 / s) for s in range(1, 21)])
        write_tsv(metrics / "val/lm_loss.tsv", "lm_loss", [(s, 4.0 / s ** 0.5) for s in (5, 10, 15, 20)])
        if phase == "emotion":
            write_tsv(metrics / "val/emotion_loss.tsv", "emotion_loss", [(s, 1.0 / s) for s in (5, 10, 15, 20)])
            write_tsv(metrics / "val/loss.tsv", "loss", [(s, 1.0 / s + 2.0 / s ** 0.5) for s in (5, 10, 15, 20)])
        else:
            write_tsv(metrics / "val/loss.tsv", "loss", [(s, 4.0 / s ** 0.5) for s in (5, 10, 15, 20)])
    (root / "reports/eval").mkdir(parents=True, exist_ok=True)
    (root / "reports/eval/emotion_confusion.json").write_text(json.dumps(PAIRS))
    (root / "reports/tokenizer.json").write_text(json.dumps({"kind": "bpe", "vocab_size": 512,
                                                             "val_bytes_per_token": 3.1}))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body, crc = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n], data[pos + 8 + n:pos + 12 + n]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body), f"bad CRC in {kind}"
        chunks.append(kind)
        pos += 12 + n
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    ihdr = data[16:24]
    return struct.unpack(">II", ihdr)


NO_CHECKS: dict = {}  # no conversation probes in these cards


def render(p: Params) -> str:
    return report.render(p, {"emotion_accuracy": 0.5, "not_measured": None}, NO_CHECKS, [
        {"prompt": "Hi", "reply": "Hello!", "emotion": "joy"},
        {"prompt": "Bye", "reply": "See you.", "emotion": None}], {"total": 1000, "embedding": 200})


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    write_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def params(**model) -> Params:
    return Params.model_validate({"persona": {"emotions": EMOTIONS}, "model": {"n_head": 4, "n_embd": 64, **model}})


def test_card_links_each_figure_and_the_figures_are_pngs_of_the_stated_size(run_dir):
    card = render(params())
    names = ["loss_pretrain.png", "loss_finetune.png", "loss_emotion.png", "emotion_confusion.png"]
    assert sorted(p.name for p in (run_dir / "reports/figures").iterdir()) == sorted(names)
    for name in names:
        assert f"](figures/{name})" in card  # relative to reports/report_card.md
        size = png_size((run_dir / "reports/figures" / name).read_bytes())
        inches = figures.CURVE_SIZE if name.startswith("loss_") else figures.confusion_size(len(EMOTIONS))
        assert size == (round(inches[0] * figures.DPI), round(inches[1] * figures.DPI)), name


def test_same_data_same_bytes_and_other_data_other_bytes(run_dir):
    render(params())
    first = {p.name: p.read_bytes() for p in (run_dir / "reports/figures").iterdir()}
    render(params())
    assert {p.name: p.read_bytes() for p in (run_dir / "reports/figures").iterdir()} == first
    assert not [p for p in (run_dir / "reports/figures").iterdir() if p.suffix != ".png"]  # no temp files left
    assert b"matplotlib" not in first["loss_emotion.png"]  # no software version in the metadata
    write_tsv(run_dir / "reports/train/emotion/plots/metrics/train/loss.tsv", "loss", [(1, 3.0), (2, 1.0)])
    render(params())
    assert (run_dir / "reports/figures/loss_emotion.png").read_bytes() != first["loss_emotion.png"]
    assert (run_dir / "reports/figures/loss_pretrain.png").read_bytes() == first["loss_pretrain.png"]


def test_a_phase_without_curves_has_no_figure_and_a_stale_one_goes(run_dir):
    render(params())
    assert (run_dir / "reports/figures/loss_pretrain.png").exists()
    for tsv in (run_dir / "reports/train/pretrain").rglob("*.tsv"):
        tsv.unlink()  # a base run skips pretrain and empties its curves
    card = render(params())
    assert not (run_dir / "reports/figures/loss_pretrain.png").exists()
    assert "loss_pretrain.png" not in card and "pretrain train loss" not in card
    assert "](figures/loss_finetune.png)" in card


def test_no_none_for_defaulted_values(run_dir):
    card = render(params(n_kv_head=None))
    assert "4 heads (4 kv)" in card
    assert "None" not in card
    assert "| not_measured | n/a |" in card
    assert "- **Bye** → 'See you.'" in card.splitlines()  # a sample without a detected emotion
    assert "4 heads (2 kv)" in render(params(n_kv_head=2))


def test_curves_are_labelled_with_what_they_measure(run_dir):
    p = params()
    card = render(p)
    joint = f"emotion CE + {p.emotion.lm_weight:g} × LM CE"
    assert f"- emotion train loss ({joint}): `" in card
    assert f"- emotion val loss ({joint}): `" in card  # like for like: the same joint loss on val
    assert "- finetune train loss (LM CE per token): `" in card
    assert "- finetune val loss (LM CE per token): `" in card
    emotion = report.phase_curves(p, "emotion")
    assert [(c.label, c.dashed) for c in emotion] == [
        (f"train loss ({joint})", False), (f"val loss ({joint})", False),
        ("val emotion_loss (emotion CE per reply)", True), ("val lm_loss (LM CE per token)", True)]
    assert emotion[1].steps == [5, 10, 15, 20] and emotion[0].values[0] == 5.0


def test_old_runs_without_val_loss_compare_with_val_lm_loss(run_dir):
    (run_dir / "reports/train/finetune/plots/metrics/val/loss.tsv").unlink()
    labels = [c.label for c in report.phase_curves(params(), "finetune")]
    assert labels == ["train loss (LM CE per token)", "val lm_loss (LM CE per token)"]


def test_confusion_matrix_rows_are_normalised_and_keep_every_pair(tmp_path):
    pairs = PAIRS + [{"actual": "anger", "predicted": "joy"}]  # a label params do not list is kept, not dropped
    labels, counts, shares = figures.confusion_grid(pairs, EMOTIONS)
    assert labels == [*EMOTIONS, "anger"]
    assert counts[1] == [1, 4, 1, 0] and counts[3] == [0, 1, 0, 0] and sum(map(sum, counts)) == len(pairs)
    assert shares[1] == [1 / 6, 4 / 6, 1 / 6, 0.0] and shares[3] == [0.0, 1.0, 0.0, 0.0]
    out = figures.confusion_matrix(pairs, EMOTIONS, tmp_path / "c.png")
    assert png_size(out.read_bytes()) == tuple(round(x * figures.DPI) for x in figures.confusion_size(4))


def test_probes_are_listed_with_their_rate_and_verdicts(run_dir):
    probed = {
        "identity": {"rate": 0.5, "n": 2, "beyond_window": 1, "results": [
            {"fact": "name", "prompt": "May I ask your name?", "reply": "I'm Rosie!", "passed": True},
            {"fact": "name", "prompt": "Who am I talking to?", "reply": "I'm Bob.", "passed": False},
            {"fact": "home", "prompt": "Where's your home?", "beyond_window": True}]},
        "in_context_memory": {"rate": None, "n": 0, "beyond_window": 0, "results": []},
    }
    card = report.render(Params(), {"identity_rate": 0.5, "probes": {"identity": 2}}, probed, [],
                         {"total": 1000, "embedding": 200})
    assert "## Identity (50% of 2)" in card and "## In context memory (not run)" in card
    assert "- ✅ **May I ask your name?** → \"I'm Rosie!\"" in card and "- ❌ **Who am I talking to?**" in card
    assert "1 probe(s) did not fit the context window" in card and "Where's your home?" not in card
    assert "| probes |" not in card  # a grouped metric is not a table row
