"""Scrub personal data from chat text before it can reach a training set.

A model trained on someone's chats will happily repeat their friends' phone numbers, so every message
passes through `scrub`: emails, URLs, IBANs, payment-card numbers and phone numbers become placeholders
(`<email>`, `<url>`, `<iban>`, `<card>`, `<phone>`) and the replacements are counted by kind.

Chats are full of numbers that are not personal (dates, times, prices, years, order numbers, media file
names), so every number rule confirms its candidates: cards pass the Luhn check, IBANs the mod-97 check,
and phone numbers are found by Google's libphonenumber (the `phonenumbers` port) against the numbering
plans of the chat's regions, since a national number such as `612 34 56 78` only means something once you
know it is Spanish. The rules run in order, most specific first, so an email's domain is never
half-replaced as a URL and a card number is never counted as a phone. Names and street addresses are not
detected: that needs a tagger, not a regex.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Callable

from phonenumbers import Leniency, PhoneNumberMatcher

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# A URL with a scheme or www., or a bare domain on a common TLD; trailing punctuation stays in the text.
_URL_PATH = r"[^\s<>\"]*[^\s<>\".,;:!?)\]}'’]"
URL = re.compile(
    r"\b(?:https?://|www\.)" + _URL_PATH
    + r"|\b(?:[a-z0-9-]+\.)+(?:com|org|net|io|co|uk|de|fr|nl|es|eu|app|dev|info|ly|gl|tv|gg)\b"
    + r"(?:/(?:" + _URL_PATH + r")?)?",
    re.IGNORECASE,
)

IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")

# 13-19 digits, optionally grouped by single spaces or dashes. A leading + is matched so that a long
# international phone number is rejected here as a whole instead of having its tail taken for a card.
CARD = re.compile(r"(?<![\w+])\+?\d(?:[ -]?\d){12,18}(?!\w)")

# libphonenumber's matcher rejects slash-separated dates and times itself, but took `01.02.2021` for an
# Italian number and `14.03.23` for another (measured with phonenumbers 9.0.43), so a find that is exactly a
# dotted or dashed date (day and month, a two- or four-digit year, or ISO order) is refused here.
_DATE = re.compile(r"\d{1,2}([./-])\d{1,2}\1(?:\d{2}|\d{4})|(?:19|20)\d{2}([./-])\d{1,2}\2\d{1,2}")

# No numbering plan in libphonenumber's metadata has numbers shorter than 4 digits (Austria's and Germany's
# shortest), so a text with fewer digits, as most messages are, holds no phone number and skips the matchers.
MIN_PHONE_DIGITS = 4
_DIGIT = re.compile(r"\d")

# Regions tried for national numbers (written without a country code) when an export's region is neither
# set (`messages.region`) nor guessed from its language: the countries with the most WhatsApp users among
# the languages this project reads, plus those the tests name. Each region costs one pass of the matcher.
FALLBACK_REGIONS = ("US", "GB", "IN", "DE", "FR", "ES", "IT", "BR", "CN", "MX", "ID", "TR", "RU", "NL")

# Export language (ISO 639-1, as persona_lm.data.messages detects it) -> the regions whose numbers a chat in
# that language most likely holds. English is spoken everywhere, so it keeps the fallback list.
REGIONS_BY_LANGUAGE = {
    "de": ("DE", "AT", "CH"),
    "es": ("ES", "MX", "AR", "CO", "CL", "PE", "US"),
    "fr": ("FR", "BE", "CH", "CA"),
    "pt": ("BR", "PT"),
    "it": ("IT", "CH"),
    "nl": ("NL", "BE"),
    "tr": ("TR",),
    "ru": ("RU", "UA", "BY", "KZ"),
    "id": ("ID",),
    "hi": ("IN",),
}


def phone_regions(region: str | None = None, language: str | None = None) -> tuple[str, ...]:
    """The regions whose national numbers `scrub` looks for: the one set, else the language's, else the fallback."""
    if region:
        return (region,)
    return REGIONS_BY_LANGUAGE.get(language or "", FALLBACK_REGIONS)


def _phone_spans(text: str, regions: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of every phone number in `text`, overlapping finds merged.

    National numbers must be VALID for one of `regions` (an assigned range of its numbering plan), the
    leniency Microsoft Presidio also uses: POSSIBLE accepts any digit run of a plausible length and took
    years, prices, order numbers and the dates in media file names for numbers (measured). Numbers written
    with a `+` and a country code leave no doubt about what they are, so they only need to be POSSIBLE:
    that catches numbers from ranges newer than the pinned metadata and the ones reserved for fiction.
    """
    if len(_DIGIT.findall(text)) < MIN_PHONE_DIGITS:
        return []
    found = [(m.start, m.end, m.raw_string) for m in PhoneNumberMatcher(text, None, leniency=Leniency.POSSIBLE)]
    for region in regions:
        found += [(m.start, m.end, m.raw_string) for m in PhoneNumberMatcher(text, region, leniency=Leniency.VALID)]
    spans: list[tuple[int, int]] = []
    for start, end, raw in sorted(found):
        if _DATE.fullmatch(raw):
            continue
        if spans and start < spans[-1][1]:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return spans


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return not s.startswith("+") and 13 <= len(digits) <= 19 and luhn_ok(digits)


def _iban(s: str) -> bool:
    compact = s.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


RULES: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    ("email", EMAIL, None),
    ("url", URL, None),
    ("iban", IBAN, _iban),
    ("card", CARD, _card),
]


def scrub(text: str, counts: Counter | None = None, regions: Sequence[str] | None = None) -> str:
    """Replace personal data in `text` with `<kind>` placeholders; add the replacements to `counts` by kind.

    `regions` are ISO 3166-1 alpha-2 codes whose national phone formats are looked for (default
    `FALLBACK_REGIONS`); numbers written with `+` and a country code are found whatever the regions.
    """
    for kind, pattern, confirm in RULES:
        def replace(m: re.Match, kind=kind, confirm=confirm) -> str:
            if confirm is not None and not confirm(m.group(0)):
                return m.group(0)
            if counts is not None:
                counts[kind] += 1
            return f"<{kind}>"

        text = pattern.sub(replace, text)
    if not any(ch.isdigit() for ch in text):  # the matcher is the slow part; most messages hold no digit
        return text
    spans = _phone_spans(text, FALLBACK_REGIONS if regions is None else regions)
    for start, end in reversed(spans):
        text = text[:start] + "<phone>" + text[end:]
    if counts is not None and spans:
        counts["phone"] += len(spans)
    return text

