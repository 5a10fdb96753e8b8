"""Export a model folder as one GGUF file for llama.cpp, Ollama and LM Studio
(`persona-lm export --format gguf OUT.gguf [--quant f16|q8_0]`), with an Ollama Modelfile beside it.

The weights go the way the Hugging Face export takes them (export/hf.py: persona folded in, GPT-2's GQA
expanded), then through the translation llama.cpp's convert_hf_to_gguf.py applies to those HF folders, written
with llama.cpp's own `gguf` package (GGUF spec: ggml/docs/gguf.md in the ggml repository):

- Tensor names follow gguf's TensorNameMap (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`),
  the table the convert script looks names up in.
- Llama: llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)... where HF rotates halves (x_i, x_{i+d/2}), so the
  rows of each q and k head are reordered (the convert script's `permute`). A tied output is left out: llama.cpp
  falls back to token_embd.
- GPT-2: HF's Conv1D weights are (in, out); GGUF wants (out, in) like every other linear layer. llama.cpp's
  GPT-2 needs every bias, which the HF export already writes (zeros where the model has none), and computes
  GELU with the tanh approximation where ours is the exact erf form: logits differ in the third decimal.
- Types as the convert script picks them: 1-D tensors (norms, biases) and GPT-2's position table stay F32; the
  other matrices are F16, or Q8_0 with --quant q8_0 (a matrix whose rows are not a multiple of Q8_0's 32-value
  block stays F16).

Tokenizer: only byte-level BPE with GPT-2's pre-tokenizer (ours, `tokenizer.kind: bpe`) maps onto one of
llama.cpp's tokenizers exactly ("gpt2" model, "gpt-2" pre-tokenizer); special `<|...|>` tokens are CONTROL tokens,
which llama.cpp only produces from text when asked to parse specials, as our encoder only inserts them itself.
The chat template (tokenizer.chat_template) is the Jinja one the HF export carries, which also opens a
conversation without a system message with the persona's system prompt (tokenizer.chat_template()), as `chat` and
`serve` do: llama.cpp's own chat has nothing else to take it from. Our action markers are CONTROL tokens too, which
llama.cpp does not print: a reply's `*waves*` reads `waves` there.

A base-model run is exported with export_hf first (the merged base in its own architecture) and converted from
that folder when its architecture is Llama or GPT-2. Memory attention, differential attention, mixtures of
experts, option mixes neither architecture has (export/hf.py's family()) and the char tokenizer are refused.

The Modelfile (FROM, TEMPLATE, SYSTEM, PARAMETER stop/num_ctx) makes `ollama create NAME -f Modelfile` work with
nothing else. Its first line marks it as ours: an existing Modelfile without that line is never overwritten, and
an existing OUT that is not a GGUF file neither; an earlier export is replaced, each file atomically.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from persona_lm.errors import PersonaError
from persona_lm.export.hf import export_hf, family, gpt2_weights, llama_weights
from persona_lm.io import atomic_path
from persona_lm.tokenizer import ASSISTANT, END, EOT, PAD, SYSTEM, USER, chat_template

QUANTS = ("f16", "q8_0")
MODELFILE_HEADER = "# Ollama Modelfile written by `persona-lm export --format gguf`; the next export replaces it."
# HF architecture -> GGUF architecture: the only two this converter translates
ARCHITECTURES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
# Our chat format (tokenizer.CHAT_TEMPLATE with add_generation_prompt) in Ollama's Go template syntax
OLLAMA_TEMPLATE = ('{{ range .Messages }}{{ if eq .Role "system" }}' + SYSTEM + '{{ else if eq .Role "user" }}' + USER
                   + '{{ else if eq .Role "assistant" }}' + ASSISTANT + "{{ end }}{{ .Content }}" + END + "{{ end }}"
                   + ASSISTANT)


@dataclass
class Source:
    """What a GGUF file is made of, in Hugging Face terms: the HF config, state dict and tokenizer files."""
    arch: str  # GGUF architecture: "llama" or "gpt2"
    config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: dict  # tokenizer.json
    chat_template: str | None
    eos: str | None
    pad: str | None
    bos: str | None = None
    add_bos: bool = False
    stops: list[str] = field(default_factory=list)
    name: str | None = None
    system_prompt: str | None = None
    ours: bool = False  # our chat format (the Modelfile then carries it as a Go template)


def export_gguf(model_dir: Path, out: Path, persona: int = 0, quant: str = "f16") -> Path:
    """Write `out` (a .gguf file) and the Modelfile beside it for the model folder `model_dir`."""
    from persona_lm.train.checkpoint import load_model

    if quant not in QUANTS:
        raise PersonaError(f"--quant must be one of {', '.join(QUANTS)}, got {quant}")
    model_dir, out = Path(model_dir), Path(out)
    modelfile = out.with_name("Modelfile")
    _check_targets(out, modelfile)
    out.parent.mkdir(parents=True, exist_ok=True)
    if _is_base_run(model_dir):
        if persona:
            raise PersonaError("a base-model run holds one persona: --persona must be 0")
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
            source = hf_source(export_hf(model_dir, Path(tmp) / "hf"))
            _write(source, out, modelfile, quant)
    else:
        model, _, meta = load_model(model_dir)
        source = own_source(model, model_dir, meta, persona)
        _write(source, out, modelfile, quant)
    return out


def _is_base_run(model_dir: Path) -> bool:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("kind") == "base"
    except (OSError, ValueError):
        return False  # load_model says what is missing


def _check_targets(out: Path, modelfile: Path) -> None:
    """Refuse before any work rather than overwrite a file that is not an earlier export."""
    if out.is_dir() or out.suffix != ".gguf":
        raise PersonaError(f"gguf export writes one file whose name ends in .gguf, beside its Modelfile: give a path "
                           f"like {out / 'model.gguf' if out.is_dir() or not out.suffix else out.with_suffix('.gguf')}")
    if out.exists():
        with out.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise PersonaError(f"{out} exists and is not a GGUF file; choose a new path")
    if modelfile.exists() and modelfile.read_text(errors="replace").partition("\n")[0] != MODELFILE_HEADER:
        raise PersonaError(f"{modelfile} exists and was not written by persona-lm export; move it away or export "
                           "into another folder")


def _write(source: Source, out: Path, modelfile: Path, quant: str) -> None:
    with atomic_path(out) as tmp:
        write_gguf(source, tmp, quant)
    with atomic_path(modelfile) as tmp:
        tmp.write_text(ollama_modelfile(source, out.name))


# ----------------------------------------------------------------------------------------------- sources

def own_source(model, model_dir: Path, meta: dict, persona: int) -> Source:
    """One of our models, through the HF export's weight translation."""
    kind = family(model.cfg)  # refuses memory attention and mixes neither architecture has
    with torch.no_grad():
        config, sd = (gpt2_weights if kind == "gpt2" else llama_weights)(model, persona)
    vocab = json.loads((model_dir / "tokenizer.json").read_text())
    present = {t["content"] for t in vocab.get("added_tokens", [])}
    return Source(arch=kind, config=config, tensors=sd, tokenizer=vocab, eos=END, pad=PAD,
                  chat_template=chat_template(meta.get("system_prompt")),
                  stops=[t for t in (END, EOT, SYSTEM, USER, ASSISTANT) if t in present],
                  name=meta.get("persona"), system_prompt=meta.get("system_prompt"), ours=True)


def hf_source(folder: Path) -> Source:
    """A transformers folder (a base-model run's HF export) whose architecture is Llama or GPT-2."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    arch = next((ARCHITECTURES[a] for a in config.get("architectures") or [] if a in ARCHITECTURES), None)
    if arch is None:
        raise PersonaError(f"cannot export a base of architecture {', '.join(config.get('architectures') or ['?'])} "
                           f"as GGUF: only {' and '.join(ARCHITECTURES)} are translated; use --format hf and "
                           "llama.cpp's convert_hf_to_gguf.py")
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "emotion_head.safetensors":
            tensors.update(load_file(str(path)))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tok_config.get("chat_template")
    vocab = json.loads((folder / "tokenizer.json").read_text())
    gen = folder / "generation_config.json"
    stop_ids = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids] if stop_ids is not None else []
    names = {i: t for t, i in _token_ids(vocab).items()}
    record = config.get("persona_lm", {})
    return Source(arch=arch, config=config, tensors=tensors, tokenizer=vocab, chat_template=template,
                  eos=_token_text(tok_config.get("eos_token")), pad=_token_text(tok_config.get("pad_token")),
                  bos=_token_text(tok_config.get("bos_token")), add_bos=bool(tok_config.get("add_bos_token")),
                  stops=[names[i] for i in stop_ids if i in names], name=record.get("persona"),
                  system_prompt=record.get("system_prompt"))


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


# ----------------------------------------------------------------------------------------------- tensors

def _rope_interleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from HF's rotate-half order to llama.cpp's interleaved pairs (convert's `permute`)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _llama_tensor(name: str, t: torch.Tensor, config: dict) -> torch.Tensor:
    if ".self_attn.q_proj." in name:
        return _rope_interleave(t, config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return _rope_interleave(t, config.get("num_key_value_heads") or config["num_attention_heads"])
    return t


def _gpt2_tensor(name: str, t: torch.Tensor, config: dict) -> torch.Tensor:
    if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return t.T  # Conv1D (in, out) -> (out, in)
    return t


def gguf_tensors(source: Source) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, in llama.cpp's layout."""
    import gguf

    cfg = source.config
    n_layer = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if source.arch == "llama" else gguf.MODEL_ARCH.GPT2,
                                     n_layer)
    fix = _llama_tensor if source.arch == "llama" else _gpt2_tensor
    out = {}
    for hf_name, t in source.tensors.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings", source.arch == "gpt2"):
            continue  # tied: llama.cpp uses token_embd for the output
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers older checkpoints carry: the causal mask and RoPE tables
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PersonaError(f"cannot export tensor {hf_name}: llama.cpp's {source.arch} has no such tensor")
        out[name] = fix(hf_name, t.detach().float().cpu(), cfg).contiguous().numpy()
    return out


def _encode(name: str, data: np.ndarray, quant: str):
    """(data, GGML type): the convert script's choice of type for one tensor."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or name == "position_embd.weight":
        return data.astype(np.float32), T.F32
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    return data.astype(np.float16), T.F16


# ----------------------------------------------------------------------------------------------- metadata

def _hparams(writer, source: Source) -> None:
    """The architecture keys llama.cpp reads for llama / gpt2 (names as the convert script writes them)."""
    cfg = source.config
    if source.arch == "llama":
        scaling = cfg.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise PersonaError(f"cannot export RoPE scaling {scaling} as GGUF (not translated)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise PersonaError(f"cannot export hidden_act={cfg['hidden_act']}: llama.cpp's llama uses SiLU")
        heads, E = cfg["num_attention_heads"], cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or E // heads
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_embedding_length(E)
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
        writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
        writer.add_rope_freq_base(float(theta))
        writer.add_rope_dimension_count(head_dim)
        if head_dim * heads != E:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    else:
        E = cfg["n_embd"]
        writer.add_context_length(cfg["n_positions"])
        writer.add_embedding_length(E)
        writer.add_block_count(cfg["n_layer"])
        writer.add_feed_forward_length(cfg.get("n_inner") or 4 * E)
        writer.add_head_count(cfg["n_head"])
        writer.add_head_count_kv(cfg["n_head"])
        writer.add_layer_norm_eps(cfg.get("layer_norm_epsilon", 1e-5))


def _token_ids(vocab: dict) -> dict[str, int]:
    ids = dict(vocab["model"].get("vocab") or {})
    ids.update({t["content"]: t["id"] for t in vocab.get("added_tokens", [])})
    return ids


def _check_tokenizer(vocab: dict) -> None:
    model, pre = vocab.get("model") or {}, vocab.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not model.get("merges"):
        raise PersonaError("cannot export this tokenizer as GGUF: llama.cpp reproduces byte-level BPE with GPT-2's "
                           f"pre-tokenizer exactly, and this one is {model.get('type')} with a {pre.get('type')} "
                           "pre-tokenizer (tokenizer.kind: char?); train with tokenizer.kind: bpe")
    if not pre.get("use_regex", True) or vocab.get("normalizer"):
        raise PersonaError("cannot export this tokenizer as GGUF: its pre-tokenizer or normalizer is not GPT-2's, "
                           "which is the only one translated")


def tokenizer_metadata(writer, source: Source, n_vocab: int) -> None:
    """tokenizer.ggml.*: tokens in id order (gaps padded as UNUSED, as convert does), types, merges, specials."""
    import gguf

    vocab = source.tokenizer
    _check_tokenizer(vocab)
    ids = _token_ids(vocab)
    added = {t["id"]: t for t in vocab.get("added_tokens", [])}
    n = max(n_vocab, max(ids.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in ids.items():
        tokens[i] = text
        types[i] = (gguf.TokenType.NORMAL if i not in added else
                    gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for text, add in ((source.eos, writer.add_eos_token_id), (source.pad, writer.add_pad_token_id),
                      (source.bos, writer.add_bos_token_id)):
        if text in ids:
            add(ids[text])
    if source.eos in ids and source.eos in source.stops:
        writer.add_eot_token_id(ids[source.eos])  # end of a turn: llama.cpp stops generating there
    writer.add_add_bos_token(source.add_bos)
    writer.add_add_eos_token(False)
    if source.chat_template:
        writer.add_chat_template(source.chat_template)


def write_gguf(source: Source, path: Path, quant: str = "f16") -> None:
    """The GGUF file itself: header and metadata, then the tensors (gguf.GGUFWriter's three steps)."""
    import gguf

    tensors = gguf_tensors(source)
    writer = gguf.GGUFWriter(str(path), source.arch)
    writer.add_name(source.name or "persona-lm")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, source)
    n_vocab = tensors["token_embd.weight"].shape[0]
    writer.add_vocab_size(n_vocab)
    tokenizer_metadata(writer, source, n_vocab)
    for name, data in tensors.items():
        data, qtype = _encode(name, data, quant)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------------------------- Modelfile

def _context_length(source: Source) -> int:
    return source.config.get("max_position_embeddings") or source.config["n_positions"]


def ollama_modelfile(source: Source, gguf_name: str) -> str:
    """Ollama's Modelfile: our template in Go syntax (a base's own template is left to Ollama, which picks one
    from the GGUF's chat template), every end/role marker as a stop, the persona's system prompt, and a context
    no longer than the model's (learned positions end there)."""
    lines = [MODELFILE_HEADER, f"FROM ./{gguf_name}"]
    if source.ours:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATE}"""')
    if source.system_prompt:
        if '"""' in source.system_prompt:
            raise PersonaError('the system prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{source.system_prompt}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in source.stops]
    lines.append(f"PARAMETER num_ctx {_context_length(source)}")
    return "\n".join(lines) + "\n"
