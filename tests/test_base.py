"""A run on a pretrained base with LoRA: the real stage scripts on tiny random transformers bases (a ChatML Llama,
and a GPT-2 without chat template or pad token), then chat, serve, both exports, resume and determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bases import EMOTIONS, REPLIES, env, gpt2_base, llama_base, run_all, stage, write_project
from conftest import Server

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CLI = Path(sys.executable).parent / "persona-lm"
@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-run")
    base = llama_base(d / "base")
    return run_all(write_project(d, {"base": {"model": str(base)}}))


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """No chat template, no pad token: ours is used, its markers added as tokens whose rows the adapter trains."""
    d = tmp_path_factory.mktemp("gpt2-run")
    base = gpt2_base(d / "base")
    return run_all(write_project(d, {"base": {"model": str(base)}}))


def load(d: Path, sub: str = "models/final"):
    from persona_lm.train.checkpoint import load_model

    return load_model(d / sub)


# ------------------------------------------------------------------------------------------- the pipeline

@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_final_folder_holds_the_adapter_and_a_record_of_the_base(run, request):
    d = request.getfixturevalue(run)
    final = d / "models/final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "emotion_head.safetensors", "config.json",
            "tokenizer.json", "chat.json"} <= names
    assert "model.safetensors" not in names  # no copy of the base: the adapter was trained in every phase
    config = json.loads((final / "config.json").read_text())
    assert config["kind"] == "base" and config["base"]["model"] == str((d / "base").resolve())
    assert len(config["base"]["sha"]) == 64 and config["emotions"] == EMOTIONS
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA" and adapter["task_type"] == "CAUSAL_LM"
    ft = json.loads((d / "reports/finetune.json").read_text())
    assert 0 < ft["trainable_params"] < ft["params"]["base"] / 2 and ft["step"] == 12
    assert (d / "reports/train/finetune/plots/metrics/train/loss.tsv").is_file()
    metrics = json.loads((d / "reports/eval.json").read_text())
    details = json.loads((d / "reports/eval/details.json").read_text())
    assert 0 < metrics["corpus_bpb"] < 20 and details["emotion_val_replies"] == len(REPLIES)
    assert "base " in (d / "reports/report_card.md").read_text()


def test_tokenizer_stage_takes_the_bases_tokenizer(llama_run, gpt2_run):
    from persona_lm.tokenizer import load_tokenizer

    llama = json.loads((llama_run / "models/tokenizer/chat.json").read_text())
    assert llama["close"] == "<|im_end|>" and not llama["own_template"] and llama["new_tokens"] == 0
    tok = load_tokenizer(llama_run / "models/tokenizer")
    assert tok.hf.convert_ids_to_tokens(llama["marker_ids"]) == ["<|im_start|>", "<|im_end|>"]  # rows trained
    gpt2 = json.loads((gpt2_run / "models/tokenizer/chat.json").read_text())
    assert gpt2["close"] == "<|end|>" and gpt2["own_template"] and len(gpt2["marker_ids"]) == 4
    report = json.loads((gpt2_run / "reports/tokenizer.json").read_text())
    assert report["kind"] == "base" and report["new_tokens"] == 4 and report["base_params"] > 0


def test_training_moved_the_adapter_and_the_head(llama_run):
    adapter = load_file(str(llama_run / "models/final/adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at zero
    before = load_file(str(llama_run / "models/finetune/adapter_model.safetensors"))
    assert any(not torch.equal(before[k], adapter[k]) for k in adapter)  # phase 3 kept training it
    head = load_file(str(llama_run / "models/final/emotion_head.safetensors"))
    assert head["weight"].abs().max() > 0


def test_finetune_is_deterministic(llama_run, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(llama_run, again, ignore=shutil.ignore_patterns("finetune", "final", "*.checkpoints"))
    proc = stage(again, "finetune")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(str(llama_run / "models/finetune/adapter_model.safetensors"))
    b = load_file(str(again / "models/finetune/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "reports/finetune.json").read_text() == (llama_run / "reports/finetune.json").read_text()


# --------------------------------------------------------------------------------------- talking to it

@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_chat_piped(run, request):
    d = request.getfixturevalue(run)
    proc = subprocess.run([str(CLI), "chat", "--model", str(d / "models/final"), "--temperature", "0",
                           "--max-new-tokens", "6"], input="Hello there!\nHow are you?\n", capture_output=True,
                          text=True, timeout=300, env=env(d))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(any(line.endswith(f"  [{e}]") for e in EMOTIONS) for line in lines)


def test_serve_answers_one_openai_request(llama_run):
    from openai import OpenAI

    from persona_lm.generate import generate

    model, tok, config = load(llama_run)
    ids = tok.prompt([{"from": "system", "value": config["system_prompt"]}, {"from": "human", "value": "Hi!"}])
    want = generate(model, tok, ids, emotions=EMOTIONS, temperature=0, max_new_tokens=10, top_k=40,
                    repetition_penalty=1.1)
    os.environ.update(HF_HUB_OFFLINE="1")
    server = Server(llama_run / "models/final")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.chat.completions.create(model="rosie", messages=[{"role": "user", "content": "Hi!"}],
                                             temperature=0, max_tokens=10)
    finally:
        server.close()
    assert got.choices[0].message.content == want.text and got.choices[0].message.emotion == want.emotion
    assert got.usage.prompt_tokens == len(ids)


# ----------------------------------------------------------------------------------------------- exports

def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_hf_export_loads_in_transformers_with_the_same_logits(run, request, tmp_path):
    d = request.getfixturevalue(run)
    out = tmp_path / "hf"
    proc = subprocess.run([str(CLI), "export", "--format", "hf", str(out), "--model", str(d / "models/final")],
                          capture_output=True, text=True, timeout=300, env=env(d))
    assert proc.returncode == 0, proc.stderr
    ours, tok, _ = load(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.tensor([tok.prompt([{"from": "human", "value": "Hello there!"}])])
    assert (hf(idx).logits - logits_of(ours, idx)).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hello there!"}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(rendered) == tok.prompt([{"from": "human", "value": "Hello there!"}])
    record = json.loads((out / "config.json").read_text())["persona_lm"]
    assert record["emotions"] == EMOTIONS and (out / "emotion_head.safetensors").is_file()


@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_peft_export_loads_on_the_stock_base_with_the_same_logits(run, request, tmp_path):
    d = request.getfixturevalue(run)
    out = tmp_path / "adapter"
    proc = subprocess.run([str(CLI), "export", "--format", "peft", str(out), "--model", str(d / "models/final")],
                          capture_output=True, text=True, timeout=300, env=env(d))
    assert proc.returncode == 0, proc.stderr
    ours, tok, _ = load(d)
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "base")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    if len(hf_tok) > base.get_input_embeddings().weight.shape[0]:  # added tokens: grow the base first (README)
        base.resize_token_embeddings(len(hf_tok), mean_resizing=False)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    idx = torch.tensor([tok.prompt([{"from": "human", "value": "Hello there!"}])])
    with torch.no_grad():
        theirs = model(input_ids=idx).logits
    assert (theirs - logits_of(ours, idx)).abs().max().item() < 1e-4
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str((d / "base").resolve())


def test_peft_export_refuses_a_from_scratch_model(tmp_path):
    from conftest import tiny_model_dir

    model = tiny_model_dir(tmp_path, ["hello there", "fine thanks"], EMOTIONS)
    proc = subprocess.run([str(CLI), "export", "--format", "peft", str(tmp_path / "out"), "--model", str(model)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "trained from scratch" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------- other runs

def test_our_exported_model_as_a_base_round_trip(tmp_path):
    """`persona-lm export --format hf` makes a base like any other: before any training on it the base run's
    model gives our model's logits exactly (pretrain.max_iters 0 keeps it as published); then it trains and chats."""
    from conftest import tiny_model_dir

    ours = tiny_model_dir(tmp_path, [q for q, _, _ in REPLIES] + [a for _, a, _ in REPLIES], EMOTIONS, block_size=256)
    exported = tmp_path / "exported"
    proc = subprocess.run([str(CLI), "export", str(exported), "--model", str(ours)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = run_all(write_project(tmp_path / "run", {"base": {"model": str(exported)}, "pretrain": {"max_iters": 0}}))
    assert not any((d / "reports/train/pretrain/plots/metrics").iterdir())  # nothing trained, no curve
    gpt, tok, _ = load(ours.parent, ours.name)
    as_base, base_tok, _ = load(d, "models/pretrain")
    turns = [{"from": "human", "value": "Hello there!"}]
    assert base_tok.prompt(turns) == tok.prompt(turns)  # our chat template, rendered by transformers
    idx = torch.tensor([tok.prompt(turns)])
    assert (logits_of(as_base, idx) - logits_of(gpt, idx)).abs().max().item() < 1e-4
    proc = subprocess.run([str(CLI), "chat", "--model", str(d / "models/final"), "--temperature", "0",
                           "--max-new-tokens", "6"], input="Hello there!\n", capture_output=True, text=True,
                          timeout=300, env=env(d))
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stderr


def test_full_pretraining_then_lora_keeps_both_and_exports_merged(tmp_path):
    """lora.phases without pretrain: pretraining changes all the base's weights, later phases add an adapter.
    The folder carries both; the hf export merges them; a peft export alone could not reproduce it: refused."""
    d = run_all(write_project(tmp_path, {"base": {"model": str(llama_base(tmp_path / "base"))},
                                         "lora": {"phases": ["finetune", "emotion"]}}))
    final = d / "models/final"
    assert (final / "model.safetensors").is_file() and (final / "adapter_model.safetensors").is_file()
    pre = json.loads((d / "reports/pretrain.json").read_text())
    assert pre["trainable_params"] == pre["params"]["base"]
    proc = subprocess.run([str(CLI), "export", "--format", "peft", str(tmp_path / "a"), "--model", str(final)],
                          capture_output=True, text=True, timeout=120, env=env(d))
    assert proc.returncode == 1 and "fine-tuned the base's own weights" in proc.stderr
    proc = subprocess.run([str(CLI), "export", str(tmp_path / "hf"), "--model", str(final)],
                          capture_output=True, text=True, timeout=300, env=env(d))
    assert proc.returncode == 0, proc.stderr
    ours, tok, _ = load(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([tok.prompt([{"from": "human", "value": "Hello there!"}])])
    assert (hf(idx).logits - logits_of(ours, idx)).abs().max().item() < 1e-4
    stock = transformers.AutoModelForCausalLM.from_pretrained(d / "base").eval()
    assert (stock(idx).logits - logits_of(ours, idx)).abs().max().item() > 1e-3  # both changes are in there


@pytest.mark.parametrize("make", [llama_base, gpt2_base])
def test_batched_generation_on_a_base_equals_one_at_a_time(tmp_path, make):
    from persona_lm import base
    from persona_lm.generate import generate, generate_batch
    from persona_lm.params import Base
    from persona_lm.tokenizer import TemplateTokenizer

    folder = make(tmp_path / "base")
    _, record = base.resolve(Base(model=str(folder)))
    tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
    model = base.new(record, tok, len(EMOTIONS), 96).eval()
    prompts = [tok.prompt([{"from": "human", "value": t}]) for t in ("Hi", "What is your name, friend?", "Ok?")]
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=3, repetition_penalty=1.2)):
        batch = generate_batch(model, tok, prompts, max_new_tokens=10, emotions=EMOTIONS, **kw)
        for prompt, got in zip(prompts, batch):
            alone = generate(model, tok, prompt, max_new_tokens=10, emotions=EMOTIONS, **kw)
            assert (got.ids, got.text, got.emotion) == (alone.ids, alone.text, alone.emotion)
