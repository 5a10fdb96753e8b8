"""How much of each kind of text the corpus filter keeps, per rule, with each definition of a Gopher word.

    .venv/bin/python bench/filter_keep_rates.py [--data ../shared/data]

Text sets: the TinyStories sample (split on <|endoftext|>), our own sample corpus (data/sample/corpus, read
as the download stage reads it), the caption transcripts (data/sample/youtube and the shared caption files,
one document per file: its clean cues joined), and the template dialogues (the default params' expansion,
one document per conversation: its turns joined by newlines). For `gopher_quality.words` = datatrove (the
old default) and whitespace (the paper's definition, the default now), it prints the share of documents
every quality rule keeps and, per rule, how many documents fail it. Deduplication is left out: it says
nothing about a document's quality, and the template dialogues are near-duplicates by design.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import polars as pl
import yaml

from persona_lm.data import filters, templates
from persona_lm.data.sources import load_corpus
from persona_lm.data.transcripts import NoCaptions, SUFFIXES, read_transcript
from persona_lm.errors import InputError
from persona_lm.params import LocalSource, Params

ROOT = Path(__file__).resolve().parents[1]


def text_sets(data: Path) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    stories = data / "corpus" / "tinystories_train_head.txt"
    if stories.is_file():
        sets["tinystories"] = [s for s in stories.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    sets["sample corpus"] = load_corpus([LocalSource(kind="local", path=str(ROOT / "data/sample/corpus"))],
                                        ROOT / "data/raw").texts
    captions = []
    for folder in (ROOT / "data/sample/youtube", data / "youtube"):
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix in SUFFIXES:
                try:
                    captions.append(" ".join(cue.text for cue in read_transcript(path)))
                except (NoCaptions, InputError):
                    pass
    sets["caption transcripts"] = captions
    p = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    facts = {k: p.persona.fact_value(k) for k in p.persona.facts if k not in templates.BUILTIN_SLOTS}
    bank = templates.load(ROOT / p.templates.dir, set(p.persona.emotions), facts)
    rows = templates.expand(bank, n=p.templates.conversations, max_turns=p.templates.max_turns, seed=p.seed,
                            name=p.persona.name, user=p.persona.user_name, facts=facts)
    sets["template dialogues"] = ["\n".join(m["value"] for m in r["conversations"] if m["from"] != "system")
                                  for r in rows]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    base = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())).filter
    for name, docs in text_sets(args.data).items():
        texts = filters.normalize(pl.Series(docs, dtype=pl.String))
        results = {}
        for words in ("datatrove", "whitespace"):
            cfg = base.model_copy(update={"gopher_quality": base.gopher_quality.model_copy(update={"words": words})})
            flags, _ = filters.quality_flags(texts, cfg)
            results[words] = flags
        print(f"\n{name}: {len(docs)} documents")
        print(f"  {'rule':<44}{'datatrove':>16}{'whitespace':>16}")
        for rule in results["whitespace"].columns:
            a, b = (int(results[w][rule].sum()) for w in ("datatrove", "whitespace"))
            if a or b:
                print(f"  {rule:<44}{a:>16}{b:>16}")
        kept = [int((~results[w].select(pl.any_horizontal(pl.all())).to_series()).sum()) for w in results]
        print(f"  {'kept by every rule':<44}" + "".join(f"{f'{k} ({k / max(len(docs), 1):.1%})':>16}" for k in kept))


if __name__ == "__main__":
    main()
