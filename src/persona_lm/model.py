"""The one model: a decoder-only transformer whose every architectural choice comes from params `model.*`.

GPT-2 family = learned positions + LayerNorm + GELU MLP; Llama family = RoPE + RMSNorm + SwiGLU, with
grouped-query attention (n_kv_head < n_head) available to both. On top of the language model sit two small
additions: a learned persona embedding added to every input position (one model can hold several personas),
and an emotion head that classifies a reply from the hidden state that predicts its end-of-turn marker: in a
causal model that position has read the whole reply, and during generation it is computed anyway.

Memory attention (`memory_layers`, off when empty) follows the Compressive Transformer (Rae et al. 2019,
"Compressive Transformers for Long-Range Sequence Modelling"): when a conversation outgrows the window, the
keys and values of the tokens that leave it are mean-pooled over `memory_compression` consecutive positions
(the paper's simplest compression function, no parameters) into up to `memory_slots` slots per memory layer,
oldest dropped first, and those layers attend to [memory ; window]: memory fully visible (it is all in the
past), the window causal. Memory keys are pooled before RoPE and get no rotation (they sit at the window's
first position); with learned positions they keep the embedding of the position they had, so a head that
finds its key by position would find a memory slot from that position too. Each memory layer therefore adds a
learned bias per head to its memory logits (`memory_bias`, starting at MEMORY_BIAS: memory barely seen, as
ALiBi's distance penalty sees far tokens (Press et al. 2022)), which training raises where memory pays off.
Training carries memory across windows without gradient through it, as Transformer-XL does (Dai et al. 2019).

Differential attention (`attention: differential`, DiffAttention) follows Ye et al. 2024, "Differential
Transformer" (ICLR 2025): each head splits its query and key in two halves, computes two softmax maps and
attends with their difference, which cancels the attention noise both maps share. Mixture of experts (`mlp: moe`,
MoE) replaces each block's MLP by `n_experts` SwiGLU experts of which a router picks `top_k` per token, as
Mixtral does (Jiang et al. 2024), trained with the Switch Transformer's load-balancing loss (Fedus et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0           # 0 = n_head (plain multi-head); fewer = grouped-query attention
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    norm: str = "layernorm"      # layernorm | rmsnorm
    mlp: str = "gelu"            # gelu | swiglu
    mlp_hidden: int = 0          # 0 = the family default: 4 * n_embd (gelu), ~8/3 * n_embd (swiglu)
    pos: str = "learned"         # learned | rope
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    n_personas: int = 1
    n_emotions: int = 0
    memory_layers: tuple[int, ...] = ()  # layers that attend to compressed memory; empty = no memory attention
    memory_compression: int = 4          # consecutive tokens mean-pooled into one memory slot
    memory_slots: int = 128              # memory slots per memory layer, oldest dropped first
    attention: str = "standard"          # standard | differential (DiffAttention)
    n_experts: int = 8                   # mlp: moe: SwiGLU experts per block
    top_k: int = 2                       # mlp: moe: experts each token goes to
    router_aux_loss_coef: float = 0.01   # mlp: moe: weight of the load-balancing loss in training (train.loop)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.memory_layers = tuple(self.memory_layers)
        assert all(0 <= i < self.n_layer for i in self.memory_layers), "memory_layers must be in 0..n_layer-1"
        assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"
        assert self.n_head % self.n_kv_head == 0, "n_head must be divisible by n_kv_head"
        assert self.attention == "standard" or self.head_dim % 2 == 0, "differential attention needs an even head size"
        assert self.pos != "rope" or self.qk_dim % 2 == 0, "rope needs an even query/key size"
        assert not (self.attention == "differential" and self.memory_layers), "no memory attention with differential"
        assert self.mlp != "moe" or 1 <= self.top_k <= self.n_experts, "top_k must be in 1..n_experts"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def qk_dim(self) -> int:
        """Size of one query/key that a softmax map scores: half a head with differential attention."""
        return self.head_dim // 2 if self.attention == "differential" else self.head_dim

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)  # SwiGLU (and each MoE expert): 2/3 of 4x keeps the count

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-5)
    return nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)


# The forward pass calls the functional ops on the modules' parameters instead of calling the modules. The
# modules keep the parameter names (checkpoints, export); decoding one token at a time, where each of ~100
# ops per step costs more in overhead than in arithmetic, skips nn.Module's call machinery and its attribute
# fallback (parameters are read from `_parameters`: `m.weight` costs a Python-level __getattr__ each time).
# Together with (B*T, n_embd) activations between the blocks, so that every linear layer is one plain matrix
# product, this makes a 13.9M-parameter decode step about 10% faster on 2 CPU cores.

def norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = m._parameters
    if isinstance(m, nn.RMSNorm):
        return torch.rms_norm(x, m.normalized_shape, p["weight"], m.eps)
    return torch.layer_norm(x, m.normalized_shape, p["weight"], p["bias"], m.eps)


def linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    p = m._parameters
    w = p.get("weight")
    if w is None:  # a LoRA layer (peft) wrapping the original: it adds its low-rank update
        return m(x)
    # x @ W.t() dispatches straight to mm; F.linear takes a slower route to it when there is no bias
    return x @ w.t() if p["bias"] is None else F.linear(x, w, p["bias"])


MEMORY_BIAS = -4.0  # initial memory logit bias: exp(-4) ~ 1/55 of the weight of an equal-scoring window key


def window_stride(block_size: int) -> int:
    """Tokens that leave a full window when the next one arrives: the decoder then keeps the newest
    block_size // 2 and re-prefills them (generate.Decoder), so block_size + 1 - block_size // 2 leave. Training
    on long dialogues cuts them into windows this far apart, so memory holds what it holds in generation."""
    return block_size + 1 - max(1, block_size // 2)


def compress(kv: torch.Tensor, rate: int) -> torch.Tensor:
    """Mean over each `rate` consecutive positions, oldest first: (B, C, L, D) -> (B, C, ceil(L / rate), D);
    the newest group may be shorter and is averaged over its own length."""
    B, C, L, D = kv.shape
    n = -(-L // rate)
    short = n * rate - L
    sums = F.pad(kv, (0, 0, 0, short)).view(B, C, n, rate, D).sum(3)
    counts = torch.full((n, 1), float(rate), device=kv.device, dtype=kv.dtype)
    counts[-1] = rate - short
    return sums / counts


def memory_mask(bias: torch.Tensor, n_slots: int, window: torch.Tensor | None, T: int, S: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (1 or B, n_head, T, n_slots + S) over [memory ; window of S keys]: `bias` (n_head,)
    on every memory slot, 0 where `window` (bool, (T, S) or (B, 1, T, S); None = all) allows, -inf elsewhere."""
    if window is None:
        window = torch.zeros(1, 1, T, S, dtype=dtype, device=bias.device)
    else:
        window = torch.zeros(window.shape, dtype=dtype, device=bias.device).masked_fill(~window, float("-inf"))
        window = window.view(-1, 1, T, S) if window.dim() == 2 else window
    heads = bias.to(dtype).view(1, -1, 1, 1)
    mem = heads.expand(window.shape[0], -1, T, n_slots)
    return torch.cat([mem, window.expand(-1, heads.shape[1], -1, -1)], dim=-1)


def remember(slots: torch.Tensor | None, leaving: torch.Tensor, rate: int, n_slots: int) -> torch.Tensor:
    """Memory slots after `leaving` (B, C, L, D) keys/values left the window: compressed, appended, and the
    oldest slots dropped beyond `n_slots` (first in, first out)."""
    new = compress(leaving, rate)
    if slots is not None:
        new = torch.cat([slots, new], dim=2)
    return new[:, :, -n_slots:]


class Memory:
    """Compressed memory of one batch for the uncached forward (training, the reference decode): the memory
    layers record their window's keys (before RoPE) and values as they run; `push(n)` compresses the oldest n
    positions of the last window into slots, which the next window's forward attends to. Recorded keys and
    values are detached: no gradient flows into an earlier window (Transformer-XL's stop-gradient)."""

    def __init__(self, cfg: GPTConfig):
        self.layers = frozenset(cfg.memory_layers)
        self.rate, self.n_slots = cfg.memory_compression, cfg.memory_slots
        self.slots: dict[int, torch.Tensor] = {}
        self.window: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, fresh: torch.Tensor, kv: torch.Tensor, mask, bias: torch.Tensor):
        """Record the window's `fresh` keys/values; return (keys/values to attend to, mask): [memory ; kv], memory
        visible to every query with the layer's `bias` (n_head,), `mask` (or the causal rule) over the window."""
        if layer not in self.layers:
            return kv, mask
        self.window[layer] = fresh.detach()
        slots = self.slots.get(layer)
        if slots is None:
            return kv, mask
        T = kv.shape[2]
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=kv.device).tril()
        mask = memory_mask(bias, slots.shape[2], mask, T, T, kv.dtype)
        return torch.cat([slots.to(kv.dtype), kv], dim=2), mask

    def push(self, n: int) -> None:
        for layer, kv in self.window.items():
            self.slots[layer] = remember(self.slots.get(layer), kv[:, :, :n], self.rate, self.n_slots)


def rope_tables(cfg: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (length, qk_dim) in the rotate-half layout that Hugging Face's Llama uses."""
    dim = cfg.qk_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def extend(cache, layer: int, kv: torch.Tensor, T: int, mask):
    """(keys+values to attend to, mask, causal) for a chunk of T new positions whose keys and values are `kv`:
    without a cache the chunk alone, causal unless `mask` says otherwise; with one the cached past too, visible in
    full (a one-token step needs no mask; a longer chunk on a filled cache is causal within itself)."""
    causal = mask is None
    if cache is not None:
        kv = cache.append(layer, kv)
        start = kv.shape[2] - T  # memory slots held in front of the window count as past
        if start > 0:
            causal = False
            if T > 1 and mask is None:  # a new chunk on a filled cache: causal within it, full over the past
                mask = torch.ones(T, kv.shape[2], dtype=torch.bool, device=kv.device).tril(diagonal=start)
    return kv, mask, causal


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv = cfg.n_kv_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if layer in cfg.memory_layers:
            self.add_memory()

    def add_memory(self) -> None:
        """The learned per-head bias on memory logits (see the module docstring)."""
        if "memory_bias" not in self._parameters:
            self.memory_bias = nn.Parameter(torch.full((self.cfg.n_head,), MEMORY_BIAS))

    def forward(self, x, B: int, T: int, rope=None, cache=None, mask=None, memory=None):
        """x: (B*T, n_embd) -> (B*T, n_embd), before the residual add. `mask` (B, 1, T, keys) bool, when given,
        replaces the causal rule (a left-padded batch, see GPT.hidden). `memory` (Memory, or the MemoryKVCache
        that is `cache`): attend to it too."""
        cfg = self.cfg
        # one view for all heads, then split: q and the keys+values as (B, heads, T, head_dim); the keys and
        # values stay one tensor so that the cache stores them with a single copy
        qkv = linear(self.c_attn, x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        # split_with_sizes, not slicing: its backward is one concatenation, where each slice's backward
        # zero-fills a full-size gradient (4% of a small model's training step); and not Tensor.split, which
        # is a Python-level wrapper around it
        q, kv = qkv.split_with_sizes([cfg.n_head, 2 * cfg.n_kv_head], 1)
        fresh = kv  # before RoPE: what memory compresses
        if rope is not None:
            k, v = kv.split_with_sizes([cfg.n_kv_head, cfg.n_kv_head], 1)
            q, kv = apply_rope(q, *rope), torch.cat([apply_rope(k, *rope), v], dim=1)
        kv, mask, causal = extend(cache, self.layer, kv, T, mask)
        if memory is not None:
            kv, mask = memory.attend(self.layer, fresh, kv, mask, self._parameters.get("memory_bias"))
        k, v = kv.split_with_sizes([cfg.n_kv_head, cfg.n_kv_head], 1)
        # enable_gqa shares each k/v head with n_head/n_kv_head query heads without copying k and v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           dropout_p=cfg.dropout if self.training else 0.0,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)
        return linear(self.c_proj, y.transpose(1, 2).reshape(B * T, cfg.n_embd))


def lambda_init(layer: int) -> float:
    """Differential attention's λ_init = 0.8 - 0.6 exp(-0.3 (l - 1)) at the 1-based layer l = layer + 1."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class DiffAttention(Attention):
    """Differential attention (Ye et al. 2024, "Differential Transformer", arXiv 2410.05258, section 2.1). Each
    head splits its query and key into halves [q1 ; q2], [k1 ; k2] of qk_dim = head_dim / 2 and attends with
    the difference of two softmax maps, which cancels the attention noise both share:

        (softmax(q1 k1ᵀ / √qk_dim) - λ softmax(q2 k2ᵀ / √qk_dim)) V,     V of the full head_dim,
        λ = exp(λq1 · λk1) - exp(λq2 · λk2) + λ_init,

    one learned λ per layer, reparameterised by four vectors of qk_dim (initialised N(0, 0.1) as in the paper's
    code). Each head's output is then RMS-normalised (the paper's GroupNorm; one weight shared by the heads) and
    scaled by (1 - λ_init). The projections keep the standard shapes (the paper's h = d_model / 2d heads), so the
    KV cache, grouped-query attention and padded batches work as they do for Attention; RoPE rotates each half
    on its own (rope_tables are qk_dim wide).

    Both maps come from one scaled_dot_product_attention call over 2 * n_head query heads against the keys as
    they are: query 2h is [q1, 0] and query 2h + 1 is [0, q2], whose dot products with [k1 ; k2] are q1·k1 and
    q2·k2 (the pair stays in head h's group of query heads, so grouped-query attention maps it to head h's key).
    The zeros double the query-key arithmetic, but query, key and value stay one size, which PyTorch's fused CPU
    kernel needs (two calls with half-size keys fall back to the unfused one, 3x slower in a decode step's
    attention), and the cached keys need no copy."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__(cfg, layer)
        d = cfg.qk_dim
        self.lambda_init = lambda_init(layer)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(d) * 0.1) for _ in range(4))
        self.subln = nn.RMSNorm(cfg.head_dim, eps=1e-5)
        # True where query 2h (first row) and query 2h + 1 (second row) hold zeros: [q1, 0] and [0, q2]
        hide = torch.zeros(2, 1, cfg.head_dim, dtype=torch.bool)
        hide[0, :, d:], hide[1, :, :d] = True, True
        self.register_buffer("hide", hide, persistent=False)

    def forward(self, x, B: int, T: int, rope=None, cache=None, mask=None, memory=None):
        """As Attention.forward. `memory` holds nothing for this layer: GPTConfig refuses memory attention here."""
        cfg, d = self.cfg, self.cfg.qk_dim
        qkv = linear(self.c_attn, x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, kv = qkv.split_with_sizes([cfg.n_head, 2 * cfg.n_kv_head], 1)
        if rope is not None:  # (..., T, qk_dim) tables, applied to both halves of each head
            cos, sin = rope[0].unsqueeze(-2), rope[1].unsqueeze(-2)
            k, v = kv.split_with_sizes([cfg.n_kv_head, cfg.n_kv_head], 1)
            q = apply_rope(q.unflatten(-1, (2, d)), cos, sin).flatten(-2)
            kv = torch.cat([apply_rope(k.unflatten(-1, (2, d)), cos, sin).flatten(-2), v], dim=1)
        kv, mask, causal = extend(cache, self.layer, kv, T, mask)
        k, v = kv.split_with_sizes([cfg.n_kv_head, cfg.n_kv_head], 1)
        q = torch.where(self.hide, 0.0, q.unsqueeze(2)).flatten(1, 2)  # (B, 2 * n_head, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           dropout_p=cfg.dropout if self.training else 0.0, enable_gqa=True,
                                           scale=d ** -0.5)
        y = y.unflatten(1, (cfg.n_head, 2))
        p = self._parameters
        lam = (torch.exp(torch.dot(p["lambda_q1"], p["lambda_k1"]))
               - torch.exp(torch.dot(p["lambda_q2"], p["lambda_k2"])) + self.lambda_init)
        y = y[:, :, 0] - lam * y[:, :, 1]
        y = torch.rms_norm(y, (cfg.head_dim,), self.subln._parameters["weight"].to(y.dtype), 1e-5)  # bf16 autocast
        y = y * (1 - self.lambda_init)
        return linear(self.c_proj, y.transpose(1, 2).reshape(B * T, cfg.n_embd))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp != "gelu"  # swiglu, and each expert of moe
        hidden = cfg.hidden_dim
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = linear(self.c_fc, x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)  # exact (erf) GELU: on CPU it is faster than the tanh form in fwd + bwd
        return linear(self.c_proj, h)


class MoE(nn.Module):
    """A top-k routed mixture of SwiGLU experts in place of the MLP (Shazeer et al. 2017, "Outrageously Large Neural
    Networks"; Mixtral's layout, Jiang et al. 2024): a router scores the n_experts for each token, the token goes
    to its top_k, and its output is theirs weighted by the router's softmax renormalised over those k. Dropless (no
    expert capacity): a token's output never depends on the other tokens, so a cached decode, a left-padded
    batch and the full forward compute the same thing.

    In training each forward appends its load-balancing loss to `losses` (GPT.forward collects them): the
    Switch Transformer's aux = n_experts · Σ_i f_i · P_i (Fedus et al. 2022, eq. 4), f_i the share of the tokens'
    top_k choices that went to expert i, P_i the router's mean probability for expert i. It is 1 when the load is
    uniform and n_experts / top_k when all tokens pick the same experts; f is a count (no gradient), so the loss
    lowers the probability of the experts that get too many tokens."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.losses: list[torch.Tensor] = []

    def forward(self, x):
        """x: (N, n_embd) -> (N, n_embd). The N * top_k (token, expert) choices are sorted by expert, so that each
        expert runs once, over the rows gathered for it; weighted, its outputs are added back to their tokens."""
        probs = linear(self.router, x).float().softmax(-1)  # (N, n_experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)     # (N, top_k)
        weights = weights / weights.sum(-1, keepdim=True)
        chosen = chosen.flatten()
        counts = torch.bincount(chosen, minlength=len(self.experts))
        if self.training:
            self.losses.append(len(self.experts) * (counts / chosen.numel() * probs.mean(0)).sum())
        order = chosen.argsort(stable=True)
        token = order // self.top_k  # the token of each choice, grouped by expert
        rows = x[token]
        out, start = [], 0
        for expert, n in zip(self.experts, counts.tolist()):
            if n:
                out.append(expert.forward(rows[start:start + n]))
                start += n
        out = torch.cat(out)
        out = out * weights.flatten()[order, None].to(out.dtype)
        return out.new_zeros(x.shape).index_add(0, token, out)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.dropout = cfg.dropout
        self.ln_1 = make_norm(cfg)
        self.attn = (DiffAttention if cfg.attention == "differential" else Attention)(cfg, layer)
        self.ln_2, self.mlp = make_norm(cfg), MoE(cfg) if cfg.mlp == "moe" else MLP(cfg)

    def forward(self, x, B: int, T: int, rope=None, cache=None, mask=None, memory=None):
        a = self.attn.forward(norm(self.ln_1, x), B, T, rope, cache, mask, memory)
        if self.dropout and self.training:
            a = F.dropout(a, self.dropout)
        x = x + a
        m = self.mlp.forward(norm(self.ln_2, x))
        if self.dropout and self.training:
            m = F.dropout(m, self.dropout)
        return x + m


def padded_positions(start: int, T: int, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For T new tokens after `start` cached ones in rows left-padded by `pad` (B,): positions (B, T) counted
    from each row's first real token, and the attention mask (B, 1, T, start + T): causal, never onto padding.
    A padding query sees itself, so that no softmax row is empty (an empty one is NaN, which would spread)."""
    q = torch.arange(start, start + T, device=pad.device)
    k = torch.arange(start + T, device=pad.device)
    mask = (k <= q[:, None]) & (k >= pad[:, None, None])
    mask |= k == q[:, None]
    return (q - pad[:, None]).clamp(min=0), mask.unsqueeze(1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.persona = nn.Embedding(cfg.n_personas, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # Tying input and output embeddings saves vocab*n_embd parameters and helps small models.
            self.lm_head.weight = self.wte.weight
        self.emotion_head = nn.Linear(cfg.n_embd, cfg.n_emotions) if cfg.n_emotions else None
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False
        self.aux_loss: torch.Tensor | None = None  # mlp: moe, training: the last forward's load-balancing loss
        # GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2*n_layer) so the
        # residual stream's variance does not grow with depth; the persona embedding starts at zero so a
        # single-persona model is exactly a plain LM.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        nn.init.zeros_(self.persona.weight)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def set_memory(self, memory_layers: tuple[int, ...], memory_compression: int, memory_slots: int) -> None:
        """Turn memory attention on (or off: no layers) for a built model, e.g. phase 3 on a model trained without
        it: layers that gain memory get a fresh memory bias (MEMORY_BIAS), those that keep it keep theirs, those
        that lose it lose it (a saved model holds exactly the weights its config builds)."""
        if memory_layers and self.cfg.attention != "standard":
            raise ValueError("memory attention needs model.attention: standard")
        self.cfg.memory_layers = tuple(memory_layers)
        self.cfg.memory_compression, self.cfg.memory_slots = memory_compression, memory_slots
        for i, block in enumerate(self.blocks):
            if i in self.cfg.memory_layers:
                block.attn.add_memory()
            else:
                block.attn._parameters.pop("memory_bias", None)

    def new_cache(self, batch_size: int = 1, device=None, dtype=torch.float32):
        """An empty KV cache for `generate` (see generate.KVCache); with memory attention one that also holds
        the memory slots (generate.MemoryKVCache)."""
        from persona_lm.generate import KVCache, MemoryKVCache

        if self.cfg.memory_layers:
            rope = (self.rope_cos, self.rope_sin) if self.cfg.pos == "rope" else None
            return MemoryKVCache(self.cfg, batch_size, device, dtype, rope)
        return KVCache(self.cfg, batch_size, device, dtype)

    def hidden(self, idx: torch.Tensor, persona: torch.Tensor | None = None, cache=None,
               pad: torch.Tensor | None = None, memory: Memory | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, n_embd). `cache` (see generate.KVCache) enables decoding;
        `memory` makes the memory layers attend to it: a Memory (uncached; the layers record this window for
        `memory.push`), or the cache itself when that is a generate.MemoryKVCache.

        `pad` (B,) long: rows of a batch left-padded to one length hold that many padding tokens first. Each
        row's positions then count from its first real token and no position attends to padding, so a row
        computes what it would alone (generate.generate_batch).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        x = F.embedding(idx, self.wte.weight)
        pos, mask = None, None
        if pad is not None:
            pos, mask = padded_positions(start, T, pad)
        if self.wpe is not None:
            # the same rows as wpe(arange), without building the index
            x = x + (self.wpe.weight[start:start + T] if pos is None else self.wpe.weight[pos])
        if persona is None:  # persona 0 by default, so the embedding is always part of the graph
            x = x + self.persona.weight[0]
        else:
            x = x + F.embedding(persona, self.persona.weight).unsqueeze(1)
        if self.cfg.dropout and self.training:
            x = F.dropout(x, self.cfg.dropout)
        x = x.reshape(B * T, -1)
        rope = None
        if self.cfg.pos == "rope":
            rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
            if pos is not None:
                rope = (self.rope_cos[pos].unsqueeze(1).to(x.dtype), self.rope_sin[pos].unsqueeze(1).to(x.dtype))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, B, T, rope, None, mask, memory, use_reentrant=False)
            else:
                x = block.forward(x, B, T, rope, cache, mask, memory)
        if cache is not None:
            cache.advance(T)
        return norm(self.ln_f, x).view(B, T, -1)

    def forward(self, idx, persona=None, cache=None, emotion_index=None):
        """Next-token logits for every position, and emotion logits at `emotion_index` (B,) when given.

        `idx` (B, K, block_size): K consecutive windows of long sequences, logits of each position once (see
        `windows`).
        Losses are computed by the caller (train.loop), which knows how to normalise them across
        micro-batches; going through forward() keeps DDP's gradient hooks in the path. With `mlp: moe` a training
        forward leaves the routers' load-balancing loss in `aux_loss` (summed over the layers, averaged over the
        windows of a 3-D idx; see MoE) for the caller to add; otherwise `aux_loss` is None.
        """
        if self.cfg.mlp != "moe":
            return self._forward(idx, persona, cache, emotion_index)
        layers = [block.mlp for block in self.blocks]
        for m in layers:
            m.losses.clear()
        out = self._forward(idx, persona, cache, emotion_index)
        self.aux_loss = sum(torch.stack(m.losses).mean() for m in layers) if self.training else None
        return out

    def _forward(self, idx, persona, cache, emotion_index):
        if idx.dim() == 3:
            return self.windows(idx, persona), None
        h = self.hidden(idx, persona, cache)
        logits = linear(self.lm_head, h)
        if emotion_index is None:
            return logits, None
        if self.emotion_head is None:
            raise ValueError("this model has no emotion head (n_emotions = 0)")
        return logits, self.emotion_head(h[torch.arange(h.shape[0], device=h.device), emotion_index])

    def windows(self, idx: torch.Tensor, persona: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, vocab) of the L = (K - 1) * stride + block_size positions that K windows (B, K, block_size)
        cover, window k starting stride = window_stride(block_size) tokens after window k-1, read in order with the
        oldest stride tokens of each compressed into memory before the next, as generate.Decoder re-windows. Each
        position's logits come from the first window that predicts it: window 0 all, then each window its last
        stride positions (the others it holds again as context)."""
        block, stride = self.cfg.block_size, window_stride(self.cfg.block_size)
        memory = Memory(self.cfg)
        out = []
        for k in range(idx.shape[1]):
            if k:
                memory.push(stride)
            h = self.hidden(idx[:, k], persona, memory=memory)
            out.append(linear(self.lm_head, h if k == 0 else h[:, block - stride:]))
        return torch.cat(out, dim=1)

    def param_counts(self) -> dict[str, int]:
        """Parameters per component (tied weights counted once), for the metrics: a mixture of experts' router and
        experts count as mlp, differential attention's λ vectors and head norm as attention."""
        groups = {"embedding": 0, "position": 0, "persona": 0, "attention": 0, "mlp": 0, "norm": 0,
                  "lm_head": 0, "emotion_head": 0}
        for name, p in self.named_parameters():  # named_parameters() yields a tied tensor once
            n = p.numel()
            if name.startswith("wte"):
                groups["embedding"] += n
            elif name.startswith("wpe"):
                groups["position"] += n
            elif name.startswith("persona"):
                groups["persona"] += n
            elif ".attn." in name:
                groups["attention"] += n
            elif ".mlp." in name:
                groups["mlp"] += n
            elif name.startswith("lm_head"):
                groups["lm_head"] += n
            elif name.startswith("emotion_head"):
                groups["emotion_head"] += n
            else:
                groups["norm"] += n
        groups["total"] = sum(groups.values())
        return groups
