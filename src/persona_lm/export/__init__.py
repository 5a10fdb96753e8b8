"""Take a model folder elsewhere: `persona-lm export --format hf|peft|gguf OUT`, one module per format."""

from __future__ import annotations

from persona_lm.export.gguf import export_gguf
from persona_lm.export.hf import export_hf, family
from persona_lm.export.peft import export_peft

FORMATS = {"hf": export_hf, "peft": export_peft, "gguf": export_gguf}

__all__ = ["FORMATS", "export_gguf", "export_hf", "export_peft", "family"]
