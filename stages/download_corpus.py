"""Stage download_corpus: read every `corpus.sources` entry into data/raw/corpus/corpus.parquet (id, source,
text) plus manifest.json (per source: documents, bytes, skips, and each file with its sha256).

Nothing touches the network unless an http or hf source is configured. HTTP downloads are kept in
data/raw/.downloads (reused when their pinned sha256 matches); Hub files go to the Hugging Face cache.
"""

from pathlib import Path

from persona_lm import stage
from persona_lm.data.sources import load_corpus
from persona_lm.errors import log
from persona_lm.io import write_json, write_parquet
from persona_lm.params import Params

OUT = Path("data/raw/corpus")
DOWNLOADS = Path("data/raw/.downloads")


def main(p: Params) -> None:
    docs = load_corpus(p.corpus.sources, download_dir=DOWNLOADS)
    write_parquet(OUT / "corpus.parquet", docs.frame())
    write_json(OUT / "manifest.json", {"docs": len(docs.ids), "sources": docs.manifest})
    log.info("download_corpus: %d documents from %d source(s) -> %s", len(docs.ids), len(docs.manifest), OUT)


if __name__ == "__main__":
    stage.run(main)
