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


def refuse_architecture(cfg: dict) -> None:
    """PersonaError for the architecture options that no export format expresses (`cfg`: our model's config
    dict): transformers' GPT-2 and Llama, and llama.cpp's, have no differential attention and no routed
    experts, and the model would not behave as trained without them."""
    if cfg.get("attention", "standard") != "standard":
        raise PersonaError(f"cannot export model.attention: {cfg['attention']}: transformers' GPT-2 and Llama and "
                           "llama.cpp have no differential attention (two softmax maps subtracted); export a run "
                           "with model.attention: standard")
    if cfg.get("mlp") == "moe":
        raise PersonaError("cannot export model.mlp: moe: transformers' GPT-2 and Llama and llama.cpp's gpt2 and "
                           "llama have one MLP per block, not routed experts; export a run with model.mlp: gelu "
                           "(GPT-2) or swiglu (Llama)")


def persona_record(meta: dict, **extra) -> dict:
    """The persona's name, system prompt and emotion labels (the emotion head's outputs, in order)."""
    return {"persona": meta.get("persona"), "system_prompt": meta.get("system_prompt"),
            "emotions": meta.get("emotions", []), **extra}
