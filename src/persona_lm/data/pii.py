"""Scrub personal data from chat text before it can reach a training set.

A model trained on someone's chats will happily repeat their friends' phone numbers, so every message
passes through `scrub`: emails, URLs, IBANs, payment-card numbers and phone numbers become placeholders
(`<email>`, `<url>`, `<iban>`, `<card>`, `<phone>`) and the replacements are counted by kind.

Chats are full of numbers that are not personal (dates, times, prices, years, scores), so the number rules
find candidates with a loose regex and then confirm them: cards pass the Luhn check, IBANs the mod-97
check, phones need a plausible digit count and shape. The rules run in order, most specific first, so an
email's domain is never half-replaced as a URL and a card number is never counted as a phone. Names and
street addresses are not detected: that needs a tagger, not a regex.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

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

# Digit groups joined by single separators; a group may be in brackets, "(0)20" included. Each separator is
# mandatory between groups, so the pattern cannot backtrack explosively on long digit runs.
PHONE = re.compile(r"(?<![\w+])(?:\+|\()?\d+(?:\)\d*)?(?:[ .\-\u00a0]\(?\d+(?:\)\d*)?)*(?!\w)")
_NANP = re.compile(r"(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-]?)[2-9]\d{2}[ .-]?\d{4}|[2-9]\d{2}-\d{4}")
_DATE = re.compile(r"\d{1,2}([./-])\d{1,2}\1(?:19|20)\d{2}|(?:19|20)\d{2}([./-])\d{1,2}\2\d{1,2}")


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


def _phone(s: str) -> bool:
    """International (+ or 00): 8-15 digits. National trunk 0: 9-12 digits. Else the North American shape."""
    digits = re.sub(r"\D", "", s)
    if _DATE.search(s):
        return False
    if s.startswith("+") or s.startswith("00"):
        return 8 <= len(digits) <= 15
    if digits.startswith("0"):
        return 9 <= len(digits) <= 12
    return _NANP.fullmatch(s) is not None


RULES: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    ("email", EMAIL, None),
    ("url", URL, None),
    ("iban", IBAN, _iban),
    ("card", CARD, _card),
    ("phone", PHONE, _phone),
]


def scrub(text: str, counts: Counter | None = None) -> str:
    """Replace personal data in `text` with `<kind>` placeholders; add the replacements to `counts`."""
    for kind, pattern, confirm in RULES:
        def replace(m: re.Match, kind=kind, confirm=confirm) -> str:
            if confirm is not None and not confirm(m.group(0)):
                return m.group(0)
            if counts is not None:
                counts[kind] += 1
            return f"<{kind}>"

        text = pattern.sub(replace, text)
    return text
