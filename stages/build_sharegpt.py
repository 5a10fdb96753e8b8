"""Stage build_sharegpt: every dialogue source -> data/processed/sharegpt/{train,val}.jsonl + metrics.

Reads the dialogue files of the earlier stages, `sharegpt.extra` and `emotion.datasets`; dedups, applies the
mix weights and splits by conversation (see persona_lm.data.build). The rows are validated before they are
written, so a bad build never replaces a good one.
"""

from __future__ import annotations

import logging

from persona_lm import stage
from persona_lm.data.build import build, write_split
from persona_lm.data.validation import validate_dialogues
from persona_lm.io import write_json
from persona_lm.params import Params

log = logging.getLogger("persona_lm.build_sharegpt")

DIALOGUES = "data/interim/dialogues"
OUT = "data/processed/sharegpt"
METRICS = "reports/sharegpt.json"
SUMMARY = "reports/dataset.json"  # the DVC metric; the full report (skips, labels, sources) is METRICS
VALIDATION = "reports/validation/sharegpt.json"


def main(p: Params) -> None:
    train, val, metrics = build(p, DIALOGUES)
    validate_dialogues(train + val, labels=set(p.persona.emotions), name="sharegpt", report_path=VALIDATION)
    write_split(OUT, train, val)
    write_json(METRICS, metrics)
    write_json(SUMMARY, {"train_rows": metrics["train"]["rows"], "val_rows": metrics["val"]["rows"],
                         "skipped": metrics["skipped"], "finetune_share": metrics["finetune_shares"]})
    log.info("sharegpt: %d train, %d val rows (%d skipped); per source: %s; finetune shares: %s", len(train),
             len(val), metrics["skipped"], {s: m["rows_out"] for s, m in metrics["sources"].items()},
             {s: v for s, v in metrics["finetune_shares"].items() if v})


if __name__ == "__main__":
    stage.run(main)
