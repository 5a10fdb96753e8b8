"""Great-expectations suites for every dataset the pipeline writes: corpus, transcripts, dialogues, ShareGPT.

Each stage validates what it wrote before DVC records it. The full result always lands in
reports/validation/<name>.json; a failing suite raises DataValidationError with a short readable summary
(which expectation, how many rows, a few offending values) instead of great-expectations' raw output.
Dialogue rows are flattened into a conversations table and a turns table so role order and labels can be
expressed as ordinary column expectations.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import polars as pl

from persona_lm.errors import PersonaError
from persona_lm.io import write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


class DataValidationError(PersonaError):
    pass


def _suite(name: str, expectations: list):
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation(e)
    return suite


def _describe(result: dict) -> str:
    cfg = result["expectation_config"]
    kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    res = result.get("result") or {}
    detail = ""
    if res.get("unexpected_count"):
        examples = [str(v)[:60] for v in (res.get("partial_unexpected_list") or [])[:3]]
        detail = f": {res['unexpected_count']} of {res.get('element_count', '?')} rows, e.g. {examples}"
    elif "observed_value" in res:
        detail = f": observed {res['observed_value']!r}"
    return f"{cfg['type']}({args}){detail}"


def run_suites(name: str, tables: dict[str, tuple[pl.DataFrame, list]], report_path: str | Path) -> dict:
    """Validate each (frame, expectations) pair, write the report, raise on any failed expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it sets INFO on itself at import
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(name)
    report = {"dataset": name, "success": True, "tables": {}}
    failures = []
    for table, (frame, expectations) in tables.items():
        batch_def = source.add_dataframe_asset(name=table).add_batch_definition_whole_dataframe(table)
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame.to_pandas()})
        result = batch.validate(_suite(f"{name}.{table}", expectations)).to_json_dict()
        report["tables"][table] = {
            "rows": frame.height,
            "success": result["success"],
            "statistics": result["statistics"],
            "results": [
                {"expectation": r["expectation_config"]["type"],
                 "kwargs": {k: v for k, v in r["expectation_config"]["kwargs"].items() if k != "batch_id"},
                 "success": r["success"],
                 "result": {k: v for k, v in (r.get("result") or {}).items() if "index_list" not in k}}
                for r in result["results"]
            ],
        }
        failures += [f"{table}: {_describe(r)}" for r in result["results"] if not r["success"]]
    report["success"] = not failures
    write_json(report_path, report)
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        raise DataValidationError(
            f"data validation of {name} failed ({len(failures)} expectation(s); full report in {report_path}):\n{lines}"
        )
    return report


def validate_corpus(path: str | Path, report_path: str | Path) -> dict:
    """The filtered corpus file at `path`, read without its texts (each text's length in characters instead,
    `text_chars`), so validating a corpus larger than memory holds a few dozen bytes per document."""
    import great_expectations.expectations as E

    df = pl.scan_parquet(path).select("id", "source", "split", text_chars=pl.col("text").str.len_chars()).collect()
    return run_suites("corpus", {"documents": (df, [
        E.ExpectTableColumnsToMatchSet(column_set=["id", "source", "text_chars", "split"], exact_match=False),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="id"),
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToNotBeNull(column="source"),
        E.ExpectColumnValuesToNotBeNull(column="text_chars"),
        E.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val"]),
    ])}, report_path)


def validate_transcripts(df: pl.DataFrame, report_path: str | Path) -> dict:
    import great_expectations as gx
    import great_expectations.expectations as E

    return run_suites("transcripts", {"utterances": (df, [
        E.ExpectTableColumnsToMatchSet(column_set=["video_id", "start", "end", "text"], exact_match=False),
        E.ExpectColumnValuesToNotBeNull(column="video_id"),
        E.ExpectColumnValuesToNotBeNull(column="text"),
        E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="start", min_value=0),
        gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(column_A="end", column_B="start", or_equal=True),
    ])}, report_path)


def dialogue_tables(rows: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Flatten rows: one line per conversation, one per turn with the role its position calls for."""
    convs, turns = [], []
    for row in rows:
        conv = row.get("conversations") or []
        roles = [m.get("from") for m in conv]
        has_system = bool(roles) and roles[0] == "system"
        labels = list(row.get("emotions") or [])
        gpt_i = 0
        for i, m in enumerate(conv):
            k = i - has_system
            expected = "system" if k < 0 else ("human" if k % 2 == 0 else "gpt")
            label = None
            if m.get("from") == "gpt":
                label = labels[gpt_i] if gpt_i < len(labels) else None
                gpt_i += 1
            value = m.get("value")
            turns.append({"conversation": row.get("id"), "turn": i, "role": m.get("from"),
                          "expected_role": expected, "chars": len(value.strip()) if isinstance(value, str) else 0,
                          "label": label})
        convs.append({"id": row.get("id"), "source": row.get("source"), "turns": len(conv) - has_system,
                      "gpt_turns": roles.count("gpt"), "labels": len(labels)})
    schema_c = {"id": pl.String, "source": pl.String, "turns": pl.Int64, "gpt_turns": pl.Int64, "labels": pl.Int64}
    schema_t = {"conversation": pl.String, "turn": pl.Int64, "role": pl.String, "expected_role": pl.String,
                "chars": pl.Int64, "label": pl.String}
    return pl.DataFrame(convs, schema=schema_c), pl.DataFrame(turns, schema=schema_t)


def validate_dialogues(rows: list[dict], labels: set[str], name: str, report_path: str | Path,
                       min_rows: int = 0) -> dict:
    """ShareGPT rows: unique ids, 2+ turns, roles valid and alternating, non-empty values, labels in the set."""
    import great_expectations.expectations as E

    convs, turns = dialogue_tables(rows)
    return run_suites(name, {
        "conversations": (convs, [
            E.ExpectTableRowCountToBeBetween(min_value=min_rows),
            E.ExpectColumnValuesToNotBeNull(column="id"),
            E.ExpectColumnValuesToBeUnique(column="id"),
            E.ExpectColumnValuesToNotBeNull(column="source"),
            E.ExpectColumnValuesToBeBetween(column="turns", min_value=2),
            E.ExpectColumnPairValuesToBeEqual(column_A="gpt_turns", column_B="labels"),
        ]),
        "turns": (turns, [
            E.ExpectColumnValuesToBeInSet(column="role", value_set=["system", "human", "gpt"]),
            E.ExpectColumnPairValuesToBeEqual(column_A="role", column_B="expected_role"),
            E.ExpectColumnValuesToBeBetween(column="chars", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="label", value_set=sorted(labels)),
        ]),
    }, report_path)
