"""What every export format shares: writing the output folder atomically without ever replacing a folder
that is not an earlier export, and the persona record that travels with the weights."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from persona_lm.errors import PersonaError

# An export is recognised by its persona record: "persona_lm" in config.json (hf) or a persona_lm.json (peft).
RECORD = "persona_lm.json"


def is_export(folder: Path) -> bool:
    if (folder / RECORD).is_file():
        return True
    try:
        return "persona_lm" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


@contextmanager
def export_dir(out: Path) -> Iterator[Path]:
    """Yield a temp folder beside `out` that replaces it when the block succeeds; an existing `out` is only
    replaced if it is empty or an earlier export (never a random folder)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_export(out):
        raise PersonaError(f"{out} exists and is not an earlier export; choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def persona_record(meta: dict, **extra) -> dict:
    """The persona's name, system prompt and emotion labels (the emotion head's outputs, in order)."""
    return {"persona": meta.get("persona"), "system_prompt": meta.get("system_prompt"),
            "emotions": meta.get("emotions", []), **extra}
