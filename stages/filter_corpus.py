"""Stage filter_corpus: normalise, quality-filter, deduplicate and split the raw corpus.

Reads data/raw/corpus/corpus.parquet (id, source, text); writes data/interim/corpus.parquet (id, source,
text, split) and reports/filter.json: documents and bytes in and out, and for every rule how many documents
it dropped first (the rules and their order are in persona_lm.data.filters) and how many failed it at all;
reports/corpus.json, the DVC metric, holds only the documents and bytes, so metric tables stay narrow.
"""

from pathlib import Path

import polars as pl

from persona_lm import stage
from persona_lm.data.filters import filter_corpus
from persona_lm.data.validation import validate_corpus
from persona_lm.errors import InputError, PersonaError, log
from persona_lm.io import write_json, write_parquet
from persona_lm.params import Params

RAW = Path("data/raw/corpus/corpus.parquet")
OUT = Path("data/interim/corpus.parquet")
REPORT = Path("reports/filter.json")
SUMMARY = Path("reports/corpus.json")  # the DVC metric: the per-rule counts stay in REPORT, out of metric tables
VALIDATION = Path("reports/validation/corpus.json")


def read_raw(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise InputError(path, "not found; run `dvc repro download_corpus` first")
    try:
        df = pl.read_parquet(path)
    except Exception as e:
        raise InputError(path, f"not a readable parquet file ({e})") from None
    missing = {"id", "source", "text"} - set(df.columns)
    if missing:
        raise InputError(path, f"missing column(s) {sorted(missing)} (columns: {df.columns})")
    if df.schema["text"] != pl.String:
        raise InputError(path, f"column 'text' must be strings (got {df.schema['text']})")
    if df.height == 0:
        raise InputError(path, "no documents; check corpus.sources in params.yaml")
    return df.select(pl.col("id").cast(pl.String), pl.col("source").cast(pl.String), "text")


def main(p: Params) -> None:
    df = read_raw(RAW)
    out, report = filter_corpus(df, p.filter, p.seed)
    write_json(REPORT, report)
    if out.height == 0:
        top = sorted(report["dropped"].items(), key=lambda kv: -kv[1])[:3]
        reasons = ", ".join(f"{rule}: {n}" for rule, n in top if n)
        raise PersonaError(
            f"filter_corpus: all {report['docs_in']} documents were filtered out ({reasons}); "
            f"see {REPORT} and loosen the `filter` params"
        )
    validate_corpus(out, VALIDATION)
    write_parquet(OUT, out)
    write_json(SUMMARY, {k: report[k] for k in ("docs_in", "docs_out", "docs_train", "docs_val", "bytes_in", "bytes_out")})
    log.info(
        "filter_corpus: kept %d of %d documents (%.1f of %.1f MB; %d train, %d val) -> %s",
        report["docs_out"], report["docs_in"], report["bytes_out"] / 1e6, report["bytes_in"] / 1e6,
        report["docs_train"], report["docs_val"], OUT,
    )


if __name__ == "__main__":
    stage.run(main)
