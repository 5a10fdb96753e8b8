"""Export a base-model run's adapter in peft's format (`persona-lm export --format peft OUT`).

The folder is what `PeftModel.from_pretrained(base, OUT)` loads onto the stock base named in
adapter_config.json: `adapter_config.json` + `adapter_model.safetensors`, with the tokenizer (and chat template)
trained on, the emotion head, and persona_lm.json (persona, system prompt, emotion labels, the base's commit).
With `base.markers: tokens` the tokenizer holds added tokens: grow the base's embeddings to its length
(`base.resize_token_embeddings(len(tokenizer))`) before loading; the adapter carries the new rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from persona_lm.errors import PersonaError
from persona_lm.export.common import RECORD, export_dir, persona_record, refuse_architecture

ADAPTER = ("adapter_config.json", "adapter_model.safetensors")


def export_peft(model_dir: Path, out: Path, persona: int = 0) -> Path:
    """Copy the adapter of `model_dir` into `out`, atomically. Raises PersonaError for a folder that holds no
    adapter, or one whose base weights were fine-tuned too (an adapter alone would not reproduce it)."""
    model_dir, out = Path(model_dir), Path(out)
    try:
        meta = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise PersonaError(f"{model_dir}: no model folder here (config.json is missing or broken)") from None
    if meta.get("kind") != "base":
        refuse_architecture(meta.get("model") or {})  # first: --format hf, suggested below, refuses these too
        raise PersonaError(f"{model_dir} was trained from scratch: its LoRA adapters are merged into its weights, "
                           "so there is no adapter to export; use --format hf")
    if not meta.get("adapter"):
        raise PersonaError(f"{model_dir} fine-tuned all weights of its base (lora.r 0), so there is no adapter to "
                           "export; use --format hf")
    if meta.get("weights"):
        raise PersonaError(f"{model_dir}: a phase outside lora.phases fine-tuned the base's own weights, so the "
                           "adapter alone does not reproduce the model; use --format hf")
    if persona:
        raise PersonaError("a base-model run holds one persona: --persona must be 0")
    with export_dir(out) as tmp:
        for f in model_dir.iterdir():
            if f.name in ADAPTER or f.name.startswith("tokenizer") or f.name in (
                    "special_tokens_map.json", "chat_template.jinja", "emotion_head.safetensors"):
                shutil.copyfile(f, tmp / f.name)
        record = persona_record(meta, base=meta["base"], emotion_head="emotion_head.safetensors")
        (tmp / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return out
