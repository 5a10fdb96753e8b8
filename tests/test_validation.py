"""The great-expectations suites catch what they claim to, and always leave a report."""

import json

import polars as pl
import pytest

from persona_lm.data.sharegpt import make_row
from persona_lm.data.validation import DataValidationError, validate_corpus, validate_dialogues, validate_transcripts

LABELS = {"neutral", "joy", "sadness"}


def _row(turns, emotions=None, source="t"):
    return make_row(source, turns, emotions)


def test_good_dialogues_pass_and_report(tmp_path):
    rows = [_row([("human", "hi"), ("gpt", "hello!")], ["joy"]),
            _row([("system", "be nice"), ("human", "how are you"), ("gpt", "fine"), ("human", "ok"), ("gpt", "bye")],
                 ["neutral", None])]
    validate_dialogues(rows, LABELS, "dlg", tmp_path / "r.json", min_rows=1)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["success"] and report["tables"]["turns"]["rows"] == 7


@pytest.mark.parametrize("bad, needle", [
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "expected_role"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "   "}], "chars"),
    ([{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}], "'role'"),
])
def test_bad_turns_fail_with_summary(tmp_path, bad, needle):
    rows = [{"id": "x", "source": "t", "conversations": bad, "emotions": [None]}]
    with pytest.raises(DataValidationError) as e:
        validate_dialogues(rows, LABELS, "dlg", tmp_path / "r.json")
    assert needle in str(e.value)
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False


def test_unknown_label_and_duplicate_ids_fail(tmp_path):
    row = _row([("human", "hi"), ("gpt", "grr")], ["anger"])
    with pytest.raises(DataValidationError) as e:
        validate_dialogues([row, row], LABELS, "dlg", tmp_path / "r.json")
    msg = str(e.value)
    assert "anger" in msg and "expect_column_values_to_be_unique" in msg


def test_corpus_suite(tmp_path):
    good = pl.DataFrame({"id": ["a", "b"], "source": ["s", "s"], "text": ["x", "y"], "split": ["train", "val"]})
    good.write_parquet(tmp_path / "good.parquet")
    validate_corpus(tmp_path / "good.parquet", tmp_path / "c.json")
    for column, values in (("split", ["train", "test"]), ("text", ["x", ""]), ("id", ["a", "a"])):
        good.with_columns(pl.Series(column, values)).write_parquet(tmp_path / "bad.parquet")
        with pytest.raises(DataValidationError, match=column):
            validate_corpus(tmp_path / "bad.parquet", tmp_path / "c.json")


def test_transcript_suite_rejects_end_before_start(tmp_path):
    df = pl.DataFrame({"video_id": ["v", "v"], "start": [0.0, 5.0], "end": [1.0, 4.0], "text": ["a", "b"]})
    with pytest.raises(DataValidationError, match="greater_than_b"):
        validate_transcripts(df, tmp_path / "t.json")
