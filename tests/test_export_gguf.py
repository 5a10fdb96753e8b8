"""The GGUF export: what the file holds (read back with gguf's reader), the Modelfile, refusals, and, where
llama-cpp-python is installed (`make test-gguf`, marker `gguf`), llama.cpp itself: same prompt ids, same greedy
tokens and close logits as our model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

gguf = pytest.importorskip("gguf")

from test_export import EMOTIONS, FAMILIES, TEXTS, model_dir, tiny_model  # noqa: E402

from persona_lm.cli import main as cli  # noqa: E402
from persona_lm.errors import PersonaError  # noqa: E402
from persona_lm.export import export_gguf  # noqa: E402
from persona_lm.export.gguf import MODELFILE_HEADER, hf_source, write_gguf  # noqa: E402
from persona_lm.generate import generate  # noqa: E402
from persona_lm.tokenizer import CHAT_TEMPLATE, ChatTokenizer, chat_template, save_tokenizer, train_tokenizer  # noqa: E402
from persona_lm.train.checkpoint import save_model_dir  # noqa: E402

TURNS = [{"from": "system", "value": "You are Rosie."}, {"from": "human", "value": "Hello there, how are you?"},
         {"from": "gpt", "value": "I am fine, thank you."}, {"from": "human", "value": "Lovely morning!"}]
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(TEXTS, "bpe", 300, EMOTIONS), path)
    return path


def fields(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(t) -> np.ndarray:
    """A tensor's values as float32 in PyTorch layout (out, in)."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])


def render_ollama(template: str, turns: list[dict]) -> str:
    """Our TEMPLATE's one loop rendered by substitution: `range .Messages` over an `if eq .Role` chain."""
    m = re.fullmatch(r"\{\{ range \.Messages \}\}(.*)\{\{ end \}\}\{\{ \.Content \}\}(.*?)\{\{ end \}\}(.*)", template)
    assert m, template
    chain, close, tail = m.groups()
    marker = dict(re.findall(r'eq \.Role "(\w+)" \}\}([^{]*)', chain))
    return "".join(marker[ROLES[t["from"]]] + t["value"] + close for t in turns) + tail


# ----------------------------------------------------------------------------------------------- the file

@pytest.mark.parametrize("name", ["gpt2", "gpt2-gqa-nobias-untied", "llama-gqa-untied", "llama-tied"])
def test_round_trip(tmp_path, tokenizer_path, name):
    src, model = model_dir(tmp_path, tokenizer_path, **FAMILIES[name])
    out = export_gguf(src, tmp_path / "rosie.gguf")
    meta, tensors = fields(out)
    cfg, arch = model.cfg, "gpt2" if name.startswith("gpt2") else "llama"
    assert meta["general.architecture"] == arch and meta["general.name"] == "Rosie"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta[f"{arch}.context_length"] == cfg.block_size and meta[f"{arch}.block_count"] == cfg.n_layer
    assert meta[f"{arch}.embedding_length"] == cfg.n_embd and meta[f"{arch}.feed_forward_length"] == cfg.hidden_dim
    assert meta[f"{arch}.attention.head_count"] == cfg.n_head

    layer = model.blocks[0]
    E, hd, H, K = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head
    q, k, _ = layer.attn.c_attn.weight.detach().split([E, K * hd, K * hd])
    if arch == "llama":
        assert meta["llama.attention.head_count_kv"] == K and meta["llama.rope.dimension_count"] == hd
        assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        # rotate-half rows -> interleaved pairs: row 2i of a head is HF row i, row 2i+1 is HF row i + hd/2
        heads = k.reshape(K, 2, hd // 2, E).transpose(1, 2).reshape(K * hd, E)
        assert np.allclose(values(tensors["blk.0.attn_k.weight"]), heads.numpy(), atol=1e-3)
        assert tuple(tensors["blk.0.attn_q.weight"].shape) == (E, E)
        embd = model.wte.weight + model.persona.weight[0]
    else:
        assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
        qkv = values(tensors["blk.0.attn_qkv.weight"])
        assert qkv.shape == (3 * E, E)  # (out, in) again, GQA expanded to every head
        assert np.allclose(qkv[:E], q.numpy(), atol=1e-3)
        assert {"blk.0.attn_qkv.bias", "blk.0.ffn_up.bias", "output_norm.bias"} <= set(tensors)
        assert np.allclose(values(tensors["position_embd.weight"]),
                           (model.wpe.weight + model.persona.weight[0]).detach().numpy(), atol=1e-6)
        embd = model.wte.weight
    assert np.allclose(values(tensors["token_embd.weight"]), embd.detach().numpy(), atol=1e-3)
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings or arch == "llama" and model.persona.weight[0].any())
    for t in tensors.values():
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if len(t.shape) == 2 and t.name != "position_embd.weight"
                                 else gguf.GGMLQuantizationType.F32)


def test_tokenizer_metadata(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["llama-tied"])
    meta, _ = fields(export_gguf(src, tmp_path / "rosie.gguf"))
    vocab = json.loads(tokenizer_path.read_text())
    tok = ChatTokenizer.from_file(tokenizer_path)
    by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [by_id[i] for i in range(tok.vocab_size)]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in vocab["model"]["merges"]]
    control = [i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL]
    assert control == sorted(tok.special_ids) and len(control) == 8 + len(EMOTIONS)
    assert set(meta["tokenizer.ggml.token_type"]) == {gguf.TokenType.NORMAL, gguf.TokenType.CONTROL}
    assert meta["tokenizer.ggml.eos_token_id"] == tok.end == meta["tokenizer.ggml.eot_token_id"]
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad and "tokenizer.ggml.bos_token_id" not in meta
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"].endswith(CHAT_TEMPLATE)


def test_chat_template_opens_with_the_persona_system_prompt(tmp_path, tokenizer_path):
    """llama.cpp only has the template: a conversation without a system message gets the persona's, as in serve."""
    import jinja2

    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["llama-tied"])
    meta, _ = fields(export_gguf(src, tmp_path / "rosie.gguf"))
    config = json.loads((src / "config.json").read_text())
    tok = ChatTokenizer.from_file(tokenizer_path)
    template = jinja2.Environment().from_string(meta["tokenizer.chat_template"])
    parsing = Tokenizer.from_file(str(tokenizer_path))  # parses the markers in the text, as llama.cpp does

    def ids(messages):
        text = template.render(messages=messages, add_generation_prompt=True)
        return parsing.encode(text, add_special_tokens=False).ids

    user = [{"role": "user", "content": "Hi there!"}]
    system = {"from": "system", "value": config["system_prompt"]}
    assert ids(user) == tok.prompt([system, {"from": "human", "value": "Hi there!"}])
    other = [{"role": "system", "content": "Be brief."}] + user
    assert ids(other) == tok.prompt([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there!"}])
    assert chat_template("Use {{ braces }}") == CHAT_TEMPLATE  # never template code from a prompt


def test_q8_0_quantizes_the_matrices(tmp_path, tokenizer_path):
    src, model = model_dir(tmp_path, tokenizer_path, **FAMILIES["gpt2-gqa-nobias-untied"])
    _, f16 = fields(export_gguf(src, tmp_path / "f16.gguf"))
    meta, q8 = fields(export_gguf(src, tmp_path / "q8.gguf", quant="q8_0"))
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0 and set(q8) == set(f16)
    Q8, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert {t.tensor_type for t in q8.values() if len(t.shape) == 1} == {F32}
    assert q8["position_embd.weight"].tensor_type == F32  # as convert_hf_to_gguf keeps it
    matrices = [n for n, t in q8.items() if len(t.shape) == 2 and n != "position_embd.weight"]
    assert matrices and all(q8[n].tensor_type == Q8 for n in matrices)
    for n in matrices:
        assert np.abs(values(q8[n]) - values(f16[n])).max() < 0.01


# ----------------------------------------------------------------------------------------------- Modelfile

def test_modelfile_renders_our_chat_format(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["llama-tied"])
    export_gguf(src, tmp_path / "out" / "rosie.gguf")
    text = (tmp_path / "out" / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == MODELFILE_HEADER and lines[1] == "FROM ./rosie.gguf"
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    tok = ChatTokenizer.from_file(tokenizer_path)
    ours = tok.tok.decode(tok.prompt(TURNS), skip_special_tokens=False)
    assert render_ollama(template, TURNS) == ours
    parsing = Tokenizer.from_file(str(tokenizer_path))  # special-token strings parsed, as a chat runtime does
    assert parsing.encode(render_ollama(template, TURNS), add_special_tokens=False).ids == tok.prompt(TURNS)
    assert 'SYSTEM """Hi."""' in lines and "PARAMETER num_ctx 48" in lines
    stops = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("PARAMETER stop ")]
    assert sorted(stops) == sorted(["<|end|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"])


def test_existing_files_are_replaced_only_when_ours(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["gpt2"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "Modelfile").write_text("FROM llama3\n")
    with pytest.raises(PersonaError, match="not written by persona-lm"):
        export_gguf(src, out / "rosie.gguf")
    assert (out / "Modelfile").read_text() == "FROM llama3\n" and not (out / "rosie.gguf").exists()
    (out / "Modelfile").unlink()
    for wrong in (out, tmp_path / "rosie"):  # a folder, or a name a user may take for one
        with pytest.raises(PersonaError, match="ends in .gguf"):
            export_gguf(src, wrong)
    assert not (tmp_path / "rosie").exists() and not (tmp_path / "Modelfile").exists()
    (out / "notes.gguf").write_text("keep me")
    with pytest.raises(PersonaError, match="not a GGUF file"):
        export_gguf(src, out / "notes.gguf")
    assert (out / "notes.gguf").read_text() == "keep me"
    export_gguf(src, out / "rosie.gguf")
    export_gguf(src, out / "rosie.gguf", quant="q8_0")  # an earlier export, Modelfile included, is replaced
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "notes.gguf", "rosie.gguf"]  # no temp files


# ----------------------------------------------------------------------------------------------- refusals

def test_refuses_memory_attention(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["llama-tied"], memory_layers=(1,))
    with pytest.raises(PersonaError, match="memory attention"):
        export_gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_refuses_combinations_llama_cpp_lacks(tmp_path, tokenizer_path):
    src, _ = model_dir(tmp_path, tokenizer_path, pos="rope", norm="layernorm", mlp="swiglu")
    with pytest.raises(PersonaError, match="model.norm=layernorm"):
        export_gguf(src, tmp_path / "m.gguf")


def test_refuses_char_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(TEXTS, "char", 300, EMOTIONS), path)
    src, _ = model_dir(tmp_path, path, **FAMILIES["llama-tied"])
    with pytest.raises(PersonaError, match="tokenizer.kind: char"):
        export_gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_other_base_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(PersonaError, match="Qwen2ForCausalLM"):
        hf_source(tmp_path)


def test_cli(tmp_path, tokenizer_path, capsys):
    src, _ = model_dir(tmp_path, tokenizer_path, **FAMILIES["gpt2"])
    out = tmp_path / "rosie.gguf"
    assert cli(["export", "--format", "gguf", str(out), "--quant", "q8_0", "--model", str(src)]) == 0
    assert fields(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert cli(["export", "--format", "hf", str(tmp_path / "hf"), "--quant", "q8_0", "--model", str(src)]) == 1
    assert "--quant only applies to --format gguf" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------- llama.cpp

def trained_model_dir(tmp: Path, tokenizer_path: Path, name: str):
    """A tiny model fitted for a few steps to a few chats: random weights leave near-ties (logit gaps of 1e-4) that
    f16 rounding may break either way, a fitted model's greedy choices have clear margins."""
    tok = ChatTokenizer.from_file(tokenizer_path)
    model = tiny_model(tok.vocab_size, **FAMILIES[name]).train()
    chats = [[{"from": "human", "value": a}, {"from": "gpt", "value": b}] for a, b in zip(TEXTS[:5], TEXTS[1:6])]
    rows = [tok.render(c)[0][:model.cfg.block_size] for c in chats]
    batch = torch.tensor([r + [tok.pad] * (max(map(len, rows)) - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(40):
        logits = model(batch[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), ignore_index=tok.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp / "model"
    save_model_dir(out, model.eval(), tokenizer_path,
                   {"emotions": EMOTIONS, "persona": "Rosie", "system_prompt": "Hi."})
    return out, model


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python; skipped where it is not installed, except under `make test-gguf`, which installs it and
    sets PERSONA_LM_REQUIRE_LLAMA_CPP=1 so that a broken install fails instead of passing by skipping."""
    if os.environ.get("PERSONA_LM_REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp
        return llama_cpp
    return pytest.importorskip("llama_cpp")


def load(llama_cpp, path: Path, n_ctx: int):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=2, seed=0)


def teacher_forced(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def agreement(llama_cpp, path: Path, model, tok, n_ctx: int) -> tuple[list[int], list[int], float, float]:
    """(ours, llama.cpp's greedy tokens, teacher-forced top-1 agreement, largest logit difference relative to the
    logits' spread)."""
    prompt = tok.prompt(TURNS[1:2])
    ours = generate(model, tok, prompt, max_new_tokens=NEW_TOKENS, temperature=0, ignore_end=True).ids
    llm = load(llama_cpp, path, n_ctx)
    theirs = greedy(llm, prompt, NEW_TOKENS)
    seq = prompt + ours
    with torch.no_grad():
        mine = model(torch.tensor([seq]), persona=torch.tensor([0]))[0][0].numpy()
    logits = teacher_forced(llm, seq)
    top1 = float((logits.argmax(-1) == mine.argmax(-1)).mean())
    llm.close()
    return ours, theirs, top1, float(np.abs(logits - mine).max() / mine.std())


@pytest.mark.gguf
@pytest.mark.parametrize("name", ["gpt2", "gpt2-gqa-nobias-untied", "llama-gqa-untied", "llama-tied", "llama-bias"])
def test_llama_cpp_matches_our_model(tmp_path, tokenizer_path, llama_cpp, name):
    src, model = trained_model_dir(tmp_path, tokenizer_path, name)
    tok = ChatTokenizer.from_file(tokenizer_path)
    f16 = export_gguf(src, tmp_path / "f16.gguf")
    llm = load(llama_cpp, f16, model.cfg.block_size)
    rendered = tok.tok.decode(tok.prompt(TURNS), skip_special_tokens=False)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == tok.prompt(TURNS)
    assert llm.tokenize(b"<|user|>", add_bos=False, special=False) == tok.encode("<|user|>")  # typed text stays text
    llm.close()

    ours, theirs, top1, diff = agreement(llama_cpp, f16, model, tok, model.cfg.block_size)
    print(f"{name} f16: greedy {sum(a == b for a, b in zip(ours, theirs))}/{NEW_TOKENS}, top-1 {top1:.3f}, "
          f"max |logit diff| / std {diff:.4f}")
    assert theirs == ours and len(set(ours)) > 1
    assert top1 == 1.0 and diff < 0.02

    q8 = export_gguf(src, tmp_path / "q8.gguf", quant="q8_0")
    ours, theirs, top1, diff = agreement(llama_cpp, q8, model, tok, model.cfg.block_size)
    print(f"{name} q8_0: greedy {sum(a == b for a, b in zip(ours, theirs))}/{NEW_TOKENS}, top-1 {top1:.3f}, "
          f"max |logit diff| / std {diff:.4f}")
    assert top1 >= 0.9


@pytest.mark.gguf
@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_llama_cpp_runs_a_transformers_base(tmp_path, llama_cpp, base):
    """The base-model path's converter on a transformers folder: llama.cpp's logits are transformers'."""
    transformers = pytest.importorskip("transformers")
    from bases import gpt2_base, llama_base

    folder = (llama_base if base == "llama" else gpt2_base)(tmp_path / "base")
    write_gguf(hf_source(folder), tmp_path / "base.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = load(llama_cpp, tmp_path / "base.gguf", 64)
    got = teacher_forced(llm, ids)
    llm.close()
    # random weights: near-ties may flip, so the logits themselves are compared (relative to their spread)
    assert np.abs(got - want).max() / want.std() < 0.02 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.gguf
def test_llama_cpp_runs_a_base_model_run(tmp_path, llama_cpp):
    """A LoRA run on a ChatML Llama base, exported through export_hf (merged): llama.cpp computes our logits."""
    from bases import llama_base, run_all, write_project
    from persona_lm.train.checkpoint import load_model

    d = run_all(write_project(tmp_path, {"base": {"model": str(llama_base(tmp_path / "base"))}}))
    out = export_gguf(d / "models/final", tmp_path / "gguf" / "rosie.gguf")
    model, tok, _ = load_model(d / "models/final")
    llm = load(llama_cpp, out, 128)
    prompt = tok.prompt(TURNS)
    assert llm.tokenize(tok.hf.decode(prompt).encode(), add_bos=False, special=True) == prompt
    llm.close()
    ours, theirs, top1, diff = agreement(llama_cpp, out, model, tok, 128)
    print(f"base run f16: greedy {sum(a == b for a, b in zip(ours, theirs))}/{NEW_TOKENS}, top-1 {top1:.3f}, "
          f"max |logit diff| / std {diff:.4f}")
    # a random base barely trained: near-ties remain (greedy paths may part there), so the logits are compared
    assert diff < 0.02 and top1 >= 0.9 and theirs[:4] == ours[:4]
    modelfile = (out.parent / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
