"""Differential attention and the mixture of experts, in every family: causal, cached decode and padded batches
equal to the full forward, the paper formulas, exact parameter counts, training (the load-balancing loss
included), params validation, int8, LoRA, the config round trip, and refusal by every export format."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from persona_lm import lora
from persona_lm.errors import ParamsError, PersonaError
from persona_lm.generate import Batch, Decoder
from persona_lm.model import GPT, MLP, DiffAttention, GPTConfig, MoE, apply_rope, lambda_init, rope_tables
from persona_lm.params import parse_params
from persona_lm.train.batches import IGNORE
from persona_lm.train.loop import batch_loss

ARCHS = {
    "differential": dict(attention="differential"),
    "moe": dict(mlp="moe", n_experts=4, top_k=2),
    "both": dict(attention="differential", mlp="moe", n_experts=3, top_k=1),
}
FAMILIES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False),
    "gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
}
CASES = [(a, f) for a in ARCHS for f in FAMILIES]
V, E, H, L = 97, 32, 4, 2  # vocabulary, n_embd, n_head, n_layer of every test model (head_dim 8)


def config(arch: str, family: str, **kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=V, block_size=32, n_layer=L, n_head=H, n_embd=E, n_emotions=3),
                        **FAMILIES[family], **ARCHS[arch], **kw})


def spread(arch: str, family: str, **kw) -> GPT:
    """An eval-mode model whose weights are spread (as a trained model's): greedy choices and expert choices
    are far from ties, so two ways of computing the same thing pick the same tokens and experts."""
    torch.manual_seed(0)
    model = GPT(config(arch, family, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if name.endswith(("router.weight", "wte.weight", "lm_head.weight")) else 0.15)
    return model.eval()


@pytest.mark.parametrize("arch,family", CASES)
def test_causality(arch, family):
    """Changing a future token leaves every earlier position's logits unchanged."""
    model = spread(arch, family)
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % V
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert (a[:, :12] - b[:, :12]).abs().max() < 1e-5
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2


@pytest.mark.parametrize("arch,family", CASES)
def test_cached_decode_equals_the_full_forward(arch, family):
    """A prefill, a multi-token chunk on the filled cache, then one token at a time: the full forward's states."""
    model = spread(arch, family)
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.hidden(x)
        cache = model.new_cache(2)
        parts = [model.hidden(x[:, :7], cache=cache), model.hidden(x[:, 7:12], cache=cache)]
        parts += [model.hidden(x[:, i:i + 1], cache=cache) for i in range(12, 24)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    prompt = x[0, :10].tolist()  # 10 + 40 tokens in a 32-token window: re-windows once
    cached = list(Decoder(model, prompt, max_new_tokens=40, temperature=0))
    assert cached == list(Decoder(model, prompt, max_new_tokens=40, temperature=0, use_cache=False))


@pytest.mark.parametrize("arch,family", CASES)
def test_left_padded_rows_equal_their_solo_rows(arch, family):
    """A left-padded batch (prefill and decode steps) computes for each row what the row computes alone, and the
    server's continuous batching decodes each row's tokens as a lone Decoder does."""
    model = spread(arch, family)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (9, 4, 6)]
    width, steps = 9, torch.randint(0, V, (3, 3), generator=g)
    pad = torch.tensor([width - len(r) for r in rows])
    idx = torch.stack([F.pad(r, (width - len(r), 0)) for r in rows])
    with torch.no_grad():
        cache = model.new_cache(3)
        batched = [model.hidden(idx, cache=cache, pad=pad)] + [model.hidden(steps[:, i:i + 1], cache=cache, pad=pad)
                                                               for i in range(3)]
        batched = torch.cat(batched, 1)
        for b, r in enumerate(rows):
            alone = model.hidden(torch.cat([r, steps[b]])[None])
            assert (batched[b, pad[b]:] - alone[0]).abs().max() < 1e-5
    prompts = [r.tolist() for r in rows]
    alone = [list(Decoder(model, p, max_new_tokens=8, temperature=0)) for p in prompts]
    batch, decoders = Batch(model), [Decoder(model, p, max_new_tokens=8, temperature=0) for p in prompts]
    batch.add(decoders[0])
    batch.add(*decoders[1:])  # a left-padded prefill joining a running row
    got = {id(d): [] for d in decoders}
    for _ in range(8):
        for d, t in batch.sample():
            got[id(d)].append(t)
        batch.step()
    assert [got[id(d)] for d in decoders] == alone


def reference_attention(attn: DiffAttention, x: torch.Tensor, rope: bool) -> torch.Tensor:
    """The paper's equations written out for a causal (1, T) input: explicit maps, each kv head repeated for its
    query group, each half of q and k rotated by RoPE on its own."""
    cfg = attn.cfg
    T, hd, d, K = x.shape[0], cfg.head_dim, cfg.qk_dim, cfg.n_kv_head
    q, k, v = attn.c_attn(x).split([cfg.n_embd, K * hd, K * hd], -1)
    q = q.view(T, H, hd)
    k, v = (t.view(T, K, hd).repeat_interleave(H // K, 1) for t in (k, v))  # kv head j serves query heads j*H/K...
    q1, q2, k1, k2 = q[..., :d], q[..., d:], k[..., :d], k[..., d:]
    if rope:
        cos, sin = (t[:, None] for t in rope_tables(cfg, T))
        q1, q2, k1, k2 = (apply_rope(t, cos, sin) for t in (q1, q2, k1, k2))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    a1 = (torch.einsum("thd,shd->hts", q1, k1) / math.sqrt(d)).masked_fill(future, float("-inf")).softmax(-1)
    a2 = (torch.einsum("thd,shd->hts", q2, k2) / math.sqrt(d)).masked_fill(future, float("-inf")).softmax(-1)
    lam = (torch.exp(attn.lambda_q1 @ attn.lambda_k1) - torch.exp(attn.lambda_q2 @ attn.lambda_k2)
           + 0.8 - 0.6 * math.exp(-0.3 * attn.layer))
    heads = torch.einsum("hts,shd->thd", a1 - lam * a2, v)
    heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.subln.weight
    return attn.c_proj((heads * (1 - attn.lambda_init)).reshape(T, cfg.n_embd))


@pytest.mark.parametrize("family", FAMILIES)
def test_differential_attention_is_the_papers(family):
    model = spread("differential", family)
    x = torch.randn(10, E, generator=torch.Generator().manual_seed(4))
    rope = None
    if model.cfg.pos == "rope":
        rope = (model.rope_cos[:10], model.rope_sin[:10])
    with torch.no_grad():
        for block in model.blocks:
            want = reference_attention(block.attn, x, rope is not None)
            assert (block.attn.forward(x, 1, 10, rope) - want).abs().max() < 1e-5
    assert [round(lambda_init(i), 4) for i in (0, 1, 11)] == [0.2, 0.3555, 0.7779]  # l = 1, 2, 12 in the paper


def test_moe_is_a_routed_sum_of_experts_and_balances():
    torch.manual_seed(5)
    cfg = config("moe", "llama", n_experts=5, top_k=2)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    x = torch.randn(30, E)
    want = torch.zeros_like(x)
    probs = (x @ moe.router.weight.T).softmax(-1)
    for t in range(30):
        top = probs[t].topk(2)
        for w, e in zip(top.values / top.values.sum(), top.indices):
            want[t] += w * moe.experts[int(e)](x[t:t + 1])[0]
    moe.train()
    got = moe(x)
    assert (got - want).abs().max() < 1e-5
    f = torch.zeros(5).index_add_(0, probs.topk(2).indices.flatten(), torch.ones(60)) / 60
    assert torch.allclose(moe.losses[-1], 5 * (f * probs.mean(0)).sum())
    assert all(isinstance(m, MLP) and m.swiglu for m in moe.experts)


@pytest.mark.parametrize("arch,family", CASES)
def test_parameter_counts_by_hand(arch, family):
    cfg = config(arch, family)
    model = GPT(cfg)
    bias = cfg.bias
    K = cfg.n_kv_head
    attention = E * (E + 2 * K * 8) + E * E + bias * (E + 2 * K * 8 + E)  # c_attn (q, k, v) and c_proj
    if cfg.attention == "differential":
        attention += 4 * 4 + 8  # lambda_q1, k1, q2, k2 (qk_dim 4) and the per-head RMSNorm weight (head_dim 8)
    hidden = 96 if cfg.mlp != "gelu" else 4 * E  # 32 * ceil(8 * 32 / 3 / 32) for SwiGLU
    up = 2 * hidden if cfg.mlp != "gelu" else hidden
    mlp = E * up + hidden * E + bias * (up + E)
    if cfg.mlp == "moe":
        mlp = cfg.n_experts * mlp + E * cfg.n_experts  # the experts and the router (no bias)
    norm = (2 * L + 1) * E * (2 if bias and cfg.norm == "layernorm" else 1)
    want = {"embedding": V * E, "position": 32 * E if cfg.pos == "learned" else 0, "persona": E,
            "attention": L * attention, "mlp": L * mlp, "norm": norm,
            "lm_head": 0 if cfg.tie_embeddings else V * E, "emotion_head": 3 * E + 3}
    want["total"] = sum(want.values())
    assert model.param_counts() == want
    assert want["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,family", CASES)
def test_training_lowers_the_loss(arch, family):
    torch.manual_seed(6)
    model = GPT(config(arch, family)).train()
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, V, (4, 16), generator=g)
    batch = {"x": x[:, :-1], "y": x[:, 1:]}
    n = float(batch["y"].numel())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, parts = batch_loss(model, batch, n, 0.0, 1.0)
        losses.append(float(parts["lm"]))
        opt.zero_grad()
        loss.backward()
        if model.cfg.mlp == "moe":
            aux = float(parts["aux"])
            assert math.isfinite(aux) and 0.5 * L < aux < L * model.cfg.n_experts
            assert loss.item() == pytest.approx(losses[-1] + 0.01 * aux, rel=1e-6)
            router = model.blocks[0].mlp.router.weight.grad
            assert router is not None and router.abs().sum() > 0
        else:
            assert "aux" not in parts and model.aux_loss is None
        if model.cfg.attention == "differential":
            assert (model.blocks[0].attn.lambda_q1.grad != 0).all()
        opt.step()
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    _, parts = batch_loss(model, batch, n, 0.0, 1.0)  # evaluation: the LM loss alone
    assert "aux" not in parts and model.aux_loss is None


def test_aux_loss_weighs_micro_batches_as_one_batch_and_survives_checkpointing():
    torch.manual_seed(7)
    model = GPT(config("both", "gqa", n_experts=4, top_k=2, router_aux_loss_coef=0.5)).train()
    x = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(7))
    y = x.roll(-1, 1)
    y[:2, :4] = IGNORE  # micro-batches with different target counts
    n = float((y != IGNORE).sum())
    halves = [{"x": x[i:i + 2], "y": y[i:i + 2]} for i in (0, 2)]
    extra = 0.0
    for half in halves:
        loss, parts = batch_loss(model, half, n, 0.0, 1.0)
        share = float((half["y"] != IGNORE).sum()) / n
        assert (loss - parts["lm"]).item() == pytest.approx(0.5 * share * float(parts["aux"]), rel=1e-5)
        extra += share
    assert extra == pytest.approx(1.0)  # the shares of k micro-batches add up to one batch's weight

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        loss, _ = batch_loss(model, {"x": x, "y": y}, n, 0.0, 1.0)
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_and_bf16_weights_run(arch):
    model = GPT(config(arch, "llama")).train()
    x = torch.randint(0, V, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = batch_loss(model, {"x": x, "y": x}, 20.0, 0.0, 1.0)
    loss.backward()
    assert math.isfinite(loss.item())
    model = model.to(torch.bfloat16).eval()
    assert len(list(Decoder(model, [1, 2, 3], max_new_tokens=4, temperature=0))) == 4


@pytest.mark.parametrize("model,error", [
    ({"mlp": "moe", "n_experts": 4, "top_k": 5}, r"model.top_k: must be in 1..n_experts \(4\) \(got 5\)"),
    ({"mlp": "moe", "top_k": 0}, r"model.top_k: must be >= 1 \(got 0\)"),
    ({"mlp": "moe", "n_experts": 0}, r"model.n_experts: must be >= 1 \(got 0\)"),
    ({"router_aux_loss_coef": -1}, r"model.router_aux_loss_coef: must be >= 0"),
    ({"mlp": "experts"}, r"model.mlp: must be one of 'gelu', 'swiglu' or 'moe'"),
    ({"attention": "diff"}, r"model.attention: must be one of 'standard' or 'differential'"),
    ({"attention": "differential", "memory": {"enabled": True}},
     r"model.attention: differential does not combine with memory attention \(model.memory.enabled: true\)"),
    ({"attention": "differential", "n_embd": 30, "n_head": 10}, r"model.attention: .*must be even \(got 3\)"),
    ({"attention": "differential", "pos": "rope", "n_embd": 36, "n_head": 6},
     r"model.attention: .*must be divisible by 4 \(rope rotates each half\) \(got 6\)"),
])
def test_params_validation_names_the_key(model, error):
    with pytest.raises(ParamsError, match=r"^params.yaml: " + error):
        parse_params({"model": model})


def test_params_build_the_architecture():
    from persona_lm.train.phase import new_model

    class Tok:
        vocab_size = V

    p = parse_params({"model": {"attention": "differential", "mlp": "moe", "n_experts": 3, "top_k": 1,
                                "router_aux_loss_coef": 0.02, "n_embd": 32}})
    model = new_model(p, Tok())
    assert isinstance(model.blocks[0].attn, DiffAttention) and isinstance(model.blocks[0].mlp, MoE)
    assert len(model.blocks[0].mlp.experts) == 3 and model.cfg.top_k == 1 and model.cfg.router_aux_loss_coef == 0.02
    default = new_model(parse_params({}), Tok())
    assert type(default.blocks[0].attn).__name__ == "Attention" and type(default.blocks[0].mlp) is MLP


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_quantizes_the_experts_and_keeps_the_router(arch):
    from persona_lm.quant import Int8Linear, quantize_int8

    fp32 = spread(arch, "llama")
    q = quantize_int8(copy.deepcopy(fp32))
    per_block = 2 + (2 * fp32.cfg.n_experts if fp32.cfg.mlp == "moe" else 2)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == L * per_block + 1
    if fp32.cfg.mlp == "moe":
        assert all(type(b.mlp.router) is nn.Linear for b in q.blocks)
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        ref, got = fp32(x)[0], q(x)[0]
    assert (got - ref).norm() / ref.norm() < 0.05
    prompt = x[0].tolist()
    assert list(Decoder(q, prompt, max_new_tokens=20, temperature=0)) == \
        list(Decoder(q, prompt, max_new_tokens=20, temperature=0, use_cache=False))


def test_lora_adapts_attention_and_every_expert_and_merges():
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(9)
    gpt = GPT(config("both", "gqa", n_experts=3))
    base = copy.deepcopy(gpt).eval()
    lora.apply(gpt, parse_params({"lora": {"r": 4, "alpha": 8}}), "finetune", seed=1)
    layers = {n for n, m in gpt.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == L * (2 + 2 * 3)  # attn.c_attn, attn.c_proj, and each expert's c_fc and c_proj
    assert not any("router" in n for n in layers)  # routing is kept as pretrained
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    gpt.eval()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        on = gpt(idx)[0]
        assert (on - base(idx)[0]).abs().max() > 1e-3
        lora.merge(gpt)
        assert (gpt(idx)[0] - on).abs().max() < 1e-5
    assert gpt.state_dict().keys() == base.state_dict().keys()
    assert lora.check_targets(gpt, ["router"], own=True) == ["router"]
    with pytest.raises(PersonaError, match="lora.target_modules: no adaptable layer named 'router'"):
        lora.check_targets(GPT(config("differential", "gpt2")), ["router"], own=True)
    with pytest.raises(PersonaError, match="no adaptable layer named 'lambda_q1'"):
        lora.check_targets(gpt, ["lambda_q1"], own=True)


# ------------------------------------------------------------------------------------- model folders, export

EMOTIONS = ["joy", "sadness", "anger"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    from persona_lm.tokenizer import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = ["Hello there, how are you today?", "I am fine, thank you very much.", "Rosie likes tea."] * 10
    save_tokenizer(train_tokenizer(texts, "bpe", 300, EMOTIONS), path)
    return path


def model_dir(tmp: Path, tokenizer_path: Path, arch: str, family: str) -> tuple[Path, GPT]:
    from persona_lm.tokenizer import ChatTokenizer
    from persona_lm.train.checkpoint import save_model_dir

    torch.manual_seed(10)
    model = GPT(config(arch, family, vocab_size=ChatTokenizer.from_file(tokenizer_path).vocab_size)).eval()
    out = tmp / "model"
    save_model_dir(out, model, tokenizer_path, {"emotions": EMOTIONS, "persona": "Rosie", "system_prompt": "Hi."})
    return out, model


@pytest.mark.parametrize("arch", ARCHS)
def test_model_folder_round_trip(tmp_path, tokenizer_path, arch):
    from persona_lm.train.checkpoint import load_model

    src, model = model_dir(tmp_path, tokenizer_path, arch, "gqa")
    loaded, _, meta = load_model(src)
    assert loaded.cfg == model.cfg and meta["model"]["attention"] == model.cfg.attention
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize("arch,option", [("differential", "model.attention: differential"),
                                         ("moe", "model.mlp: moe"), ("both", "model.attention: differential")])
def test_every_export_format_refuses(tmp_path, tokenizer_path, arch, option):
    from persona_lm.export import export_gguf, export_hf, export_peft

    for family in ("gpt2", "llama"):
        src, _ = model_dir(tmp_path / family, tokenizer_path, arch, family)
        for name, export in (("hf", export_hf), ("peft", export_peft)):
            with pytest.raises(PersonaError, match=f"^cannot export {option}: "):
                export(src, tmp_path / family / name)
            assert not (tmp_path / family / name).exists()
        with pytest.raises(PersonaError, match=f"^cannot export {option}: "):
            export_gguf(src, tmp_path / family / "out" / "model.gguf")
        assert not (tmp_path / family / "out" / "model.gguf").exists()
