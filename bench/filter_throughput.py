"""Throughput of our corpus filters against datatrove's, and how often the two agree.

    .venv/bin/python bench/filter_throughput.py [--data ../shared/data/corpus] [--repeat 3] [--details 5]

Documents: TinyStories split on <|endoftext|>, and Tiny Shakespeare cut at blank lines into chunks of a few
KB. Both implementations see the same normalised texts and use the default (= published) thresholds, and
ours counts Gopher words as datatrove does (`gopher_quality.words: datatrove`, not our default). Ours
runs each family on the whole column; datatrove's GopherQuality, GopherRepetition, C4Quality and
FineWebQuality filters are called in process on one Document at a time. Per family each side tokenises for
itself; for "all four" datatrove runs the four filters per document as its pipeline would (sharing its
tokenisation cache) and ours shares one tokenisation between the Gopher families.

Datatrove tokenises English with a blank spaCy pipeline (words and sentences, rule based, no model
download), so it needs `pip install spacy regex` besides datatrove; it runs offline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl

from persona_lm.data import dedup, filters
from persona_lm.data.corpus import filter_corpus
from persona_lm.params import Filter, GopherQuality

ROOT = Path(__file__).resolve().parents[1]


def load_docs(data: Path, chunk_chars: int = 3000) -> pl.DataFrame:
    stories = (data / "tinystories_train_head.txt").read_text(encoding="utf-8").split("<|endoftext|>")
    rows = [("tinystories", s) for s in stories if s.strip()]
    chunk: list[str] = []
    for para in (data / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n"):
        chunk.append(para)
        if sum(map(len, chunk)) >= chunk_chars:
            rows.append(("tinyshakespeare", "\n\n".join(chunk)))
            chunk = []
    if chunk:
        rows.append(("tinyshakespeare", "\n\n".join(chunk)))
    return pl.DataFrame(rows, schema=["source", "text"], orient="row").with_row_index("id").with_columns(
        pl.format("doc-{}", pl.col("id").cast(pl.String).str.zfill(6)).alias("id")
    )


def ours(texts: pl.Series, cfg: Filter) -> dict[str, np.ndarray]:
    """Each family's verdict (True = drop) on the same input, independently of the others."""
    toks = filters.tokenize(texts)
    fams = {
        "gopher_quality": filters.gopher_quality(texts, cfg.gopher_quality, toks),
        "gopher_repetition": filters.gopher_repetition(texts, cfg.gopher_repetition, toks),
        "c4": filters.c4_quality(texts, cfg.c4)[0],
        "fineweb": filters.fineweb_quality(texts, cfg.fineweb),
    }
    return {k: v.select(pl.any_horizontal(pl.all())).to_series().to_numpy() for k, v in fams.items()}


def datatrove_filters() -> dict:
    from datatrove.pipeline.filters import (
        C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter,
    )
    return {
        "gopher_quality": GopherQualityFilter(),
        "gopher_repetition": GopherRepetitionFilter(),
        "c4": C4QualityFilter(),
        "fineweb": FineWebQualityFilter(),
    }


def theirs(texts: list[str], fams: dict) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    from datatrove.data import Document

    drop = {k: np.zeros(len(texts), dtype=bool) for k in fams}
    reasons: dict[str, list] = {k: [None] * len(texts) for k in fams}
    for i, t in enumerate(texts):
        for k, f in fams.items():
            r = f.filter(Document(text=t, id=str(i)))
            if r is not True:
                drop[k][i] = True
                reasons[k][i] = r[1] if isinstance(r, tuple) else "dropped"
    return drop, reasons


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "corpus")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours; the best is reported")
    ap.add_argument("--details", type=int, default=0, help="print this many disagreements per family")
    args = ap.parse_args()

    df = load_docs(args.data)
    cfg = Filter(gopher_quality=GopherQuality(words="datatrove"))  # datatrove's definition of a word
    texts = filters.normalize(df["text"])
    n, mb = len(texts), texts.str.len_bytes().sum() / 1e6
    print(f"{n} docs ({(df['source'] == 'tinystories').sum()} tinystories, "
          f"{(df['source'] == 'tinyshakespeare').sum()} shakespeare chunks), {mb:.2f} MB normalised\n")

    ours(texts.head(50), cfg)  # warm up regex compilation
    t_norm, _ = timed(lambda: filters.normalize(df["text"]), args.repeat)
    t_ours, mine = timed(lambda: ours(texts, cfg), args.repeat)
    t_fam = {}  # each family alone, tokenising for itself as datatrove's filters do
    t_fam["gopher_quality"], _ = timed(lambda: filters.gopher_quality(texts, cfg.gopher_quality), args.repeat)
    t_fam["gopher_repetition"], _ = timed(lambda: filters.gopher_repetition(texts, cfg.gopher_repetition), args.repeat)
    t_fam["c4"], _ = timed(lambda: filters.c4_quality(texts, cfg.c4), args.repeat)
    t_fam["fineweb"], _ = timed(lambda: filters.fineweb_quality(texts, cfg.fineweb), args.repeat)
    t_tok, _ = timed(lambda: filters.tokenize(texts), args.repeat)
    t_exact, _ = timed(lambda: dedup.exact_duplicates(texts), args.repeat)
    t_minhash, near = timed(lambda: dedup.near_duplicates(texts, cfg.minhash, 1337), args.repeat)
    t_all, (_, report) = timed(lambda: filter_corpus(df, cfg, 1337), args.repeat)

    fams = datatrove_filters()
    text_list = texts.to_list()
    theirs(text_list[:5], fams)  # warm up spaCy
    t_dt, (dt, reasons) = timed(lambda: theirs(text_list, fams), 1)
    t_dt_fam = {k: timed(lambda f=f: theirs(text_list, {k: f}), 1)[0] for k, f in fams.items()}

    def rate(t: float) -> str:
        return f"{n / t:9.0f} docs/s {mb / t:7.2f} MB/s"

    print(f"{'':26s}{'ours':>30s}   {'datatrove':>30s}   speed-up  agreement  drops ours/dt")
    for k in fams:
        agree = (mine[k] == dt[k]).mean()
        print(f"{k:26s}{rate(t_fam[k]):>30s}   {rate(t_dt_fam[k]):>30s}   {t_dt_fam[k] / t_fam[k]:7.1f}x"
              f"  {agree:8.2%}   {mine[k].sum():5d}/{dt[k].sum():<5d}")
    print(f"{'all four families':26s}{rate(t_ours):>30s}   {rate(t_dt):>30s}   {t_dt / t_ours:7.1f}x"
          f"  {np.mean([(mine[k] == dt[k]).mean() for k in fams]):8.2%}  (mean)")
    ours_any, dt_any = np.any(list(mine.values()), axis=0), np.any(list(dt.values()), axis=0)
    print(f"{'  kept by all four':26s}{'':30s}   {'':30s}   {'':8s}  {(ours_any == dt_any).mean():8.2%}   "
          f"{(~ours_any).sum():5d}/{(~dt_any).sum():<5d} kept")
    print(f"\nour tokenisation (shared by the Gopher families in 'all four') {rate(t_tok)}")
    print(f"normalisation     {rate(t_norm)}")
    print(f"exact dedup       {rate(t_exact)}")
    print(f"minhash dedup     {rate(t_minhash)}  ({near.sum()} near duplicates)")
    print(f"filter_corpus     {rate(t_all)}  (everything: normalise, rules, dedup, split) -> "
          f"{report['docs_out']}/{report['docs_in']} kept")
    for k in fams if args.details else ():
        for i in np.flatnonzero(mine[k] != dt[k])[: args.details]:
            print(f"\n--- {k} doc {i}: ours drop={mine[k][i]} datatrove={reasons[k][i]!r}\n{text_list[i][:600]}")


if __name__ == "__main__":
    main()
