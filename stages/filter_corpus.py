"""Stage filter_corpus: normalise, quality-filter, deduplicate and split the raw corpus, shard by shard.

Reads data/raw/corpus/corpus.parquet (id, source, text) in shards of `filter.shard_mb`; writes
data/interim/corpus.parquet (id, source, text, split) and reports/filter.json: documents and bytes in and out,
and for every rule how many documents it dropped first (the rules and their order are in
persona_lm.data.filters) and how many failed it at all; reports/corpus.json, the DVC metric, holds only the
documents and bytes, so metric tables stay narrow. Memory holds one shard, not the corpus
(persona_lm.data.corpus); an interrupted run resumes after the shards it finished (kept in WORK). Shards are
scanned in this process or, with `filter.engine: dask`, on a Dask cluster (persona_lm.data.engine): same output.
"""

import sys
from pathlib import Path

from tqdm import tqdm

from persona_lm import stage
from persona_lm.data.corpus import OUT as COLUMNS
from persona_lm.data.corpus import Work, filter_shards, parquet_shards
from persona_lm.data.engine import shard_map
from persona_lm.data.validation import validate_corpus
from persona_lm.errors import InputError, PersonaError, log
from persona_lm.io import ParquetRows, atomic_path, write_json
from persona_lm.params import Params

RAW = Path("data/raw/corpus/corpus.parquet")
OUT = Path("data/interim/corpus.parquet")
WORK = Path("data/interim/.filter_corpus")
REPORT = Path("reports/filter.json")
SUMMARY = Path("reports/corpus.json")  # the DVC metric: the per-rule counts stay in REPORT, out of metric tables
VALIDATION = Path("reports/validation/corpus.json")


def check_raw(path: Path) -> int:
    """The raw corpus's row count, after checking it is a parquet file with string id/source/text columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(path, "not found; run `dvc repro download_corpus` first")
    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"not a readable parquet file ({e})") from None
    schema = meta.schema_arrow
    missing = {"id", "source", "text"} - set(schema.names)
    if missing:
        raise InputError(path, f"missing column(s) {sorted(missing)} (columns: {schema.names})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise InputError(path, f"column 'text' must be strings (got {kind})")
    if meta.metadata.num_rows == 0:
        raise InputError(path, "no documents; check corpus.sources in params.yaml")
    return meta.metadata.num_rows


def main(p: Params) -> None:
    rows = check_raw(RAW)
    stat = RAW.stat()
    fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}:{p.seed}:{p.filter.output_params()}"
    work = Work(WORK, fingerprint).open()
    bar = tqdm(total=rows, unit="doc", desc="filter_corpus", file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    with atomic_path(OUT) as tmp, ParquetRows(tmp, COLUMNS) as out:
        with shard_map(p.filter) as map_shards:
            report = filter_shards(parquet_shards(RAW, int(p.filter.shard_mb * 1e6)), p.filter, p.seed, work,
                                   out.write, progress=bar.update, map_shards=map_shards)
        bar.close()
        write_json(REPORT, report)
        if report["docs_out"] == 0:
            top = sorted(report["dropped"].items(), key=lambda kv: -kv[1])[:3]
            reasons = ", ".join(f"{rule}: {n}" for rule, n in top if n)
            raise PersonaError(
                f"filter_corpus: all {report['docs_in']} documents were filtered out ({reasons}); "
                f"see {REPORT} and loosen the `filter` params"
            )
        validate_corpus(out.close(), VALIDATION)
    work.remove()
    write_json(SUMMARY, {k: report[k] for k in ("docs_in", "docs_out", "docs_train", "docs_val", "bytes_in",
                                                "bytes_out")})
    log.info(
        "filter_corpus: kept %d of %d documents (%.1f of %.1f MB; %d train, %d val; %d shard(s)) -> %s",
        report["docs_out"], report["docs_in"], report["bytes_out"] / 1e6, report["bytes_in"] / 1e6,
        report["docs_train"], report["docs_val"], len(work.shards), OUT,
    )


if __name__ == "__main__":
    stage.run(main)
