"""Take a model folder elsewhere: `persona-lm export --format hf|peft OUT`, one module per format."""

from __future__ import annotations

from persona_lm.export.hf import export_hf, family
from persona_lm.export.peft import export_peft

FORMATS = {"hf": export_hf, "peft": export_peft}

__all__ = ["FORMATS", "export_hf", "export_peft", "family"]
