"""User-facing errors and counted skips.

A `PersonaError` is a problem the user can fix (a bad param, a malformed file, an unreachable host); stages
print its message on one line and exit 1 instead of a traceback. `Skips` counts inputs that were skipped on
purpose, with the reason, so a run can say exactly what it left out.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("persona_lm")


class PersonaError(Exception):
    """An error whose message is the whole story: shown to the user as is."""


class ParamsError(PersonaError):
    pass


class InputError(PersonaError):
    """A malformed input file; the message names the file and, where known, the line."""

    def __init__(self, path, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.reason = str(path), line, message


class Skips:
    """Counts skipped inputs by reason; logs the first few of each reason with where they came from, so a
    dataset with thousands of skips of one kind stays readable (the full counts go in the reports)."""

    LOG_FIRST = 5

    def __init__(self, what: str):
        self.what = what
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, where: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.LOG_FIRST:
            more = " (further skips for this reason are counted, not logged)" if n == self.LOG_FIRST else ""
            log.warning("skipped %s%s: %s%s", self.what, f" {where}" if where else "", reason, more)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
