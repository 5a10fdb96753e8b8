"""Export a model folder as a Hugging Face transformers folder (`persona-lm export --format hf OUT`).

A base-model run is written as its base's own architecture with the adapter (if any) merged in, the base's
tokenizer and chat template, and the emotion head beside it.

Our own model maps onto a stock architecture, so the export loads with `AutoModelForCausalLM` and no custom
code: learned positions + LayerNorm + GELU become `GPT2LMHeadModel`; RoPE + RMSNorm + SwiGLU become
`LlamaForCausalLM`. Any other mix has no stock equivalent and is refused with the option that breaks it, and so
are memory attention (`model.memory.enabled`), differential attention and mixture-of-experts MLPs
(`model.attention: differential`, `model.mlp: moe`), which neither stock architecture has.
The conversion is exact (same logits), which takes three small translations:

- The persona embedding is added to every input position. A constant added to every input is the same as a
  constant added to every row of the token embedding, so it is folded into the input embedding (GPT-2: into
  every position row instead, which keeps tied embeddings tied). A tied Llama model with a non-zero persona row
  is exported untied: `embed_tokens` carries the persona, `lm_head` keeps the original embedding.
- Grouped-query attention in the GPT-2 family is expanded to plain multi-head attention by repeating each
  key/value head for its query group (GPT-2 has no GQA; the result is identical, only larger).
- GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear; its LayerNorm and projections always
  have biases, written as zeros when the model has none.

The emotion head is not part of a causal LM: it is saved beside it as `emotion_head.safetensors`, and its
labels (with the persona name and system prompt) go under "persona_lm" in config.json. It reads the final
(post-norm) hidden state, i.e. `output_hidden_states[-1]` of the exported model.

Our chat template (tokenizer.CHAT_TEMPLATE) renders messages as `ChatTokenizer.render/prompt` do. Two
differences remain, because a Jinja template only produces a string that is then tokenized: `*action*` spans
are not turned into action marker tokens (our encoder does that), and special-token strings typed inside a
message are parsed as special tokens rather than kept as text. Only persona 0 is exported unless another index
is asked for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from persona_lm.errors import PersonaError
from persona_lm.export.common import export_dir, persona_record, refuse_architecture
from persona_lm.tokenizer import ASSISTANT, CHAT_TEMPLATE, END, EOT, PAD, SYSTEM, USER


# position scheme -> (family, its name, the options it needs)
FAMILIES = {"learned": ("gpt2", "GPT-2", {"norm": "layernorm", "mlp": "gelu"}),
            "rope": ("llama", "Llama", {"norm": "rmsnorm", "mlp": "swiglu"})}


def family(cfg) -> str:
    """"gpt2" or "llama", or a PersonaError naming the option neither stock architecture can express."""
    if getattr(cfg, "memory_layers", ()):
        raise PersonaError("cannot export a model with memory attention (model.memory.enabled: true): transformers' "
                           "GPT-2 and Llama have no compressed memory to attend to, and without it the model would "
                           "not behave as trained; export a run with model.memory.enabled: false")
    refuse_architecture(cfg.to_dict())
    if cfg.pos not in FAMILIES:
        raise PersonaError(f"cannot export model.pos={cfg.pos}: only learned (GPT-2) and rope (Llama) are supported")
    name, title, needs = FAMILIES[cfg.pos]
    for option, want in needs.items():
        value = getattr(cfg, option)
        if value != want:
            other_pos, (_, other, other_needs) = next((k, v) for k, v in FAMILIES.items() if k != cfg.pos)
            alt = ", ".join([f"pos={other_pos}"] + [f"{k}={v}" for k, v in other_needs.items()])
            raise PersonaError(f"cannot export model.{option}={value} with model.pos={cfg.pos}: the {title} "
                               f"architecture needs model.{option}={want} (or use the {other} family: {alt})")
    return name


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().cpu().contiguous().clone()


def _persona_row(model, persona: int) -> torch.Tensor:
    n = model.persona.weight.shape[0]
    if not 0 <= persona < n:
        raise PersonaError(f"persona {persona} does not exist: this model has {n} persona(s)")
    return model.persona.weight[persona].detach()


def _repeat_heads(t: torch.Tensor, n_heads: int, times: int) -> torch.Tensor:
    """Rows of `n_heads` heads, each head's rows repeated `times` times in place (k/v head j -> j*times...)."""
    return t.reshape(n_heads, -1, *t.shape[1:]).repeat_interleave(times, dim=0).reshape(-1, *t.shape[1:])


def gpt2_weights(model, persona: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json fields, state dict) for GPT2LMHeadModel."""
    cfg = model.cfg
    E, hd, H, K = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head
    bias = lambda m, n: _t(m.bias) if m.bias is not None else torch.zeros(n)  # noqa: E731  GPT-2 always has biases
    sd = {"transformer.wte.weight": _t(model.wte.weight),
          "transformer.wpe.weight": _t(model.wpe.weight + _persona_row(model, persona)),
          "transformer.ln_f.weight": _t(model.ln_f.weight), "transformer.ln_f.bias": bias(model.ln_f, E)}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        w = b.attn.c_attn.weight.detach()
        bb = b.attn.c_attn.bias.detach() if b.attn.c_attn.bias is not None else torch.zeros(w.shape[0])
        # rows are [q | k | v]; repeating each k/v head for its query group turns GQA into plain MHA
        q, k, v = w.split([E, K * hd, K * hd])
        qb, kb, vb = bb.split([E, K * hd, K * hd])
        rep = H // K
        sd[p + "attn.c_attn.weight"] = _t(torch.cat([q, _repeat_heads(k, K, rep), _repeat_heads(v, K, rep)]).T)
        sd[p + "attn.c_attn.bias"] = _t(torch.cat([qb, _repeat_heads(kb, K, rep), _repeat_heads(vb, K, rep)]))
        sd[p + "attn.c_proj.weight"] = _t(b.attn.c_proj.weight.T)
        sd[p + "attn.c_proj.bias"] = bias(b.attn.c_proj, E)
        sd[p + "mlp.c_fc.weight"] = _t(b.mlp.c_fc.weight.T)
        sd[p + "mlp.c_fc.bias"] = bias(b.mlp.c_fc, cfg.hidden_dim)
        sd[p + "mlp.c_proj.weight"] = _t(b.mlp.c_proj.weight.T)
        sd[p + "mlp.c_proj.bias"] = bias(b.mlp.c_proj, E)
        for ln in ("ln_1", "ln_2"):
            sd[p + f"{ln}.weight"] = _t(getattr(b, ln).weight)
            sd[p + f"{ln}.bias"] = bias(getattr(b, ln), E)
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = _t(model.lm_head.weight)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_positions": cfg.block_size, "n_embd": E, "n_layer": cfg.n_layer, "n_head": H,
              "n_inner": cfg.hidden_dim, "activation_function": "gelu",  # "gelu" is the exact erf form
              "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings}
    return config, sd


def llama_weights(model, persona: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json fields, state dict) for LlamaForCausalLM."""
    cfg = model.cfg
    E, hd, K = cfg.n_embd, cfg.head_dim, cfg.n_kv_head
    row = _persona_row(model, persona)
    folded = bool(row.any())
    tied = cfg.tie_embeddings and not folded  # the persona lives in embed_tokens, so lm_head must differ
    sd = {"model.embed_tokens.weight": _t(model.wte.weight + row), "model.norm.weight": _t(model.ln_f.weight)}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.bias else ("weight",):  # biases split exactly like their weights
            for name, t in zip(("q", "k", "v"), getattr(b.attn.c_attn, kind).split([E, K * hd, K * hd])):
                sd[p + f"self_attn.{name}_proj.{kind}"] = _t(t)
            sd[p + f"self_attn.o_proj.{kind}"] = _t(getattr(b.attn.c_proj, kind))
            gate, up = getattr(b.mlp.c_fc, kind).chunk(2)
            sd[p + f"mlp.gate_proj.{kind}"], sd[p + f"mlp.up_proj.{kind}"] = _t(gate), _t(up)
            sd[p + f"mlp.down_proj.{kind}"] = _t(getattr(b.mlp.c_proj, kind))
        sd[p + "input_layernorm.weight"] = _t(b.ln_1.weight)
        sd[p + "post_attention_layernorm.weight"] = _t(b.ln_2.weight)
    if not tied:
        sd["lm_head.weight"] = _t(model.lm_head.weight)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": E, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": K, "head_dim": hd,
              "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-5,
              "rope_parameters": rope, "rope_theta": cfg.rope_theta,  # the second for transformers < 5
              "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0,
              "tie_word_embeddings": tied}
    return config, sd


def _tokenizer_files(tokenizer_json: Path, out: Path) -> dict[str, int]:
    """Copy tokenizer.json and write tokenizer_config.json with the chat template; returns the special ids."""
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    vocab = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
              "bos_token": None, "eos_token": END, "pad_token": PAD, "unk_token": None,
              "model_max_length": None, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": END, "pad_token": PAD}, indent=2) + "\n")
    return ids


def _emotion_head(model, folder: Path) -> None:
    head = {"weight": _t(model.emotion_head.weight), "bias": _t(model.emotion_head.bias)}
    save_file(head, str(folder / "emotion_head.safetensors"), metadata={"format": "pt"})


def export_hf(model_dir: Path, out: Path, persona: int = 0) -> Path:
    """Write the transformers folder `out` for the model folder `model_dir`, atomically."""
    from persona_lm.base import BaseLM
    from persona_lm.train.checkpoint import load_model

    model_dir, out = Path(model_dir), Path(out)
    model, tok, meta = load_model(model_dir)
    with export_dir(out) as tmp:
        if isinstance(model, BaseLM):
            if persona:
                raise PersonaError("a base-model run holds one persona: --persona must be 0")
            _base_model(model, tok, meta, tmp)
        else:
            _own_model(model, model_dir, meta, tmp, persona)
    return out


def _base_model(model, tok, meta: dict, tmp: Path) -> None:
    """The merged base in its own architecture; the tokenizer as trained on (added tokens included)."""
    model.hf.save_pretrained(str(tmp))
    tok.hf.save_pretrained(str(tmp))
    config = json.loads((tmp / "config.json").read_text())
    config["persona_lm"] = persona_record(meta, family="base", base=meta["base"],
                                          emotion_head="emotion_head.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    gen = tmp / "generation_config.json"
    settings = json.loads(gen.read_text()) if gen.is_file() else {}
    settings["eos_token_id"] = sorted(tok.stop_ids)  # a reply ends at the template's end-of-turn marker
    gen.write_text(json.dumps(settings, indent=2) + "\n")
    _emotion_head(model, tmp)


def _own_model(model, model_dir: Path, meta: dict, tmp: Path, persona: int) -> None:
    kind = family(model.cfg)
    with torch.no_grad():
        config, sd = (gpt2_weights if kind == "gpt2" else llama_weights)(model, persona)
    ids = _tokenizer_files(model_dir / "tokenizer.json", tmp)
    stop = [ids[t] for t in (END, EOT, SYSTEM, USER, ASSISTANT) if t in ids]
    extra = {"persona_lm": persona_record(meta, family=kind, persona_index=persona, model=model.cfg.to_dict(),
                                          emotion_head="emotion_head.safetensors" if model.emotion_head else None)}
    config.update({"bos_token_id": None, "eos_token_id": ids.get(END), "pad_token_id": ids.get(PAD),
                   "torch_dtype": "float32", "use_cache": True, **extra})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    gen = {"bos_token_id": None, "eos_token_id": stop, "pad_token_id": ids.get(PAD)}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if model.emotion_head is not None:
        _emotion_head(model, tmp)
