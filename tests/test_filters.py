"""filter_corpus: normalisation, each rule family, thresholds from params, dedup, split, report, the stage."""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest

from persona_lm.data import dedup, filters
from persona_lm.data.corpus import filter_corpus, split_of
from persona_lm.errors import InputError, PersonaError
from persona_lm.io import write_parquet
from persona_lm.params import Filter, MinHash, Params

CLEAN = [
    """The morning market opened early, and the baker was the first to set out her bread.
She had baked twelve round loaves and a tray of small honey cakes before the sun came up.
A boy with a red scarf stopped to look at the cakes, but he did not have any coins with him.
The baker smiled and gave him a broken cake that nobody would buy.
He thanked her and promised to come back with his mother on the weekend.
By noon most of the bread was gone, and the square was full of people talking and laughing.
The baker packed her empty baskets, counted the money twice, and walked home along the river.""",
    """Every winter the old lighthouse keeper wrote a letter to his sister in the city.
He told her about the storms that shook the windows and the ships that passed far away.
This year a family of seals had settled on the rocks below the tower, and he watched them each day.
The youngest seal was curious and swam close to the shore whenever he walked down with his lantern.
His sister wrote back that she wanted to visit in the spring to see the seals for herself.
He cleaned the spare room, mended the chair by the window, and waited for the weather to change.
When the first warm day arrived, he stood on the pier and looked for her boat on the horizon.""",
    """Nadia liked to repair old radios in the small workshop behind her house.
Her neighbours brought her broken sets that had been silent for years, wrapped in newspaper.
She opened each case carefully, cleaned the dust away, and tested every wire with a little meter.
Sometimes the fault was only a loose connection, and sometimes it took her a whole week to find.
When a radio finally crackled and began to play music, she called the owner to come and listen.
One evening an old man cried when he heard the voice of the station he had loved as a child.
Nadia gave the radio back without asking for money, because his smile was payment enough.""",
    """The school garden had been empty for a long time before the children decided to change it.
They pulled out the weeds, carried buckets of soil from the field, and built low wooden beds.
Their teacher showed them how to plant beans, carrots and sunflowers in straight rows.
Each class took turns to water the plants and to write notes about how tall they had grown.
In the summer the sunflowers were taller than the headmaster, and everyone wanted a photograph.
The carrots were small and crooked, but the children said they tasted better than any from the shop.
At the end of the year they held a picnic in the garden and invited their families to share the food.""",
]
LINES = CLEAN[0].split("\n")

# One document per rule: each breaks that rule and no rule of any other family.
CRAFTED = {
    "gopher_repetition.dup_5_gram": CLEAN[0] + "\n" + "We sang the song about the little green frog and " * 6
    + "then we went home.",
    "gopher_quality.max_bullet_lines_ratio": "\n".join("- " + line for line in LINES),
    "gopher_quality.min_stop_words": """Mira woke up early on Sunday. Her cat Tom sat by her bed, purring loudly.
She opened her window. Bright sunlight filled her small room, warm on her face.
Downstairs, her dad was making pancakes. He sang an old song while he cooked.
Mira ate three pancakes, then went outside. Her friend Sam was waiting by her gate.
They walked along a quiet lane, talking about their plans for summer holidays.
Later they climbed a hill, sat on soft grass, watched clouds drift by, laughing.""",
    "gopher_quality.max_avg_word_length": """\
Extraordinarily sophisticated internationalisation characterised negotiations.
Unquestionably comprehensive administrative reorganisation necessitated meticulous documentation.
Interdepartmental communication deteriorated notwithstanding considerable organisational encouragement.
Consequently representatives recommended straightforward institutional simplification and that was accepted.
Nevertheless uncharacteristically enthusiastic stakeholders congratulated the administrators.
Subsequently intergovernmental collaboration strengthened considerably throughout neighbouring jurisdictions.
Administratively everything functioned satisfactorily afterwards disappointing pessimistic commentators.""",
    "c4.lorem_ipsum": CLEAN[0] + "\nThe printer tested the page with lorem ipsum dolor sit amet before the real text.",
    "c4.curly_bracket": CLEAN[0] + "\nHer recipe card said {flour, water, salt} in neat handwriting.",
    "c4.min_num_sentences": " ".join(line.rstrip(".") + "," for line in LINES[:-1]) + " " + LINES[-1],
    "fineweb.char_dup_ratio": "\n".join(LINES[:3] + ["Everyone clapped for the baker."] + LINES[3:]
                                        + ["Everyone clapped for the baker."]),
}


def corpus(texts: list[str], ids: list[str] | None = None) -> pl.DataFrame:
    ids = ids or [f"doc-{i:03d}" for i in range(len(texts))]
    return pl.DataFrame({"id": ids, "source": ["test"] * len(texts), "text": texts},
                        schema={"id": pl.String, "source": pl.String, "text": pl.String})


def failing(texts: list[str], cfg: Filter = Filter()) -> list[list[str]]:
    flags, _ = filters.quality_flags(filters.normalize(pl.Series(texts)), cfg)
    return [[r for r in flags.columns if row[r]] for row in flags.iter_rows(named=True)]


def with_filter(**changes) -> Filter:
    """Filter() with some keys replaced; `c4={"min_num_sentences": 9}` updates inside a section."""
    data = Filter().model_dump()
    for key, value in changes.items():
        data[key] = data[key] | value if isinstance(value, dict) and isinstance(data[key], dict) else value
    return Filter.model_validate(data)


# ------------------------------------------------------------------------------------------ normalisation

def test_normalize_unicode_whitespace_and_controls():
    raw = "  Ｈｅｌｌｏ\u00a0\u00a0world…\r\nnext\tline \x07ok\u200b \r\r\n\n\n\nlast\u2028line  "
    assert filters.normalize(pl.Series([raw]))[0] == "Hello world...\nnext line ok\n\nlast\nline"
    assert filters.normalize(pl.Series([raw]), nfkc=False)[0].startswith("Ｈｅｌｌｏ world…\n")
    assert filters.normalize(pl.Series([None, ""])).to_list() == ["", ""]


def test_tokenizer_follows_spacy_conventions():
    toks = filters.tokenize(pl.Series(["Mr. Smith didn't say \"Lily's cat can't swim...\" at 3 p.m. e-mail so,-- ok"]))
    assert toks.tok.to_list() == [
        "Mr.", "Smith", "did", "n't", "say", '"', "Lily", "'s", "cat", "ca", "n't", "swim", "...", '"', "at", "3",
        "p.m.", "e", "-", "mail", "so,--", "ok",
    ]


# --------------------------------------------------------------------------------------------- the rules

def test_clean_documents_pass_every_rule():
    assert failing(CLEAN) == [[]] * len(CLEAN)


@pytest.mark.parametrize("rule", CRAFTED)
def test_each_family_drops_a_document_that_breaks_its_rule(rule):
    fails = failing([CRAFTED[rule]])[0]
    family = rule.split(".")[0]
    assert fails and fails[0] == rule
    assert {r.split(".")[0] for r in fails} == {family}
    out, report = filter_corpus(corpus([CRAFTED[rule]] + CLEAN), Filter(), 1337)
    assert report["dropped"][rule] == 1 and out.height == len(CLEAN)
    assert CLEAN[0] in out["text"].to_list()


@pytest.mark.parametrize("changes, rule", [
    ({"gopher_quality": {"min_doc_words": 200}}, "gopher_quality.min_doc_words"),
    ({"gopher_quality": {"max_non_alpha_words_ratio": 0.95, "words": "datatrove"}},
     "gopher_quality.max_non_alpha_words_ratio"),
    ({"gopher_repetition": {"top_n_grams": {2: 0.005}}}, "gopher_repetition.top_2_gram"),
    ({"c4": {"min_num_sentences": 50}}, "c4.min_num_sentences"),
    ({"fineweb": {"short_line_length": 200}}, "fineweb.short_line_ratio"),
    ({"min_words": 500, "max_words": 1000}, "length.min_words"),
    ({"max_words": 50, "min_words": 10}, "length.max_words"),
])
def test_thresholds_come_from_params(changes, rule):
    assert failing(CLEAN[:1], with_filter(**changes)) == [[rule]]


@pytest.mark.parametrize("rule, changes", [
    ("gopher_quality.max_bullet_lines_ratio", {"gopher_quality": {"max_bullet_lines_ratio": 1.0}}),
    ("gopher_quality.max_bullet_lines_ratio", {"gopher_quality": {"enabled": False}}),
    ("c4.curly_bracket", {"c4": {"filter_curly_bracket": False}}),
    ("fineweb.char_dup_ratio", {"fineweb": {"char_duplicates_ratio": 0.05}}),
    ("gopher_repetition.dup_5_gram", {"gopher_repetition": {"enabled": False}}),
])
def test_relaxed_or_disabled_rules_keep_the_document(rule, changes):
    assert failing([CRAFTED[rule]], with_filter(**changes)) == [[]]


# A TinyStories-style story: short quoted sentences, so punctuation marks are a quarter of datatrove's tokens.
DIALOGUE_STORY = """Tom saw a big red ball. "Look, Mom!" he said. "Can I play?"
Mom smiled. "Yes, but be careful." Tom ran to the ball. He kicked it high!
The ball went up, up, up. "Wow!" said Tom. Then it fell in the pond. Splash!
Tom was sad. "Oh no, my ball!" A duck swam to the ball and pushed it back.
"Thank you, duck!" said Tom. The duck said, "Quack!" Tom laughed. They played all day."""


def test_non_alpha_words_follow_the_paper_by_default():
    """Rae et al. 2021: >= 80% of whitespace-separated words contain a letter. datatrove's tokens count every
    quote and full stop as a word, which drops clean dialogue prose; that reading stays an option."""
    assert failing([DIALOGUE_STORY]) == [[]]
    assert failing([DIALOGUE_STORY], with_filter(gopher_quality={"words": "datatrove"})) == [
        ["gopher_quality.max_non_alpha_words_ratio"]]
    table = CLEAN[0] + "\n" + "\n".join(" ".join(str(i * j) for j in range(1, 9)) + " 42" for i in range(1, 13))
    for words in ("whitespace", "datatrove"):
        assert "gopher_quality.max_non_alpha_words_ratio" in failing([table], with_filter(gopher_quality={"words": words}))[0]


def test_whitespace_words_count_stop_words_inside_punctuation():
    doc = " ".join(["(The) cat, jumped; over rocks."] * 12 + ["Rain, then the wind, and"])
    assert "gopher_quality.min_stop_words" not in failing([doc])[0]
    no_stop = doc.replace("The", "A").replace("the", "a").replace("and", "or")
    assert "gopher_quality.min_stop_words" in failing([no_stop])[0]


def test_c4_removes_lines_and_keeps_the_document():
    doc = "\n".join([
        LINES[0], "Click here to enable JavaScript in your browser.", LINES[1], "By using this site you accept the "
        "privacy policy.", LINES[2] + "[12]", "Menu", "A heading without a full stop", LINES[3], LINES[4],
    ])
    out, report = filter_corpus(corpus([doc]), Filter(), 1)
    assert report["docs_out"] == 1
    assert out["text"][0] == "\n".join(LINES[:5])


def test_top_ngram_counts_the_most_frequent_one():
    texts = pl.Series(["the cat " * 30 + "sat down.", CLEAN[1]])
    flags = filters.gopher_repetition(texts, Filter().gopher_repetition)
    assert flags["gopher_repetition.top_2_gram"].to_list() == [True, False]


# ----------------------------------------------------------------------------------------------- dedup

def test_exact_duplicates_after_normalisation_keep_the_lowest_id():
    spaced = CLEAN[0].replace(" ", "  ").replace("\n", "\r\n")
    out, report = filter_corpus(corpus([spaced, *CLEAN], ids=["b", "a", "c", "d", "e"]), Filter(), 1)
    assert report["dropped"]["dedup.exact"] == 1
    assert sorted(out["id"].to_list()) == ["a", "c", "d", "e"]


def test_near_duplicate_is_removed_and_unrelated_documents_kept():
    edited = CLEAN[1].replace("storms", "gales").replace("curious", "playful")
    out, report = filter_corpus(corpus([*CLEAN, edited]), Filter(), 1337)
    assert report["dropped"]["dedup.minhash"] == 1
    assert out["text"].to_list() == CLEAN


def test_minhash_signatures_estimate_jaccard_and_follow_the_seed():
    edited = CLEAN[1].replace("storms", "gales")
    texts = pl.Series([CLEAN[1], edited, CLEAN[2]])
    cfg = MinHash(bands=32, rows=8)
    sig, has = dedup.signatures(texts, cfg, seed=7)
    assert has.all() and sig.dtype == np.uint32
    agree = (sig[0] == sig[1]).mean(), (sig[0] == sig[2]).mean()
    assert agree[0] > 0.8 and agree[1] < 0.1  # true 5-gram Jaccard: 0.92 and 0.0
    assert np.array_equal(sig, dedup.signatures(texts, cfg, seed=7)[0])
    assert not np.array_equal(sig, dedup.signatures(texts, cfg, seed=8)[0])


def test_clusters_are_transitive_and_labelled_by_first_member():
    sig = np.array([[1, 1, 9, 9], [1, 1, 2, 2], [3, 3, 2, 2], [4, 4, 5, 5]], dtype=np.uint32)
    assert dedup.clusters(sig, bands=2, rows=2).tolist() == [0, 0, 0, 3]


# ----------------------------------------------------------------------------------------------- split

def test_split_is_stable_under_reordering_and_follows_the_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    split = dict(zip(texts, split_of(pl.Series(texts), 0.2, seed=3)))
    shuffled = random.Random(0).sample(texts, len(texts))
    assert dict(zip(shuffled, split_of(pl.Series(shuffled), 0.2, seed=3))) == split
    assert 0.18 < sum(s == "val" for s in split.values()) / len(split) < 0.22
    assert dict(zip(texts, split_of(pl.Series(texts), 0.2, seed=4))) != split


def test_tiny_corpus_still_gets_both_splits():
    assert sorted(split_of(pl.Series(["a", "b", "c"]), 0.05, seed=1)) == ["train", "train", "val"]
    assert split_of(pl.Series(["a"]), 0.5, seed=1).tolist() == ["train"]
    assert set(split_of(pl.Series(["a", "b"]), 0.0, seed=1)) == {"train"}


def test_output_does_not_depend_on_row_order():
    edited = CLEAN[1].replace("storms", "gales").replace("curious", "playful")
    df = corpus([*CLEAN, *CRAFTED.values(), CLEAN[2], edited])
    cfg = with_filter(val_fraction=0.4)
    out, report = filter_corpus(df, cfg, 5)
    out2, report2 = filter_corpus(df.sample(fraction=1.0, shuffle=True, seed=1), cfg, 5)
    assert report == report2
    assert out.sort("id").equals(out2.sort("id"))


# --------------------------------------------------------------------------------------- report, determinism

def test_report_counts_add_up(tmp_path):
    texts = [*CLEAN, *CRAFTED.values(), CLEAN[0], "", "too short to keep."]
    df = corpus(texts)
    out, report = filter_corpus(df, Filter(), 1337)
    assert report["docs_in"] == len(texts) == report["docs_out"] + sum(report["dropped"].values())
    assert report["docs_out"] == out.height == report["docs_train"] + report["docs_val"] == len(CLEAN)
    assert all(report["failed"][r] >= n for r, n in report["dropped"].items())
    assert report["dropped"]["empty"] == 1 and report["dropped"]["dedup.exact"] == 1
    assert report["bytes_in"] == sum(len(t.encode()) for t in texts)
    assert report["bytes_out"] == sum(len(t.encode()) for t in out["text"])
    assert report["sources"] == {"test": {"docs_in": len(texts), "docs_out": len(CLEAN)}}
    assert out.columns == ["id", "source", "text", "split"]


def test_same_params_and_seed_give_byte_identical_output(tmp_path):
    df = corpus([*CLEAN, *CRAFTED.values()])
    for name in ("a", "b"):
        out, report = filter_corpus(df, Filter(), 1337)
        write_parquet(tmp_path / f"{name}.parquet", out)
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_empty_input_gives_an_empty_result():
    out, report = filter_corpus(corpus([]), Filter(), 1)
    assert out.height == 0 and out.columns == ["id", "source", "text", "split"]
    assert report["docs_in"] == report["docs_out"] == 0 and sum(report["dropped"].values()) == 0


# ---------------------------------------------------------------------------------------------- the stage

@pytest.fixture
def stage(tmp_path, monkeypatch, root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("filter_corpus_stage", root / "stages" / "filter_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    return module


def test_stage_writes_corpus_report_and_validation(stage, tmp_path):
    write_parquet(tmp_path / stage.RAW, corpus([*CLEAN, *CRAFTED.values()]))
    stage.main(Params())
    out = pl.read_parquet(tmp_path / stage.OUT)
    report = json.loads((tmp_path / stage.REPORT).read_text())
    assert out.height == report["docs_out"] == len(CLEAN)
    assert json.loads((tmp_path / stage.VALIDATION).read_text())["success"]


def test_stage_rejects_empty_or_wholly_filtered_input(stage, tmp_path):
    with pytest.raises(InputError, match="not found"):
        stage.main(Params())
    write_parquet(tmp_path / stage.RAW, corpus([]))
    with pytest.raises(InputError, match="no documents"):
        stage.main(Params())
    write_parquet(tmp_path / stage.RAW, corpus(list(CRAFTED.values())))
    with pytest.raises(PersonaError, match="all 8 documents were filtered out"):
        stage.main(Params())
    assert not (tmp_path / stage.OUT).exists()
    assert json.loads((tmp_path / stage.REPORT).read_text())["docs_out"] == 0


# ------------------------------------------------------------------------------------------------ real data

def test_most_tinystories_are_kept(shared_data):
    raw = (shared_data / "corpus" / "tinystories_train_head.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in raw.split("<|endoftext|>") if s.strip()]
    out, report = filter_corpus(corpus(stories), Filter(), 1337)
    assert report["docs_in"] == len(stories) > 2000
    assert report["docs_out"] / report["docs_in"] > 0.8
    assert 0.03 < report["docs_val"] / report["docs_out"] < 0.07
