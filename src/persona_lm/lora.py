"""LoRA through peft: which weights a phase trains, adapters attached or continued, merged, and checked.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained weight W and
learns W + (alpha / r) * B @ A with A (r, in) and B (out, r), B starting at zero so training starts from the
pretrained model exactly. peft is the implementation, so adapters are saved in the format the ecosystem loads.

- On a base model (BaseLM) one adapter serves the whole run: each phase in `lora.phases` attaches it or keeps
  training it, so models/final holds one adapter for the stock base. A phase outside `lora.phases` trains all
  weights, after folding in any adapter.
- On our own model, adapters (with the token embedding and output head, see `apply`) fine-tune the pretrained
  weights of a phase and are merged into them when the phase ends, so every model folder stays plain weights
  and decoding keeps the lean path. Pretraining from scratch always trains all weights: adapters on a random
  model learn next to nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from persona_lm.errors import PersonaError

# our model's projections: attention q/k/v (one matrix) and output, MLP in and out
OWN_TARGETS = ["c_attn", "c_proj", "c_fc"]


def uses_lora(p, phase: str) -> bool:
    """Whether `phase` ("pretrain" | "finetune" | "emotion") trains adapters under params `p`."""
    return p.lora.r > 0 and phase in p.lora.phases and (phase != "pretrain" or p.base.model is not None)


def adaptable(model: nn.Module, own: bool) -> dict[str, str]:
    """Names of the layers LoRA may adapt -> their type: our blocks' linear layers, or a transformers model's
    linear (and GPT-2 Conv1D) layers other than the output head."""
    out = {}
    head = None if own else model.get_output_embeddings()
    for name, m in model.named_modules():
        kind = type(m).__name__
        if own and not (isinstance(m, nn.Linear) and name.startswith("blocks.")):
            continue
        if not own and (kind not in ("Linear", "Conv1D") or m is head):
            continue
        out[name] = kind
    return out


def check_targets(model: nn.Module, targets: list[str] | None, own: bool) -> list[str] | str:
    """The target_modules to give peft: `targets` once each is checked to name an adaptable layer (peft's rule:
    the module's name, or its dotted tail), or the default. Raises PersonaError naming `lora.target_modules`.
    Works on a meta-device skeleton, so a base is checked before its weights are downloaded."""
    if targets is None:
        return OWN_TARGETS if own else "all-linear"  # peft: every linear layer but the output head
    names = adaptable(model, own)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise PersonaError(f"lora.target_modules: no adaptable layer named {t!r} in this model; its linear "
                               f"layers are: {', '.join(leaves)}")
    return targets


def config(lp, targets, token_indices: dict[str, list[int]] | None = None, causal_lm: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=lp.r, lora_alpha=lp.alpha, lora_dropout=lp.dropout, target_modules=targets,
                      trainable_token_indices=token_indices or None, task_type="CAUSAL_LM" if causal_lm else None)


def apply(model: nn.Module, p, phase: str, seed: int) -> None:
    """Set what `phase` trains on `model` (in place): an adapter, or all weights. The adapter's random
    initialisation (A; B is zero) is seeded, so runs repeat exactly."""
    from peft import get_peft_model

    from persona_lm.base import BaseLM

    if isinstance(model, BaseLM):
        if not uses_lora(p, phase):
            model.merge()
            model.hf.requires_grad_(True)
            model.trained_full = True
            return
        if model.adapter is None:
            targets = check_targets(model.hf, p.lora.target_modules, own=False)
            torch.manual_seed(seed)
            model.lm = get_peft_model(model.hf, config(p.lora, targets, _token_indices(model), causal_lm=True))
        for name, param in model.lm.named_parameters():  # a loaded adapter continues training
            param.requires_grad = "lora_" in name or "trainable_tokens_delta" in name
        return
    if uses_lora(p, phase):
        targets = check_targets(model, p.lora.target_modules, own=True)
        torch.manual_seed(seed)
        get_peft_model(model, config(p.lora, targets))  # injects the adapter layers into `model` itself
        # Pretraining from scratch on a small corpus leaves the rows of chat-only tokens (role and emotion
        # markers, words only the dialogues use) untrained, and adapters cannot change rows: the token embedding
        # and output head train too. Default data, 200 finetune steps, val loss: 3.59 with them, 5.32 adapters
        # alone (4.73 with only the control tokens' rows), 3.51 training all weights.
        model.wte.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)


def _token_indices(model) -> dict[str, list[int]] | None:
    """Control tokens (the chat template's, and our emotion and action markers) get trainable embedding rows in
    the adapter: in the input embedding, and in an untied output head too (peft follows tied weights)."""
    ids = model.marker_ids
    if not ids:
        return None
    hf = model.hf
    names = {id(m): n for n, m in hf.named_modules()}
    out = {names[id(hf.get_input_embeddings())]: ids}
    if not hf.config.get_text_config().tie_word_embeddings:
        out[names[id(hf.get_output_embeddings())]] = ids
    return out


def merge(model: nn.Module) -> None:
    """Fold our model's adapter layers into their weights and put the plain layers back (peft's merge math)."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m.get_base_layer())
