"""The Hugging Face export: same logits, same greedy tokens, same chat prompt ids, clear refusals, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from persona_lm.errors import PersonaError  # noqa: E402
from persona_lm.export import export_hf, family  # noqa: E402
from persona_lm.generate import generate  # noqa: E402
from persona_lm.model import GPT, GPTConfig  # noqa: E402
from persona_lm.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from persona_lm.train.checkpoint import save_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMOTIONS = ["joy", "sadness"]
TEXTS = ["Hello there, how are you today?", "I am fine, thank you very much.", "The rain in Spain stays mainly",
         "What a lovely morning for a walk in the park.", "Rosie likes tea and long stories."] * 20
FAMILIES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "gpt2-gqa-nobias-untied": dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=2, tie_embeddings=False),
    "llama-gqa-untied": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False),
    "llama-tied": dict(pos="rope", norm="rmsnorm", mlp="swiglu", rope_theta=500.0),
    "llama-bias": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True),
}
MESSAGES = [{"role": "system", "content": "You are Rosie."}, {"role": "user", "content": "Hello there, how are you?"},
            {"role": "assistant", "content": "I am fine, thank you."}, {"role": "user", "content": "Lovely morning!"}]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(TEXTS, "bpe", 300, EMOTIONS), path)
    return path


def tiny_model(vocab_size: int, **options) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=48, n_layer=2, n_head=4, n_embd=32, n_personas=2,
                          n_emotions=len(EMOTIONS), **options))
    with torch.no_grad():  # spread the weights so greedy choices are never near-ties
        for p in model.parameters():  # the persona rows too: a trained model's are never zero
            p.normal_(0, 0.1)
    return model.eval()


def model_dir(tmp: Path, tokenizer_path: Path, **options) -> tuple[Path, GPT]:
    tok = ChatTokenizer.from_file(tokenizer_path)
    model = tiny_model(tok.vocab_size, **options)
    out = tmp / "model"
    save_model_dir(out, model, tokenizer_path, {"emotions": EMOTIONS, "persona": "Rosie", "system_prompt": "Hi."})
    return out, model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_matches(tmp_path, tokenizer_path, name):
    src, ours = model_dir(tmp_path, tokenizer_path, **FAMILIES[name])
    out = export_hf(src, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == ("gpt2" if name.startswith("gpt2") else "llama")

    idx = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
        assert (theirs - ours(idx)[0]).abs().max().item() < 1e-4
        assert (theirs - ours(idx, persona=torch.tensor([1, 1]))[0]).abs().max().item() > 1e-2  # the persona matters

    tok = ChatTokenizer.from_file(tokenizer_path)
    prompt = tok.prompt([{"from": "human", "value": "Hello there, how are you?"}])
    mine = generate(ours, tok, prompt, max_new_tokens=12, temperature=0, use_cache=True, ignore_end=True).ids
    hf.generation_config.eos_token_id = None  # run on past stop tokens, as ignore_end does for ours
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=None,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert theirs == mine and len(set(mine)) > 1

    config = json.loads((out / "config.json").read_text())["persona_lm"]
    assert config["emotions"] == EMOTIONS and config["persona"] == "Rosie"
    assert (out / "emotion_head.safetensors").is_file()


def test_chat_template_matches_prompt(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["llama-tied"])
    out = export_hf(src, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": roles[m["role"]], "value": m["content"]} for m in MESSAGES]
    tok = ChatTokenizer.from_file(tokenizer_path)
    assert list(ids) == tok.prompt(turns)
    assert hf_tok.eos_token == "<|end|>" and hf_tok.pad_token == "<|pad|>" and hf_tok.bos_token is None


@pytest.mark.parametrize("options, offending", [
    (dict(pos="learned", norm="layernorm", mlp="swiglu"), "model.mlp=swiglu"),
    (dict(pos="learned", norm="rmsnorm", mlp="gelu"), "model.norm=rmsnorm"),
    (dict(pos="rope", norm="layernorm", mlp="swiglu"), "model.norm=layernorm"),
    (dict(pos="rope", norm="rmsnorm", mlp="gelu"), "model.mlp=gelu"),
])
def test_unsupported_combinations(options, offending):
    with pytest.raises(PersonaError, match=offending):
        family(GPTConfig(vocab_size=10, **options))


def test_refuses_to_replace_unrelated_folder(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["gpt2"])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(PersonaError, match="not an earlier export"):
        export_hf(src, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    export_hf(src, tmp_path / "hf")
    export_hf(src, tmp_path / "hf")  # an earlier export is replaced


def test_cli_export(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["llama-gqa-untied"])
    exe = Path(sys.executable).with_name("persona-lm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "persona_lm.cli"]
    out = tmp_path / "exported"
    run = subprocess.run(cmd + ["export", "--format", "hf", str(out), "--model", str(src)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "emotion_head.safetensors"} <= names
    assert not list(tmp_path.glob(".exported-*"))  # no temporary folder left behind

    bad = subprocess.run(cmd + ["export", str(tmp_path / "x"), "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and "error:" in bad.stderr
