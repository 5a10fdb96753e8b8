"""import_messages: the user's chat exports -> PII-scrubbed dialogues in their own voice.

Reads params `messages`; writes data/interim/dialogues/messages.jsonl and reports/validation/messages.json.
Everything is parsed and validated before the output is written, so a bad export leaves no partial file.
"""

from __future__ import annotations

import logging

from persona_lm import stage
from persona_lm.data.messages import import_messages
from persona_lm.data.validation import validate_dialogues
from persona_lm.io import write_jsonl
from persona_lm.params import Params

OUT = "data/interim/dialogues/messages.jsonl"
REPORT = "reports/validation/messages.json"

log = logging.getLogger("persona_lm.import_messages")


def main(p: Params) -> None:
    result = import_messages(p.messages)
    for reason, n in sorted(result.counts.items()):
        log.info("%s: %d", reason, n)
    if p.messages.scrub_pii:
        pii = ", ".join(f"{kind} {n}" for kind, n in sorted(result.pii.items())) or "none found"
        log.info("PII replaced: %s", pii)
    if result.skips.total:
        log.warning("skipped %d malformed messages: %s", result.skips.total, result.skips.as_dict())
    if p.messages.exports and not result.rows:
        log.warning("no conversations came out of the exports: are gap_minutes or min_turns too strict?")
    validate_dialogues(result.rows, labels=set(p.persona.emotions), name="messages", report_path=REPORT)
    n = write_jsonl(OUT, result.rows)
    log.info("wrote %d conversations from %d export(s) to %s", n, len(p.messages.exports), OUT)


if __name__ == "__main__":
    stage.run(main)
