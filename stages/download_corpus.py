"""Stage download_corpus: read every `corpus.sources` entry into data/raw/corpus/corpus.parquet (id, source,
text) plus manifest.json (per source: documents, bytes, skips, and each file with its sha256).

Documents stream from the sources to the file (one row group in memory, not the corpus). Nothing touches the
network unless an http or hf source is configured. HTTP downloads are kept in data/raw/.downloads (reused when
their pinned sha256 matches); Hub files go to the Hugging Face cache.
"""

import sys
from pathlib import Path

import polars as pl
from tqdm import tqdm

from persona_lm import stage
from persona_lm.data.sources import ParquetDocuments, load_corpus
from persona_lm.errors import log
from persona_lm.io import ParquetRows, atomic_dir, write_json
from persona_lm.params import Params

OUT = Path("data/raw/corpus")
DOWNLOADS = Path("data/raw/.downloads")
ROW = {"id": pl.String, "source": pl.String, "text": pl.String}


def main(p: Params) -> None:
    caps = [s.max_bytes for s in p.corpus.sources]
    total = sum(caps) if caps and None not in caps else None  # an ETA only where every source is capped
    with tqdm(total=total, unit="B", unit_scale=True, desc="download_corpus", file=sys.stderr,
              mininterval=1.0 if sys.stderr.isatty() else 15.0) as bar, \
            atomic_dir(OUT) as out:
        with ParquetRows(out / "corpus.parquet", ROW) as rows:
            docs = ParquetDocuments(rows, progress=bar.update)
            load_corpus(p.corpus.sources, download_dir=DOWNLOADS, corpus=docs)
            docs.flush()
        write_json(out / "manifest.json", {"docs": docs.count, "sources": docs.manifest})
    log.info("download_corpus: %d documents from %d source(s) -> %s", docs.count, len(docs.manifest), OUT)


if __name__ == "__main__":
    stage.run(main)
