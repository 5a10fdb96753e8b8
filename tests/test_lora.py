"""LoRA on our own model: adapters off give the pretrained logits exactly, merged weights reproduce the
adapted logits, the merged model is a plain one again (the lean decode path), the finetune stage trains
adapters (and the token embedding) and writes a plain model folder, a LoRA phase on a base resumes bit-identically, and bad LoRA params
are refused before any work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from bases import EMOTIONS, llama_base, run_all, stage, write_project
from persona_lm import lora
from persona_lm.errors import ParamsError, PersonaError
from persona_lm.model import GPT, GPTConfig
from persona_lm.params import parse_params

peft = pytest.importorskip("peft")


def adapted(**model):
    """A GPT with adapters attached by lora.apply, their B matrices made non-zero (a trained adapter's are)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=120, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_emotions=2,
                        **model))
    base = copy.deepcopy(gpt).eval()
    lora.apply(gpt, parse_params({"lora": {"r": 4, "alpha": 8}}), "finetune", seed=1)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return base, gpt.eval()


@pytest.mark.parametrize("model", [{}, {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": True}])
def test_adapters_off_equal_the_base_and_merging_keeps_the_logits(model):
    from peft.tuners.lora import LoraLayer

    base, gpt = adapted(**model)
    idx = torch.randint(0, 120, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, on = base(idx)[0], gpt(idx)[0]
        assert (on - want).abs().max() > 1e-2  # the adapter changes the model
        layers = [m for m in gpt.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
        for m in layers:
            m.enable_adapters(False)
        assert torch.equal(gpt(idx)[0], want)
        for m in layers:
            m.enable_adapters(True)
        lora.merge(gpt)
        assert (gpt(idx)[0] - on).abs().max().item() < 1e-5
    assert not any(isinstance(m, LoraLayer) for m in gpt.modules())
    assert gpt.state_dict().keys() == base.state_dict().keys()  # a plain model again: the lean path, no wrappers


def test_adapters_and_the_embedding_train():
    _, gpt = adapted()
    trainable = {n: p.numel() for n, p in gpt.named_parameters() if p.requires_grad}
    assert trainable.pop("wte.weight") == 120 * 32  # tied: the output head is the same tensor
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == 2 * (  # r * (in + out) per adapted layer
        4 * (32 + 64) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32))


def test_from_scratch_run_with_lora(tmp_path):
    """Pretraining from scratch trains every weight; finetune and emotion train adapters; every folder is plain."""
    d = run_all(write_project(tmp_path, {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 256},
                                         "tokenizer": {"vocab_size": 300}}))
    pre = json.loads((d / "reports/pretrain.json").read_text())
    ft = json.loads((d / "reports/finetune.json").read_text())
    assert pre["trainable_params"] == pre["params"]["total"] - pre["params"]["emotion_head"]  # head: phase 3
    assert 0 < ft["trainable_params"] < ft["params"]["total"] / 2  # adapters and the token embedding
    keys = load_file(str(d / "models/pretrain/model.safetensors")).keys()
    for phase in ("finetune", "final"):
        weights = load_file(str(d / f"models/{phase}/model.safetensors"))
        assert weights.keys() == keys and not (d / f"models/{phase}/adapter_config.json").exists()
    before = load_file(str(d / "models/pretrain/model.safetensors"))
    after = load_file(str(d / "models/finetune/model.safetensors"))
    assert not torch.equal(before["blocks.0.attn.c_attn.weight"], after["blocks.0.attn.c_attn.weight"])
    assert torch.equal(before["blocks.0.ln_1.weight"], after["blocks.0.ln_1.weight"])  # not adapted: untouched


# ------------------------------------------------------------------------------------------------- resume

def test_lora_phase_on_a_base_resumes_bit_identically(tmp_path, monkeypatch):
    from persona_lm import base
    from persona_lm.params import Base
    from persona_lm.tokenizer import TemplateTokenizer
    from persona_lm.train import checkpoint
    from persona_lm.train.batches import CorpusBatches
    from persona_lm.train.loop import train
    from persona_lm.train.phase import new_model

    folder = llama_base(tmp_path / "base")
    p = parse_params({"base": {"model": str(folder)}, "lora": {"r": 4}, "persona": {"emotions": EMOTIONS},
                      "model": {"block_size": 32}})
    _, record = base.resolve(Base(model=str(folder)))
    tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
    stream = torch.tensor(tok.encode(" ".join(["the little robot counted bright flowers in the garden"] * 40)))
    batches = CorpusBatches(stream, stream, None, 0.0, 4, 32, seed=3)
    phase = p.pretrain.model_copy(update=dict(max_iters=8, batch_size=4, ckpt_interval=2, eval_interval=8,
                                              eval_iters=1, warmup_iters=2, device="cpu", keep_checkpoints=10))

    def fresh():
        return new_model(p, tok)  # what the pretrain stage starts from: the base, an adapter, the head frozen

    def adapter(model):  # LoRA matrices and the rows of the template's tokens <|im_start|>, <|im_end|>
        return {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}

    ref = fresh()
    train(ref, phase, batches, tmp_path / "ref", "h", {"live_dir": tmp_path / "live-ref"}, "pretrain")

    save = checkpoint.save

    def dies_after_step_4(ckpt_dir, step, *args, **kw):
        path = save(ckpt_dir, step, *args, **kw)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", dies_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), phase, batches, tmp_path / "run", "h", {"live_dir": tmp_path / "live"}, "pretrain")
    monkeypatch.setattr(checkpoint, "save", save)
    saved = load_file(str(tmp_path / "run/step_0000004/model.safetensors"))
    assert saved and all("lora_" in k or "trainable_tokens" in k for k in saved)  # no frozen base weights
    resumed = fresh()
    result = train(resumed, phase, batches, tmp_path / "run", "h", {"live_dir": tmp_path / "live"}, "pretrain")
    assert result.resumed_from == 4
    want, got = adapter(ref), adapter(resumed)
    assert any("trainable_tokens" in k for k in want) and any("lora_" in k for k in want)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------------------------------------ bad input

def test_negative_rank_names_the_key():
    with pytest.raises(ParamsError, match=r"^params.yaml: lora.r: must be >= 0 \(got -1\)$"):
        parse_params({"lora": {"r": -1}})


def test_unknown_target_module_on_our_model_lists_the_real_ones(tmp_path):
    from persona_lm.train.phase import check_lora

    class Tok:
        vocab_size = 100

    p = parse_params({"lora": {"r": 4, "target_modules": ["q_proj"]}})
    with pytest.raises(PersonaError, match=r"lora.target_modules: no adaptable layer named 'q_proj' in this model; "
                                           r"its linear layers are: c_attn, c_fc, c_proj"):
        check_lora(p, "finetune", Tok())
    check_lora(parse_params({"lora": {"r": 4, "target_modules": ["attn.c_proj"]}}), "finetune", Tok())


def test_unknown_target_module_on_a_base_fails_the_stage_before_loading_weights(tmp_path):
    folder = llama_base(tmp_path / "base")
    d = write_project(tmp_path / "proj", {"base": {"model": str(folder)}, "pretrain": {"max_iters": 0},
                                          "lora": {"r": 4, "target_modules": ["c_attn"]}})
    for name in ("train_tokenizer", "tokenize_corpus", "pretrain"):
        proc = stage(d, name)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (d / "models/pretrain/model.safetensors").exists()  # max_iters 0: the base is used as published
    (folder / "model.safetensors").rename(folder / "moved")  # a weight load would now fail loudly
    proc = stage(d, "finetune")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: lora.target_modules: no adaptable layer named 'c_attn' in this model; its linear layers are: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def test_gradient_checkpointing_on_a_base_gives_the_same_gradients(tmp_path):
    from persona_lm import base
    from persona_lm.params import Base
    from persona_lm.tokenizer import TemplateTokenizer

    folder = llama_base(tmp_path / "base")
    _, record = base.resolve(Base(model=str(folder)))
    tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
    p = parse_params({"base": {"model": str(folder)}, "lora": {"r": 4}, "persona": {"emotions": EMOTIONS}})
    x = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        model = base.new(record, tok, len(EMOTIONS), 64)
        lora.apply(model, p, "finetune", p.seed)
        model.train()
        model.grad_checkpointing = on
        assert model.grad_checkpointing == on
        model(x)[0].square().mean().backward()
        grads.append({n: t.grad for n, t in model.named_parameters() if t.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
