"""Tiny random pretrained-model folders, made with transformers the way a Hub repo is laid out: config.json,
model.safetensors, tokenizer files with a chat template. They stand in for SmolLM2 / Qwen / Llama-style bases
(ChatML template, Llama architecture) and GPT-2-style ones (no chat template, no pad token) in the tests.
Also a tiny project (what the data stages would have written) and helpers to run the training stages on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMOTIONS = ["neutral", "joy", "sadness"]
STAGES = ["train_tokenizer", "tokenize_corpus", "pretrain", "finetune", "train_emotion", "evaluate"]

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello there, how are you today?", "I am fine, thank you very much.", "What a lovely morning for a walk.",
         "Rosie likes tea and long stories about the sea.", "Tell me something nice, please!",
         "*waves* Hi friend, I missed you so much.", "The little robot danced on the desk all day long."]


def tokenizer(chat_template: str | None, specials: list[str], eos: str, pad: str | None, vocab: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    hf.chat_template = chat_template
    return hf


def llama_base(folder: Path, seed: int = 0, tie: bool = False, **config) -> Path:
    """A ChatML Llama-architecture base (SmolLM2 / Qwen2.5 style): eos <|im_end|>, pad <|endoftext|>."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_tok = tokenizer(CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, eos_token_id=hf_tok.eos_token_id, bos_token_id=None,
                      pad_token_id=hf_tok.pad_token_id, **config)
    model = LlamaForCausalLM(cfg)
    _spread(model)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def gpt2_base(folder: Path, seed: int = 0) -> Path:
    """A GPT-2-architecture base with no chat template and no pad token, as GPT-2 itself."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_tok = tokenizer(None, ["<|endoftext|>"], "<|endoftext|>", None)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(hf_tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    _spread(model)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def _spread(model) -> None:
    """Larger random weights, so that greedy choices are never near-ties and replies are not all one token."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)


CORPUS = [f"Story {i}. The little robot number {i} rolled to the garden and counted {i % 7} bright flowers, "
          "then it told its friend about the sea." for i in range(40)]
REPLIES = [("Hello there!", "*waves* Hi friend, I am Rosie!", "joy"), ("I lost my keys.", "Oh no, that is sad.", "sadness"),
           ("What is your name?", "I am Rosie, your desk buddy.", "neutral"), ("Tell me a joke.", "Why did the robot nap? *giggles*", "joy"),
           ("It rains again.", "Rain makes me a bit blue.", "sadness"), ("Good night!", "Sleep well, friend.", "neutral")]


def write_project(d: Path, params: dict) -> Path:
    """A project folder holding what the data stages would have written: a corpus and ShareGPT splits; params
    for a few steps of each phase, LoRA r=8, updated section by section from `params`."""
    import polars as pl
    import yaml

    (d / "data/interim").mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": [str(i) for i in range(len(CORPUS))], "source": ["s"] * len(CORPUS), "text": CORPUS,
                  "split": ["val" if i % 8 == 0 else "train" for i in range(len(CORPUS))]}
                 ).write_parquet(d / "data/interim/corpus.parquet")
    (d / "data/processed/sharegpt").mkdir(parents=True, exist_ok=True)
    for split, reps in (("train", 4), ("val", 1)):
        rows = [{"id": f"{split}-{k}-{i}", "source": "templates",
                 "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "emotions": [e]}
                for k in range(reps) for i, (q, a, e) in enumerate(REPLIES)]
        (d / f"data/processed/sharegpt/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    phase = {"batch_size": 4, "warmup_iters": 2, "eval_interval": 6, "eval_iters": 2, "ckpt_interval": 3,
             "device": "cpu"}
    base = {"seed": 7, "persona": {"emotions": EMOTIONS},
            "model": {"block_size": 256},
            "lora": {"r": 8, "alpha": 16},
            "pretrain": {**phase, "max_iters": 6}, "finetune": {**phase, "max_iters": 12, "replay": 0.1},
            "emotion": {**phase, "max_iters": 6},
            "eval": {"max_new_tokens": 8, "prompts": ["Hi!"], "memory_gaps": [1]}}
    for section, values in params.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    (d / "params.yaml").write_text(yaml.safe_dump(base))
    return d


def env(d: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HOME": str(d / "hf"),
            "HF_HUB_OFFLINE": "1"}


def stage(d: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / f"stages/{name}.py")], cwd=d, env=env(d), capture_output=True,
                          text=True, timeout=600)


def run_all(d: Path) -> Path:
    for name in STAGES:
        proc = stage(d, name)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return d
