"""import_messages: the user's chat exports -> PII-scrubbed dialogues in their own voice.

Reads params `messages`; writes data/interim/dialogues/messages.jsonl and reports/validation/messages.json
(the data validation results, plus under `import` what was read, dropped by reason, changed and scrubbed).
Everything is parsed and validated before the output is written, so a bad export leaves no partial file.
`persona-lm messages FILE... --me NAME` runs the same import_messages on chosen files and prints the rows.
"""

from __future__ import annotations

import logging

from persona_lm import stage
from persona_lm.data.messages import import_messages
from persona_lm.data.validation import DataValidationError, validate_dialogues
from persona_lm.io import read_json, write_json, write_jsonl
from persona_lm.params import Params

OUT = "data/interim/dialogues/messages.jsonl"
REPORT = "reports/validation/messages.json"

log = logging.getLogger("persona_lm.import_messages")


def main(p: Params) -> None:
    result = import_messages(p.messages)
    for line in result.summary():
        log.info(line)
    if p.messages.exports and not result.rows:
        log.warning("no conversations came out of the exports: are gap_minutes or min_turns too strict?")
    try:
        report = validate_dialogues(result.rows, labels=set(p.persona.emotions), name="messages", report_path=REPORT)
    except DataValidationError:
        write_json(REPORT, {**read_json(REPORT), "import": result.report()})
        raise
    write_json(REPORT, {**report, "import": result.report()})
    n = write_jsonl(OUT, result.rows)
    log.info("wrote %d conversations from %d export(s) to %s", n, len(p.messages.exports), OUT)


if __name__ == "__main__":
    stage.run(main)
