"""PII scrubbing: emails, URLs, IBANs, cards, and phone numbers through libphonenumber by region."""

from __future__ import annotations

from collections import Counter

import pytest

from persona_lm.data.pii import FALLBACK_REGIONS, phone_regions, scrub


@pytest.mark.parametrize("text, want", [
    ("mail sam.rivers+chat@example.co.uk today", "mail <email> today"),
    ("see https://example.org/menu?day=2.", "see <url>."),
    ("www.example.com, or bit.ly/x1", "<url>, or <url>"),
    ("call +44 7700 900123 or 07911 123456", "call <phone> or <phone>"),
    ("(415) 555-0132 / 415.555.0132", "<phone> / <phone>"),
    ("+44 (0)20 7946 0958 and 0049 30 1234567", "<phone> and <phone>"),
    ("06 12 34 56 78", "<phone>"),
    ("card 4111 1111 1111 1111, 5500-0000-0000-0004", "card <card>, <card>"),
    ("GB82 WEST 1234 5698 7654 32", "<iban>"),
])
def test_pii_is_replaced(text, want):
    assert scrub(text) == want


# National numbers as people write them at home, without a country code.
NATIONAL = [
    ("ES", "el móvil es 612 34 56 78 y el fijo 91 123 45 67", 2),
    ("IT", "chiamami al 347 123 4567 o in ufficio allo 06 6982 1234", 2),
    ("DE", "Handy 0151 23456789, Büro 089 12345678", 2),
    ("GB", "mobile 07911 123456, landline 020 7946 0958", 2),
    ("FR", "portable 06 12 34 56 78, fixe 01 42 68 53 00", 2),
    ("IN", "call 98765 43210 or 022 2345 6789", 2),
    ("CN", "手机 138 0013 8000, 座机 010 6552 9988", 2),
    ("BR", "celular (11) 91234-5678, fixo (21) 2345-6789", 2),
    ("US", "cell (212) 736-5000, office 650-253-0000", 2),
]


@pytest.mark.parametrize("region, text, n", NATIONAL)
def test_national_numbers_of_the_export_region(region, text, n):
    counts = Counter()
    out = scrub(text, counts, regions=(region,))
    assert out.count("<phone>") == n and counts == Counter({"phone": n})
    assert not any(ch.isdigit() for ch in out)


@pytest.mark.parametrize("region, text, n", NATIONAL)
def test_the_fallback_regions_cover_the_same_numbers(region, text, n):
    assert region in FALLBACK_REGIONS
    assert scrub(text).count("<phone>") == n


def test_region_decides_what_a_national_number_is():
    # A Lisbon landline means nothing in the fallback regions' plans; it is only a number once the chat is Portuguese.
    assert scrub("liga para 21 123 4567") == "liga para 21 123 4567"
    assert scrub("liga para 21 123 4567", regions=phone_regions(language="pt")) == "liga para <phone>"
    assert scrub("Büro 089 12345678", regions=("ES",)) == "Büro 089 12345678"


def test_international_numbers_are_found_whatever_the_regions():
    text = "+34 699 11 22 33, +49 151 23456789, +55 11 91234-5678, +91 98765 43210, +86 138 0013 8000"
    assert scrub(text, regions=()) == ", ".join(["<phone>"] * 5)
    # Ofcom's range for drama: no one has it, but a number written with + is a number, so it goes.
    assert scrub("+44 7700 900461", regions=()) == "<phone>"


def test_phone_regions_order():
    assert phone_regions("PT", "es") == ("PT",)
    assert phone_regions(None, "es")[0] == "ES"
    assert phone_regions(None, "en") == FALLBACK_REGIONS
    assert phone_regions() == FALLBACK_REGIONS


@pytest.mark.parametrize("text", [
    "on 30/12/2021 at 22:15, or 2021-12-30 or 30.12.2021 10.30 or 01.02.2021",
    "14/03/23 19:02, 14.03.23, 2024-03-12 18:04:27, 7:45pm, 10:30-11:45",
    "it costs £12.50, $1,299.99 or 1.299,00 €; R$ 1.299,90, ₹12,34,567, 1 299,00 zł, +3.5%",
    "back in 1999, 2003 and 2024; 3-2 to us; 100 000 people; 12:30:45",
    "version 0.12.3 of node.js, e.g. this",
    "4111 1111 1111 1112 fails Luhn, GB00 WEST 1234 5698 7654 32 fails mod 97",
    "order #302-1234567-1234567, pedido 123456789, ticket #20240312 and room 12 at 7",
    "Sendungsnummer 00340434161094022115, tracking 1Z999AA10123456784",
    "IMG-20240312-WA0007.jpg PTT-20240101-WA0001.opus VID-20231224-WA0012.mp4 STK-20230101-WA0003.webp",
    "<attached: 00000012-PHOTO-2021-10-23-18-04-27.jpg> DOC-20240101-WA0004.pdf",
    "ping me @sam",
])
@pytest.mark.parametrize("regions", [None, ("ES",), ("IT",), ("DE",), ("GB",), ("FR",), ("IN",), ("CN",), ("BR",),
                                     ("US",)], ids=lambda r: ",".join(r) if r else "fallback")
def test_ordinary_numbers_and_file_names_survive(text, regions):
    assert scrub(text, regions=regions) == text


def test_pii_counts_by_kind():
    counts = Counter()
    scrub("a@b.io, https://x.org, 07911 123456, +44 7911 123457, 4111111111111111", counts)
    assert counts == Counter({"email": 1, "url": 1, "phone": 2, "card": 1})
