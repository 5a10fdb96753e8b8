"""Inference dtypes for chat, serve and the decode bench: fp32 (default), bf16, or int8 weights.

int8 is weight-only: every linear layer of the transformer blocks and the output projection keeps its weight as
int8 with one symmetric scale per output channel (row), w ~ scale * q, q in [-127, 127], scale = max|row| / 127,
so the rounding error of each weight is at most scale / 2. The matrix product is PyTorch's own int8 weight
kernel, `aten._weight_int8pack_mm(x, q (N, K), scales (N,))`, which reads the int8 weights as they are (a
quarter of fp32's bytes, half of bf16's). Embeddings, norms, attention and the KV cache are untouched; a tied
output projection gets its own int8 copy and the embedding table stays as it was. A mixture of experts' router
(model.MoE) stays in full precision, as llama.cpp keeps its expert gate: it is tiny, and rounding its scores
could send a token to other experts.

Activations stay in the model's dtype (fp32): only the kernel runs in bf16 (its input is cast to bf16 and its
output back), because on CPU the kernel's float32 variant is ten times slower than its bf16 one. Measured on one
AVX2 core, a (1, 384) x (384, 1152) product takes 470 us with float32 activations, 43 us with bf16 ones, 47 us as
a plain fp32 matmul; the 8192-row output projection 280 us against 2,090 us in fp32. For a whole decode step of
the 13.9M config, fp32 activations and a bf16 model with int8 weights decode equally fast (137 and 129 tokens/s
best of 8, 112 and 113 median), and fp32 keeps the rest of the model (norms, attention, KV cache) at full
precision.

torchao (not a dependency) would not be faster here: its int8 weight-only linear on CPU converts the whole int8
weight to the activations' dtype on every call before a plain matmul (4x slower than this kernel at batch 1).

Quantized layers cannot be trained, so LoRA (weight memory, peft adapters) does not attach to them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from persona_lm.errors import PersonaError

DTYPES = ("fp32", "bf16", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)): symmetric per-row int8, w ~ q * scale[:, None]. An all-zero row gets
    scale 1 (any scale reproduces it exactly)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias with int8 q (out_features, in_features) as buffers, not parameters: model.linear
    then calls forward(), as it does for a peft layer. `compute` is the dtype the kernel runs in (see the module
    docstring); the output comes back in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype = torch.bfloat16):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.out_features, self.in_features = q.shape
        self.compute = compute
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(compute))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, m: nn.Linear, compute: torch.dtype = torch.bfloat16) -> "Int8Linear":
        return cls(m.weight, m.bias, compute)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, float32 (out_features, in_features)."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.compute).contiguous(),
                                               self.qweight, self.scale)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, {self.compute} kernel"


def _replace(parent: nn.Module, name: str, compute: torch.dtype) -> None:
    parent._modules[name] = Int8Linear.from_linear(parent._modules[name], compute)


def quantize_int8(model: nn.Module, compute: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace, in place, every nn.Linear of the transformer blocks and the output projection with Int8Linear;
    returns the model. Ours (model.GPT): blocks.* but a MoE router, and lm_head (the emotion head, 9 rows, stays
    as it is). A base model (base.BaseLM): the transformers model's nn.Linear layers and its output embeddings. Refuses
    (PersonaError) a model with LoRA layers attached and a GPT-2-style base, whose layers are Conv1D."""
    if any(type(m).__name__.startswith("Lora") or "lora_A" in m._modules for m in model.modules()):
        raise PersonaError("--dtype int8: this model has LoRA adapters attached; int8 needs them merged or removed")
    hf = getattr(model, "hf", None)
    if hf is None:
        for block in model.blocks:
            for parent in list(block.modules()):
                for name, child in list(parent._modules.items()):
                    if type(child) is nn.Linear and name != "router":
                        _replace(parent, name, compute)
        # a separate module even when tied: the embedding table keeps its fp32 rows
        model.lm_head = Int8Linear.from_linear(model.lm_head, compute)
        return model
    if any(type(m).__name__ == "Conv1D" for m in hf.modules()):
        raise PersonaError("--dtype int8 needs nn.Linear layers; this base model (GPT-2 style) uses Conv1D: "
                           "use --dtype fp32 or bf16")
    head = hf.get_output_embeddings()
    for parent in list(hf.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Linear and child is not head:
                _replace(parent, name, compute)
    hf.set_output_embeddings(Int8Linear.from_linear(head, compute))
    return model


def to_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """The loaded model, in place, in one of DTYPES: fp32 unchanged, bf16 all weights cast, int8 quantize_int8."""
    if dtype not in DTYPES:
        raise PersonaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16":
        return model.to(torch.bfloat16)
    if dtype == "int8":
        if next(model.parameters()).device.type != "cpu":
            raise PersonaError("--dtype int8 runs on the CPU only (PyTorch's int8 weight kernel); use bf16 on a GPU")
        return quantize_int8(model)
    return model


def load(model_dir: str | Path, dtype: str = "fp32", device: str | None = None):
    """(model, tokenizer, config) of a model folder for inference in `dtype`: the one loading point of chat and
    serve. `device` None = cuda when available (int8: always the CPU)."""
    from persona_lm.train.checkpoint import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() and dtype != "int8" else "cpu"
    model, tok, config = load_model(Path(model_dir), device=device)
    return to_dtype(model, dtype).eval(), tok, config
