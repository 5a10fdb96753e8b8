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
   through the base path (BaseLM, peft): LoRA r=16 and full fine-tuning, tokens/s and peak RSS.
3. The architectures of SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B (their published config.json shapes), with
   random weights, since speed and memory do not depend on the values and this machine cannot download them:
   LoRA r=16 fine-tuning (batch 8 x 256 tokens, --arch-iters steps) through the same base path, tokens/s and
   peak RSS, then cached batch-1 decoding of 64 tokens after a 64-token prompt. With --no-archs the script
   extrapolates them from the 30M base by parameter count instead (~6 FLOPs per parameter per token for full
   fine-tuning, ~4 for LoRA, which computes no gradients for the frozen matrices), labelled as estimates.
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
# Published config.json values (architecture only; the weights are random here).
ARCHS = {
    "SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                         head_dim=64),
}


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
    p = params_for(work, lora={"r": cfg.get("r", 0), "alpha": 2.0 * cfg.get("r", 0) or 16.0, **cfg.get("lora", {})})
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
    loss = evaluation.assistant_loss(model, tok, [tok.render(with_system(p, row))[:2] for row in val])["loss"]
    return {"tokens_per_s": steady(live), "trainable": trainable,
            "params": sum(t.numel() for t in model.parameters()), "val_assistant_loss": loss}


SMALL = dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=True)


def run_base(cfg: dict) -> dict:
    """LoRA or full fine-tuning of a random Llama-architecture base through the base-model path; with
    `decode`, also batch-1 cached generation speed."""
    import time

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from persona_lm import base, lora
    from persona_lm.generate import generate
    from persona_lm.params import Base
    from persona_lm.tokenizer import TemplateTokenizer
    from persona_lm.train.loop import train

    work = Path(cfg["work"])
    folder = work / cfg["arch_name"]
    if not folder.exists():
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(work / "base-tokenizer.json")),
                                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
        hf_tok.chat_template = CHATML
        torch.manual_seed(0)
        arch = dict(cfg["arch"])
        config = AutoConfig.for_model(arch.pop("model_type"), max_position_embeddings=1024, **arch)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder)
        hf_tok.save_pretrained(folder)
        del model
    p = params_for(work, base={"model": str(folder)},
                   lora={"r": cfg["r"], "alpha": 2.0 * cfg["r"] or 16.0, **cfg.get("lora", {})})
    _, record = base.resolve(Base(model=str(folder)))
    tok = TemplateTokenizer.build(folder, "text", EMOTIONS, record)
    model = base.new(record, tok, len(EMOTIONS), 256)
    model.train()
    lora.apply(model, p, "finetune", p.seed)
    model.emotion_head.requires_grad_(False)
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    live = work / f"live-{cfg['name']}"
    train(model, p.finetune.model_copy(update={"max_iters": cfg["iters"], "eval_iters": 1}), chat_batches(p, tok, 256),
          work / f"ck-{cfg['name']}", "b", {"live_dir": live}, "finetune")
    out = {"tokens_per_s": steady(live), "trainable": trainable, "params": model.param_counts()["base"]}
    if cfg.get("decode"):
        model.merge()
        model.eval()
        prompt = tok.encode(" ".join(["the little robot counted flowers"] * 20))[:64]
        t0 = time.perf_counter()
        r = generate(model, tok, prompt, max_new_tokens=64, temperature=0, ignore_end=True)
        out["decode_tokens_per_s"] = r.n_new / (time.perf_counter() - t0)
    return out


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
    ap.add_argument("--arch-iters", type=int, default=4, help="LoRA steps on each published architecture")
    ap.add_argument("--no-archs", action="store_true", help="extrapolate the published architectures instead")
    ap.add_argument("--lora-dropout", type=float, default=None, help="lora.dropout (default: params' default)")
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
        common = {"work": str(work), "threads": args.threads,
                  "lora": {} if args.lora_dropout is None else {"dropout": args.lora_dropout}}
        subprocess_run({**common, "kind": "own", "mode": "pretrain", "iters": args.pretrain_iters})
        rows = []
        for name, r in (("13.9M full fine-tuning", 0), ("13.9M LoRA r=16", 16)):
            rows.append((name, subprocess_run({**common, "kind": "own", "mode": "finetune", "name": f"own{r}",
                                               "r": r, "iters": args.iters})))
        for name, r in (("30M Llama base, LoRA r=16", 16), ("30M Llama base, full fine-tuning", 0)):
            rows.append((name, subprocess_run({**common, "kind": "base", "name": f"base{r}", "r": r, "arch": SMALL,
                                               "arch_name": "llama-30m", "iters": max(20, args.iters // 2)})))
        if not args.no_archs:
            for arch, values in ARCHS.items():
                rows.append((f"{arch} architecture, LoRA r=16", subprocess_run({
                    **common, "kind": "base", "name": arch, "r": 16, "arch": values, "arch_name": arch,
                    "iters": args.arch_iters, "decode": True})))
    print(f"{'run':40} {'tok/s':>8} {'peak RSS MB':>12} {'trainable':>12} {'params':>14} {'val loss':>9} "
          f"{'decode tok/s':>13}")
    for name, r in rows:
        loss = f"{r['val_assistant_loss']:.4f}" if "val_assistant_loss" in r else "-"
        decode = f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else "-"
        print(f"{name:40} {r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>12} {r['trainable']:>12,} {r['params']:>14,} "
              f"{loss:>9} {decode:>13}")
    if args.no_archs:
        lora_rate, full_rate, n30 = rows[2][1]["tokens_per_s"], rows[3][1]["tokens_per_s"], rows[2][1]["params"]
        print("\nextrapolated by parameter count from the 30M base (estimates, not measurements):")
        print(f"{'base':24} {'params':>14} {'LoRA tok/s':>11} {'full tok/s':>11}")
        for name, n in (("SmolLM2-135M", 134_515_008), ("Qwen2.5-0.5B", 494_032_768), ("Llama-3.2-1B", 1_235_814_400)):
            print(f"{name:24} {n:>14,} {lora_rate * n30 / n:>11.0f} {full_rate * n30 / n:>11.0f}")
    print("tok/s: the training loop's steady rate; 1,000 steps of batch 8 x 256 tokens = 2.0M tokens")


if __name__ == "__main__":
    main()
