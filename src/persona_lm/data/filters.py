"""Quality filters for the pretraining corpus: normalisation, Gopher quality and repetition, C4, FineWeb.

Each rule family is a function from a Series of normalised texts to a DataFrame with one boolean column
per rule, True where the document fails it. They work on whole columns (polars string/list expressions,
numpy on the flat token array), never with a Python loop per document, so throughput is set by the regex
engine. Rules and thresholds follow the papers and datatrove's reference implementations;
bench/filter_throughput.py measures speed and per-family agreement against datatrove.

`persona_lm.data.corpus` runs everything in a fixed order and attributes each dropped document to the FIRST rule
it fails: empty, gopher_repetition.*, gopher_quality.*, c4.*, fineweb.*, length.*, dedup.exact,
dedup.minhash (the order of FineWeb's recipe: repetition, quality, then C4, whose line removal changes
the text that FineWeb's rules, the length bounds, dedup and the output see).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from persona_lm.params import C4Quality, Filter, FineWebQuality, GopherQuality, GopherRepetition

# ------------------------------------------------------------------------------------------ normalisation


def normalize(texts: pl.Series, nfkc: bool = True) -> pl.Series:
    """NFKC (full-width forms, ligatures, '…' -> '...'), one kind of newline, no control or zero-width
    characters, single spaces, no spaces at line ends, at most one blank line in a row, no outer space.
    Every rule below assumes this form: it makes lines, paragraphs and duplicates well defined."""
    texts = texts.fill_null("")
    if nfkc:  # ASCII is its own NFKC form: only the other texts pay for normalising
        idx = texts.str.contains(r"[^\x00-\x7f]").arg_true()
        texts = texts.scatter(idx, texts.gather(idx).str.normalize("NFKC"))
    return (
        texts.str.replace_all(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]", "\n")
        .str.replace_all(r"[\p{Cc}\u00ad\u200b-\u200d\u2060\ufeff&&[^\n\t]]", "")
        .str.replace_all(r" [^\S\n]+|[^\S \n][^\S\n]*", " ")
        .str.replace_all(r" ?\n ?", "\n")
        .str.replace_all(r"\n{3,}", "\n\n")
        .str.strip_chars()
    )


# ------------------------------------------------------------------------------------------- tokenisation

# An approximation of the spaCy English tokenizer that datatrove counts words with: every punctuation mark
# is a token except runs of dots or dashes; abbreviations, acronyms and initials keep their period; "'s"
# and the common contractions split off ("do n't", "I 'm", "can not", "gon na"), other apostrophes stay
# inside the word ("banish'd", "o'clock"), and a hyphen ending a word keeps the word whole ("so,--"; the
# match takes the following space, stripped again). Its agreement with spaCy is measured by the bench.
_CONTRACTIONS = (
    r"(?i)(?-u:\b)(ca|wo|do|does|did|is|are|was|were|has|have|had|could|would|should|must|might|need|ai|sha|dare|"
    r"ought)(n['’]?t)(?-u:\b)",
    r"(?i)(?-u:\b)(i|you|he|she|it|we|they|who|what|that|there|where|how|this|could|would|should|might|must)"
    r"(['’](?:d|ll|re|ve|m))(?-u:\b)",
    r"([\p{L}\p{N}])(['’][sS])(?-u:\b)",
    r"(?-u:\b)([Cc]an|[Gg]on|[Gg]ot)(not|na|ta)(?-u:\b)",
    r"(\p{Ll})(\.\p{Lu})",
)
_ABBREV = (
    r"(?-u:\b)(?:Mr|Mrs|Ms|Dr|St|Mt|Jr|Sr|Prof|Gen|Gov|Rep|Sen|Rev|Adm|Inc|Ltd|Co|Corp|Bros|vs|Jan|Feb|Mar|"
    r"Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.|(?:\p{L}\.){2,}|(?-u:\b)\p{Lu}\."
)
_TOKEN = (
    r"\S*[^\s-]-+(?:\s|$)|" + _ABBREV + r"|['’](?i:s|m|d|ll|re|ve|em)(?-u:\b)"
    r"|[\p{L}\p{N}\p{M}_]+(?:[.,:/@'’?!][\p{L}\p{N}\p{M}_]+)*"
    r"|\.{2,}|-{2,}|[^\s\p{L}\p{N}\p{M}_]"
)


def _split_contractions(texts: pl.Series) -> pl.Series:
    for pattern in _CONTRACTIONS:
        texts = texts.str.replace_all(pattern, "$1 $2")
    return texts


@dataclass
class Tokens:
    """Every document's word tokens, flattened: `tok[i]` belongs to document `doc[i]` (non-decreasing)."""

    doc: np.ndarray
    tok: pl.Series
    n_docs: int

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.doc, minlength=self.n_docs)

    def per_doc(self, weights) -> np.ndarray:
        return np.bincount(self.doc, weights=np.asarray(weights, dtype=np.float64), minlength=self.n_docs)


def tokenize(texts: pl.Series) -> Tokens:
    lists = _split_contractions(texts).str.extract_all(_TOKEN)
    lens = lists.list.len().fill_null(0).to_numpy()
    doc = np.repeat(np.arange(len(texts)), lens)
    return Tokens(doc, lists.explode(empty_as_null=False).drop_nulls().str.strip_chars_end(), len(texts))


def count_tokens(texts: pl.Series) -> np.ndarray:
    return _split_contractions(texts).str.count_matches(_TOKEN).fill_null(0).to_numpy()


def _ratio(num, den) -> np.ndarray:
    """num / den with 0 where den is 0 (a document with nothing to count fails no ratio rule)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _parts(lists: pl.Series, drop_empty: bool = False) -> pl.DataFrame:
    """Explode a list[str] Series into (doc, part) rows; `dup` marks repeats of an earlier part of the doc."""
    lens = lists.list.len().to_numpy()
    df = pl.DataFrame({"doc": np.repeat(np.arange(len(lists)), lens), "part": lists.explode(empty_as_null=False)})
    if drop_empty:
        df = df.filter(pl.col("part") != "")
    return df.with_columns(dup=~pl.struct("doc", "part").is_first_distinct(), chars=pl.col("part").str.len_chars())


def _sum_by_doc(df: pl.DataFrame, n: int, weights: pl.Expr | None = None) -> np.ndarray:
    w = None if weights is None else df.select(weights.cast(pl.Float64)).to_series().to_numpy()
    return np.bincount(df["doc"].to_numpy(), weights=w, minlength=n)


# ---------------------------------------------------------------------------------------- Gopher quality

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def gopher_quality(texts: pl.Series, cfg: GopherQuality, toks: Tokens | None = None) -> pl.DataFrame:
    """Rae et al. 2021, A.1.1: word count and mean word length bounds, '#' and ellipsis per word, bullet and
    ellipsis-ending line shares, share of words with a letter, and at least `min_stop_words` distinct
    English stop words.

    With `cfg.words == "whitespace"` (the paper's definition) a word is a whitespace-separated string, and a
    stop word counts when it is one with its surrounding punctuation removed, in any case. With "datatrove"
    words are datatrove's tokens (`toks`, computed when not given): punctuation marks are tokens, count in
    the '#'/ellipsis and letter ratios, but not as words for the count and length bounds. That
    tokenisation fails 11% of TinyStories on the letter ratio alone, since a short sentence of clean
    prose is a quarter punctuation tokens (bench/filter_keep_rates.py); it stays for comparing with datatrove.
    """
    n = len(texts)
    if cfg.words == "whitespace":
        words = texts.str.extract_all(r"\S+")
        toks = Tokens(np.repeat(np.arange(n), words.list.len().fill_null(0).to_numpy()),
                      words.explode(empty_as_null=False).drop_nulls(), n)
        is_word = np.ones(len(toks.tok), dtype=bool)
        stop_key = toks.tok.str.replace_all(r"^[\p{P}\p{S}]+|[\p{P}\p{S}]+$", "").str.to_lowercase()
    else:
        toks = toks or tokenize(texts)
        is_word = toks.tok.str.contains(r"[^\p{P}\p{S}]").to_numpy()
        stop_key = toks.tok
    tok = toks.tok
    n_tokens = toks.counts
    n_words = toks.per_doc(is_word)
    avg_len = _ratio(toks.per_doc(tok.str.len_chars().to_numpy() * is_word), n_words)
    has_alpha = toks.per_doc(tok.str.contains(r"\p{L}").to_numpy())
    stop = pl.DataFrame({"doc": toks.doc, "tok": stop_key}).filter(pl.col("tok").is_in(STOP_WORDS)).unique()
    n_stop = np.bincount(stop["doc"].to_numpy(), minlength=n)

    txt = pl.col("t").str
    c = pl.DataFrame({"t": texts}).select(
        hashes=txt.count_matches("#", literal=True),
        ellipses=txt.count_matches("...", literal=True) + txt.count_matches("…", literal=True),
        lines=txt.count_matches("\n", literal=True) + 1,
        bullets=txt.count_matches(r"(?m)^[•-]"),
        end_ellipsis=txt.count_matches(r"(?m)(?:\.\.\.|…)$"),
    )
    p = "gopher_quality."
    return pl.DataFrame({
        p + "min_doc_words": n_words < cfg.min_doc_words,
        p + "max_doc_words": n_words > cfg.max_doc_words,
        p + "min_avg_word_length": (n_words > 0) & (avg_len < cfg.min_avg_word_length),
        p + "max_avg_word_length": avg_len > cfg.max_avg_word_length,
        p + "max_symbol_word_ratio": (_ratio(c["hashes"], n_tokens) > cfg.max_symbol_word_ratio)
        | (_ratio(c["ellipses"], n_tokens) > cfg.max_symbol_word_ratio),
        p + "max_bullet_lines_ratio": _ratio(c["bullets"], c["lines"]) > cfg.max_bullet_lines_ratio,
        p + "max_ellipsis_lines_ratio": _ratio(c["end_ellipsis"], c["lines"]) > cfg.max_ellipsis_lines_ratio,
        p + "max_non_alpha_words_ratio": (n_tokens > 0) & (_ratio(has_alpha, n_tokens) < cfg.max_non_alpha_words_ratio),
        p + "min_stop_words": n_stop < cfg.min_stop_words,
    })


# ------------------------------------------------------------------------------------- Gopher repetition

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _ngram_keys(h: np.ndarray, doc: np.ndarray, n: int, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, 64-bit keys) of the n-grams beginning at `starts` that lie inside one document."""
    starts = starts[starts + n <= len(h)]
    pos = starts[doc[starts] == doc[starts + n - 1]]
    key = doc[pos].astype(np.uint64)
    for j in range(n):
        key = (key * _MIX) ^ h[pos + j]
    return pos, key


def _occurrences(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each element: how often its key occurs, and whether this is the key's first occurrence."""
    count, first = np.ones(len(key), np.int64), np.ones(len(key), bool)
    if len(key):
        order = np.argsort(key)
        k = key[order]
        new = np.r_[True, k[1:] != k[:-1]]
        start = np.flatnonzero(new)
        run = np.cumsum(new) - 1
        count[order] = np.diff(np.r_[start, len(k)])[run]
        first[order] = order == np.minimum.reduceat(order, start)[run]
    return count, first


def gopher_repetition(texts: pl.Series, cfg: GopherRepetition, toks: Tokens | None = None) -> pl.DataFrame:
    """Rae et al. 2021, A.1.2: share of duplicate paragraphs and lines (by count and by characters),
    characters in the most frequent 2-4-gram, and characters covered by repeated 5-10-grams, each a
    fraction of the document's characters. Repeated n-gram characters are counted once even where
    occurrences overlap, as the paper defines it."""
    toks = toks or tokenize(texts)
    n = len(texts)
    chars = texts.str.len_chars().to_numpy()
    out: dict[str, np.ndarray] = {}
    p = "gopher_repetition."
    for name, lists, frac, char_frac in (
        ("para", texts.str.split("\n\n"), cfg.dup_para_frac, cfg.dup_para_char_frac),
        ("line", texts.str.split("\n"), cfg.dup_line_frac, cfg.dup_line_char_frac),
    ):
        parts = _parts(lists, drop_empty=name == "line")
        out[f"{p}dup_{name}_frac"] = _ratio(_sum_by_doc(parts, n, pl.col("dup")), _sum_by_doc(parts, n)) > frac
        dup_chars = _sum_by_doc(parts, n, pl.col("chars") * pl.col("dup"))
        out[f"{p}dup_{name}_char_frac"] = _ratio(dup_chars, chars) > char_frac

    # Only positions whose (n-1)-gram repeats can start a repeated n-gram, so each n looks at fewer.
    h = toks.tok.hash().to_numpy()
    tok_len = toks.tok.str.len_chars().to_numpy().astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(tok_len)])
    doc_start = np.concatenate([[0], np.cumsum(toks.counts)[:-1]])
    candidates = np.arange(len(h))
    for k in sorted(cfg.top_n_grams.keys() | cfg.dup_n_grams.keys()):
        pos, key = _ngram_keys(h, toks.doc, k, candidates)
        count, first = _occurrences(key)
        if k in cfg.top_n_grams:
            # Counter.most_common order: the highest count, ties to the n-gram seen first; a document
            # without any repeat has its first n-gram on top
            top = np.where(toks.counts >= k, cum[np.minimum(doc_start + k, len(h))] - cum[doc_start] + k - 1, 0)
            rep = count > 1
            d, c, p_ = toks.doc[pos[rep]], count[rep], pos[rep]
            best = np.lexsort((p_, -c, d))
            best = best[np.r_[True, d[best][1:] != d[best][:-1]]] if len(best) else best
            top[d[best]] = c[best] * (cum[p_[best] + k] - cum[p_[best]] + k - 1)
            out[f"{p}top_{k}_gram"] = _ratio(top, chars) > cfg.top_n_grams[k]
        if k in cfg.dup_n_grams:
            repeat = pos[~first]
            cover = np.zeros(len(h) + 1, dtype=np.int64)
            cover[repeat] += 1
            cover[repeat + k] -= 1
            covered = np.cumsum(cover[:-1]) > 0
            out[f"{p}dup_{k}_gram"] = _ratio(toks.per_doc(tok_len * covered), chars) > cfg.dup_n_grams[k]
        candidates = pos[count > 1]
    order = [f"{p}dup_para_frac", f"{p}dup_para_char_frac", f"{p}dup_line_frac", f"{p}dup_line_char_frac"]
    order += [f"{p}top_{k}_gram" for k in cfg.top_n_grams] + [f"{p}dup_{k}_gram" for k in cfg.dup_n_grams]
    return pl.DataFrame({r: out[r] for r in order})


# --------------------------------------------------------------------------------------------------- C4

_CITATION = r"\[(?:\d*|edit|citation needed)\]"
_POLICY = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"]
# A sentence ends at a terminal mark that is its own token and is followed, after any punctuation, by a
# word; periods of abbreviations, acronyms, initials and '...' are masked first (spaCy's sentencizer rules).
_SENT_BREAK = r"\p{Sentence_Terminal}\p{P}*\s[\p{P}\s]*[^\p{P}\s]|\p{Ll}\.\p{Lu}"


def c4_quality(texts: pl.Series, cfg: C4Quality) -> tuple[pl.DataFrame, pl.Series]:
    """Raffel et al. 2020: drop lines without terminal punctuation, with fewer than `min_words_per_line`
    words, with a word longer than `max_word_length`, mentioning javascript or cookie/terms policies;
    drop the document for "lorem ipsum", a curly bracket, or fewer than `min_num_sentences` sentences in
    the kept lines. Returns the rule flags and the texts with only their kept lines."""
    line = pl.col("line")
    words = line.str.split(" ")
    clean = line.str.replace_all(_CITATION, "") if cfg.remove_citations else line
    lines = pl.DataFrame({"text": texts}).with_row_index("doc").select(
        "doc", line=pl.col("text").str.split("\n")
    ).explode("line")
    lines = lines.with_columns(
        n_words=pl.when(line == "").then(0).otherwise(words.list.len()),
        long_word=words.list.eval(pl.element().str.len_chars()).list.max() > cfg.max_word_length,
        clean=clean,
    ).with_columns(lower=pl.col("clean").str.to_lowercase())
    ok = ~pl.col("long_word") & (pl.col("n_words") >= cfg.min_words_per_line)
    if cfg.require_terminal_punct:
        ok = ok & pl.col("clean").str.contains(r"[.?!\"']$") & ~pl.col("clean").str.ends_with("...")
    lorem = ok & pl.col("lower").str.contains("lorem ipsum", literal=True) if cfg.filter_lorem_ipsum else pl.lit(False)
    if cfg.filter_javascript:
        ok = ok & ~pl.col("lower").str.contains("javascript", literal=True)
    curly = ok & pl.col("clean").str.contains("{", literal=True) if cfg.filter_curly_bracket else pl.lit(False)
    if cfg.filter_policy:
        ok = ok & ~pl.col("lower").str.contains_any(_POLICY)
    masked = pl.col("clean").str.replace_all(_ABBREV, "A").str.replace_all(r"\.{2,}", ",")
    docs = (
        lines.with_columns(ok=ok, lorem=lorem, curly=curly, sentences=1 + masked.str.count_matches(_SENT_BREAK))
        .group_by("doc", maintain_order=True)
        .agg(
            lorem=pl.col("lorem").any(),
            curly=pl.col("curly").any(),
            sentences=pl.col("sentences").filter(pl.col("ok")).sum(),
            text=pl.col("clean").filter(pl.col("ok")).str.join("\n").str.strip_chars(),
        )
    )
    flags = pl.DataFrame({
        "c4.lorem_ipsum": docs["lorem"],
        "c4.curly_bracket": docs["curly"],
        "c4.min_num_sentences": docs["sentences"] < cfg.min_num_sentences,
    })
    return flags, docs["text"]


# ---------------------------------------------------------------------------------------------- FineWeb


def fineweb_quality(texts: pl.Series, cfg: FineWebQuality) -> pl.DataFrame:
    """Penedo et al. 2024: share of non-blank lines ending in terminal punctuation (a document without
    any fails it), share of short lines, characters in duplicated lines, and newlines per word."""
    n = len(texts)
    lines = _parts(texts.str.split("\n")).filter(pl.col("part").str.strip_chars() != "")
    n_lines = _sum_by_doc(lines, n)
    punct = _ratio(_sum_by_doc(lines, n, pl.col("part").str.contains(r"\p{Sentence_Terminal}$")), n_lines)
    newlines = texts.str.count_matches("\n", literal=True).to_numpy()
    p = "fineweb."
    return pl.DataFrame({
        p + "line_punct_ratio": (n_lines == 0)
        | ((punct < cfg.line_punct_thr) & ~((punct == 0) & cfg.line_punct_exclude_zero)),
        p + "short_line_ratio": _ratio(_sum_by_doc(lines, n, pl.col("chars") <= cfg.short_line_length), n_lines)
        > cfg.short_line_thr,
        p + "char_dup_ratio": _ratio(_sum_by_doc(lines, n, pl.col("chars") * pl.col("dup")),
                                     texts.str.len_chars().to_numpy() - newlines) > cfg.char_duplicates_ratio,
        p + "new_line_ratio": _ratio(newlines, count_tokens(texts)) > cfg.new_line_ratio,
    })


# ----------------------------------------------------------------------------------------------- corpus


def quality_flags(texts: pl.Series, cfg: Filter) -> tuple[pl.DataFrame, pl.Series]:
    """Every enabled rule's flags, columns in the attribution order, and the text after C4's line removal."""
    flags = [pl.DataFrame({"empty": (texts == "").to_numpy()})]
    quality_toks = cfg.gopher_quality.enabled and cfg.gopher_quality.words == "datatrove"
    toks = tokenize(texts) if cfg.gopher_repetition.enabled or quality_toks else None
    if cfg.gopher_repetition.enabled:
        flags.append(gopher_repetition(texts, cfg.gopher_repetition, toks))
    if cfg.gopher_quality.enabled:
        flags.append(gopher_quality(texts, cfg.gopher_quality, toks))
    out = texts
    if cfg.c4.enabled:
        c4_flags, out = c4_quality(texts, cfg.c4)
        flags.append(c4_flags)
    if cfg.fineweb.enabled:
        flags.append(fineweb_quality(out, cfg.fineweb))
    n_words = out.str.count_matches(r"\S+").to_numpy()
    flags.append(pl.DataFrame({"length.min_words": n_words < cfg.min_words,
                               "length.max_words": n_words > cfg.max_words}))
    return pl.concat(flags, how="horizontal"), out
