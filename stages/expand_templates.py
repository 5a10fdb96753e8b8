"""expand_templates: the persona dialogue templates (data/templates) -> emotion-labelled template dialogues.

Reads params `seed`, `persona` and `templates` only. The rows are validated before they are written, so a
failed check leaves the previous output in place and the report says why.
"""

from __future__ import annotations

import logging
from collections import Counter

from persona_lm import stage
from persona_lm.data import templates
from persona_lm.data.validation import validate_dialogues
from persona_lm.io import write_jsonl
from persona_lm.params import Params

OUT = "data/interim/dialogues/templates.jsonl"
REPORT = "reports/validation/templates.json"

log = logging.getLogger("persona_lm.expand_templates")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


def main(p: Params) -> None:
    labels = set(p.persona.emotions)
    facts = {k: p.persona.fact_value(k) for k in p.persona.facts if k not in templates.BUILTIN_SLOTS}
    bank = templates.load(p.templates.dir, labels, facts)
    log.info("%d templates in %d categories from %s", len(bank.templates), len(bank.categories), p.templates.dir)
    rows = templates.expand(bank, n=p.templates.conversations, max_turns=p.templates.max_turns, seed=p.seed,
                            name=p.persona.name, user=p.persona.user_name, facts=facts)
    validate_dialogues(rows, labels=labels, name="templates", report_path=REPORT)
    write_jsonl(OUT, rows)

    categories = Counter(c for r in rows for c in r["category"].split("+"))
    emotions = Counter(e for r in rows for e in r["emotions"])
    exchanges = Counter(len(r["emotions"]) for r in rows)
    log.info("wrote %d conversations to %s", len(rows), OUT)
    log.info("exchanges per conversation: %s", ", ".join(f"{k}: {exchanges[k]}" for k in sorted(exchanges)))
    log.info("categories (a chained conversation counts once for each): %s", _counts(categories))
    log.info("emotions of replies: %s", _counts(emotions))
    unused = sorted(labels - set(emotions))
    if unused:
        log.warning("no template reply is labelled %s", unused)


if __name__ == "__main__":
    stage.run(main)
