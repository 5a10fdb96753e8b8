"""LoRA against full fine-tuning, and what a pretrained base costs on this machine.

    .venv/bin/python bench/lora.py [--pretrain-iters 150] [--iters 60] [--threads 0]

Needs the data stages' outputs (`make repro` or `dvc repro build_sharegpt`) and ../shared/data for the
pretraining text. Each run is a fresh subprocess, so its peak RSS is its own.

1. Our 13.9M config (6 layers, 6 heads, 384 dims, block 256, vocab 8192): pretrained here for --pretrain-iters
   steps on TinyStories, then the finetune phase on the ShareGPT train split for --iters steps, once training
   all weights and once with LoRA r=16 (alpha 32) on the attention and MLP projections. Reported: the loop's
   steady tokens/s, peak RSS, trainable parameters, and the assistant loss on the ShareGPT val split after the
   same number of steps.
2. A ~30M-parameter random Llama base (8 layers, 512 dims, 8 heads / 4 kv heads, MLP 1408, vocab 32000) loaded
   through the base path (BaseLM, peft): LoRA r=16 and full fine-tuning, tokens/s and peak RSS. From its measured
   rate the script extrapolates SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B by parameter count (training costs
   ~6 FLOPs per parameter per token with full fine-tuning, ~4 with LoRA: no weight gradients for the frozen
   matrices) and their fp32 weights; these are estimates, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "corpus" / "tinystories_train_head.txt"
SHAREGPT = ROOT / "data" / "processed" / "sharegpt"
EMOTIONS = ["neutral", "joy", "sadness", "anger", "fear", "surprise", "disgust", "love", "curiosity"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BASES = {"SmolLM2-135M-Instruct": 134_515_008, "Qwen2.5-0.5B-Instruct": 494_032_768,
         "Llama-3.2-1B-Instruct": 1_235_814_400}


def steady(live: Path) -> float:
    """Median of the loop's own 10-step token rates (as bench/train_throughput.py)."""
    lines = (live / "plots" / "metrics" / "tokens_per_s.tsv").read_text().split("\n")[1:]
    return statistics.median(float(line.split("\t")[-1]) for line in lines if line)


def params_for(work: Path, **overrides):
    from persona_lm.params import parse_params

    base = {"persona": {"emotions": EMOTIONS},
            "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
            "finetune": {"batch_size": 8, "eval_interval": 10_000, "eval_iters": 1, "ckpt_interval": 10_000,
                         "device": "cpu", "precision": "fp32", "replay": 0.0}}
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v}
    return parse_params(base)


def chat_batches(p, tok, block: int):
    from persona_lm.io import read_jsonl
    from persona_lm.train.batches import ChatBatches
    from persona_lm.train.phase import chat_examples

    rows = {s: [r for _, r in read_jsonl(SHAREGPT / f"{s}.jsonl")] for s in ("train", "val")}
    return ChatBatches(chat_examples(p, tok, rows["train"]), chat_examples(p, tok, rows["val"]), None, 0.0,
                       p.finetune.batch_size, block, tok.pad, seed=p.seed)


def run_own(cfg: dict) -> dict:
    """Pretrain (cached in the work folder) or finetune the 13.9M model."""
    import torch

    from persona_lm import evaluation, lora
    from persona_lm.io import read_jsonl
    from persona_lm.tokenizer import ChatTokenizer
    from persona_lm.train import checkpoint
    from persona_lm.train.batches import CorpusBatches
    from persona_lm.train.loop import train
    from persona_lm.train.phase import new_model, with_system

    work = Path(cfg["work"])
    tok = ChatTokenizer.from_file(work / "tokenizer.json")
    p = params_for(work, lora={"r": cfg.get("r", 0), "alpha": 2.0 * cfg.get("r", 0) or 16.0})
    if cfg["mode"] == "pretrain":
        text = STORIES.read_text().split("<|endoftext|>")
        ids = torch.tensor([i for doc in tok.encode_batch(text) for i in doc + [tok.eot]])
        model = new_model(p, tok)
        phase = p.pretrain.model_copy(update={"max_iters": cfg["iters"], "batch_size": 8, "eval_interval": cfg["iters"],
                                              "eval_iters": 1, "ckpt_interval": 10_000, "device": "cpu"})
        train(model, phase, CorpusBatches(ids, ids[:4096], None, 0.0, 8, 256, p.seed), work / "ck-pre", "b",
              {"live_dir": work / "live-pre"}, "pretrain")
        checkpoint.save_model_dir(work / "pretrained", model, work / "tokenizer.json",
                                  {"emotions": EMOTIONS, "persona": "Rosie", "system_prompt": p.persona.system_prompt})
        return {}
    model, _, _ = checkpoint.load_model(work / "pretrained")
    model.train()
    lora.apply(model, p, "finetune", p.seed)
    model.emotion_head.requires_grad_(False)
    torch.manual_seed(p.seed)
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    phase = p.finetune.model_copy(update={"max_iters": cfg["iters"]})
    live = work / f"live-{cfg['name']}"
    train(model, phase, chat_batches(p, tok, 256), work / f"ck-{cfg['name']}", "b", {"live_dir": live}, "finetune")
    lora.merge(model)
    model.eval()
    val = [row for _, row in read_jsonl(SHAREGPT / "val.jsonl")][:400]
    loss = evaluation.assistant_loss(model, tok, [tok.render(with_system(p, row))[:2] for row in val])
    return {"tokens_per_s": steady(live), "trainable": trainable,
            "params": sum(t.numel() for t in model.parameters()), "val_assistant_loss": loss}


def run_base(cfg: dict) -> dict:
    """LoRA or full fine-tuning of a random ~30M Llama base through the base-model path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    from persona_lm import base, lora
    from persona_lm.params import Base
    from persona_lm.tokenizer import TemplateTokenizer
    from persona_lm.train.loop import train

    work = Path(cfg["work"])
    folder = work / "llama-30m"
    if not folder.exists():
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(work / "base-tokenizer.json")),
                                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
        hf_tok.chat_template = CHATML
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                             max_position_embeddings=1024, tie_word_embeddings=True))
        model.save_pretrained(folder)
        hf_tok.save_pretrained(folder)
    p = params_for(work, base={"model": str(folder)}, lora={"r": cfg["r"], "alpha": 2.0 * cfg["r"] or 16.0})
    _, record = base.resolve(Base(model=str(folder)))
    tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
    model = base.new(record, tok, len(EMOTIONS), 256)
    model.train()
    lora.apply(model, p, "finetune", p.seed)
    model.emotion_head.requires_grad_(False)
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    live = work / f"live-{cfg['name']}"
    train(model, p.finetune.model_copy(update={"max_iters": cfg["iters"]}), chat_batches(p, tok, 256),
          work / f"ck-{cfg['name']}", "b", {"live_dir": live}, "finetune")
    return {"tokens_per_s": steady(live), "trainable": trainable, "params": model.param_counts()["base"]}


def subprocess_run(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-iters", type=int, default=150)
    ap.add_argument("--iters", type=int, default=60, help="finetune steps per run (batch 8 x block 256)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import torch

        cfg = json.loads(args.one)
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        result = (run_base if cfg["kind"] == "base" else run_own)(cfg)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))
        return
    if not STORIES.exists() or not (SHAREGPT / "train.jsonl").exists():
        sys.exit(f"needs {STORIES} and {SHAREGPT} (run `make repro` first)")
    from persona_lm.io import read_jsonl
    from persona_lm.tokenizer import iter_texts, save_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = STORIES.read_text().split("<|endoftext|>") + list(iter_texts(r for _, r in read_jsonl(SHAREGPT / "train.jsonl")))
        save_tokenizer(train_tokenizer(texts, "bpe", 8192, EMOTIONS), work / "tokenizer.json")
        save_tokenizer(train_tokenizer(texts, "bpe", 8192, []), work / "base-tokenizer.json")
        common = {"work": str(work), "threads": args.threads}
        subprocess_run({**common, "kind": "own", "mode": "pretrain", "iters": args.pretrain_iters})
        rows = []
        for name, r in (("13.9M full fine-tuning", 0), ("13.9M LoRA r=16", 16)):
            rows.append((name, subprocess_run({**common, "kind": "own", "mode": "finetune", "name": f"own{r}",
                                               "r": r, "iters": args.iters})))
        for name, r in (("30M Llama base, LoRA r=16", 16), ("30M Llama base, full fine-tuning", 0)):
            rows.append((name, subprocess_run({**common, "kind": "base", "name": f"base{r}", "r": r,
                                               "iters": max(20, args.iters // 2)})))
    print(f"{'run':36} {'tok/s':>8} {'peak RSS MB':>12} {'trainable':>12} {'params':>12} {'val loss':>9}")
    for name, r in rows:
        loss = f"{r['val_assistant_loss']:.4f}" if "val_assistant_loss" in r else "-"
        print(f"{name:36} {r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>12} {r['trainable']:>12,} {r['params']:>12,} "
              f"{loss:>9}")
    lora_rate, full_rate = rows[2][1]["tokens_per_s"], rows[3][1]["tokens_per_s"]
    n30 = rows[2][1]["params"]
    print("\nextrapolated by parameter count from the 30M base (estimates, not measurements):")
    print(f"{'base':24} {'params':>14} {'LoRA tok/s':>11} {'full tok/s':>11} {'fp32 weights GB':>16}")
    for name, n in BASES.items():
        print(f"{name:24} {n:>14,} {lora_rate * n30 / n:>11.0f} {full_rate * n30 / n:>11.0f} {4 * n / 1e9:>16.2f}")
    print("(1,000 steps of batch 8 x 256 tokens = 2.0M tokens: divide by the rate for seconds)")


if __name__ == "__main__":
    main()
