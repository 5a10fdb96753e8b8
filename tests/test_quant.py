"""int8 weight-only decode (persona_lm.quant): rounding within the symmetric int8 bound, logits close to fp32's,
greedy decode with and without the cache alike, the tied embedding table left as it was, a Llama-style base
model quantized through the same layer, and `--dtype` on the chat command line."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model_dir
from persona_lm.errors import PersonaError
from persona_lm.generate import Decoder
from persona_lm.model import GPT, GPTConfig
from persona_lm.quant import Int8Linear, quantize_int8, quantize_rows, to_dtype

CLI = Path(sys.executable).parent / "persona-lm"
LINES = ["Hello there, how are you today?", "I am fine, thank you.", "Tell me something nice."]


def small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def test_rounding_error_per_channel_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[5] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (w - q.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.float() * scale[:, None])[5].abs().max() == 0


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=True)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 64)
    ref = x @ q8.dequantized().t() + lin.bias
    y = q8(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    assert (y - ref).norm() / ref.norm() < 1e-2  # the kernel runs in bf16: ~3 significant digits


@pytest.mark.parametrize("kw", [{}, dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=True),
                                dict(memory_layers=(1,), memory_slots=8)])
def test_logits_close_to_fp32(kw):
    fp32 = small(**kw)
    q = quantize_int8(copy.deepcopy(fp32))
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * 2 + 1  # 4 per block + lm_head
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = fp32(x)[0], q(x)[0]
    assert (got - ref).norm() / ref.norm() < 0.05


def test_tied_embedding_table_is_kept():
    fp32 = small()
    q = quantize_int8(copy.deepcopy(fp32))
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.wte, nn.Embedding)
    assert torch.equal(q.wte.weight, fp32.wte.weight)
    assert not any(isinstance(m, Int8Linear) for m in [q.emotion_head] if m is not None)


@pytest.mark.parametrize("kw", [{}, dict(memory_layers=(1,), memory_slots=8)])
def test_greedy_cached_equals_uncached(kw):
    model = to_dtype(small(**kw), "int8")
    prompt = list(range(3, 20))
    cached = list(Decoder(model, prompt, max_new_tokens=60, temperature=0))  # 77 tokens: one re-window
    uncached = list(Decoder(model, prompt, max_new_tokens=60, temperature=0, use_cache=False))
    assert cached == uncached and len(cached) == 60


def test_teacher_forced_agreement_on_a_trained_model():
    """A model trained a little on a repetitive sequence has confident predictions, as a trained model has: int8
    must keep nearly all of its top-1 choices."""
    fp32 = small()
    fp32.train()
    seq = torch.tensor([[(7 * i + i // 5) % 97 for i in range(64)]])
    opt = torch.optim.AdamW(fp32.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        logits, _ = fp32(seq[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    fp32.eval()
    q = quantize_int8(copy.deepcopy(fp32))
    with torch.inference_mode():
        agree = (fp32(seq)[0].argmax(-1) == q(seq)[0].argmax(-1)).float().mean().item()
    assert loss.item() < 1.0 and agree >= 0.95


def test_llama_base_model(tmp_path):
    from bases import llama_base
    from transformers import AutoModelForCausalLM

    from persona_lm.base import BaseLM

    folder = llama_base(tmp_path / "base", tie=True)
    fp32 = BaseLM(AutoModelForCausalLM.from_pretrained(folder), {}, 0, 64).eval()
    q = quantize_int8(copy.deepcopy(fp32))
    assert isinstance(q.lm_head, Int8Linear) and sum(isinstance(m, Int8Linear) for m in q.modules()) == 2 * 7 + 1
    assert isinstance(q.hf.get_input_embeddings(), nn.Embedding)
    x = torch.randint(0, fp32.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = fp32(x)[0], q(x)[0]
    assert (got - ref).norm() / ref.norm() < 0.05
    prompt = x[0].tolist()
    assert list(Decoder(q, prompt, max_new_tokens=8, temperature=0)) == \
        list(Decoder(q, prompt, max_new_tokens=8, temperature=0, use_cache=False))


def test_gpt2_base_model_is_refused(tmp_path):
    from bases import gpt2_base
    from transformers import AutoModelForCausalLM

    from persona_lm.base import BaseLM

    model = BaseLM(AutoModelForCausalLM.from_pretrained(gpt2_base(tmp_path / "base")), {}, 0, 64)
    with pytest.raises(PersonaError, match="Conv1D"):
        quantize_int8(model)


def test_cli_rejects_an_unknown_dtype():
    from persona_lm.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--dtype", "int4"])
    assert build_parser().parse_args(["serve", "--dtype", "int8"]).dtype == "int8"


def test_chat_int8_end_to_end(tmp_path):
    model_dir = tiny_model_dir(tmp_path, LINES, ["joy", "sadness"])
    out = subprocess.run([str(CLI), "chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "8",
                          "--dtype", "int8", "--memory", str(tmp_path / "memory")],
                         input="Hello there\nTell me something nice.\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2 and "weight memory is off" in out.stderr


def test_rows_do_not_depend_on_the_batch():
    """The server decodes streams as rows of one batch and promises each the reply it would get alone."""
    q8 = Int8Linear.from_linear(nn.Linear(64, 96))
    x = torch.randn(5, 64)
    assert torch.equal(q8(x)[2:3], q8(x[2:3]))


def test_serve_int8(tmp_path):
    import httpx

    from conftest import Server

    s = Server(tiny_model_dir(tmp_path, LINES, ["joy", "sadness"]), "--dtype", "int8")
    try:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "rosie", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        s.close()
    out = subprocess.run([str(CLI), "serve", "--model", str(tmp_path / "final"), "--dtype", "int8", "--memory",
                          str(tmp_path / "memory"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--memory needs trainable weights" in out.stderr
