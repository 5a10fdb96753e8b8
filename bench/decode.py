"""Batch-1 decode speed with and without the KV cache, fp32, bf16 and int8 weights (persona_lm.quant).

    .venv/bin/python bench/decode.py [--configs default,core] [--repeat 3] [--threads 2] [--new 256] [--model DIR]

Each run is `generate(..., temperature=0, ignore_end=True)`: greedy, a 32-token prompt, exactly --new tokens
(the end marker is ignored so a random model cannot stop early), text streamed and detokenised as in chat.
tokens/s = new tokens / wall time including the prompt's prefill. With block_size 256, 32 + 256 tokens
overflow the context once, so each run also pays one re-window (a 128-token prefill), as a long reply would.
`step tok/s` is the cached decode loop alone: 1 / median time between tokens of Decoder (no prefill, no
re-window, no detokenisation), the figure that per-step optimisations move.

Weights are random (speed does not depend on them); --model adds a trained model folder (models/final) with a
chat prompt. Other jobs on a small machine make timings noisy, so each figure is the best of --repeat runs and
the load average is printed with them. For bf16 the script also says whether greedy output equals fp32's and
the top-1 agreement when both read fp32's greedy sequence (teacher forcing); so does int8. Only a trained model
makes that comparison meaningful: a randomly initialised one mostly repeats one token (the `distinct` column).

Weights-read bound: a batch-1 decode step reads every linear weight and the output projection once (embedding
rows, norms and the KV cache are small beside them), so tokens/s <= memory bandwidth / those bytes (`weights MB`,
in the row's dtype; int8 counts its scales too). The bandwidth is measured here: the best of 5 sums of a 256 MiB
fp32 tensor, i.e. the rate at which these threads read main memory. A model whose weights fit in the last-level
cache (32 MiB on the 2-core dev box) can beat that bound; the `bound` column is then not a limit.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from persona_lm.generate import Decoder, generate
from persona_lm.model import GPT, GPTConfig
from persona_lm.quant import Int8Linear, quantize_int8
from persona_lm.tokenizer import ChatTokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default": GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=128),
    "core": GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_kv_head=6, n_embd=384),  # 13.9M
}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def tokenizer(vocab_size: int) -> ChatTokenizer:
    """A real tokenizer so that detokenisation is timed too; ids past its vocabulary decode to nothing."""
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/sample/corpus").glob("*.txt"))]
    return ChatTokenizer(train_tokenizer(texts, "bpe", vocab_size, []))


def random_model(name: str, n_prompt: int):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    return GPT(cfg).eval(), tokenizer(cfg.vocab_size), prompt


def trained_model(path: str):
    from persona_lm.train.checkpoint import load_model
    model, tok, _ = load_model(Path(path))
    return model, tok, tok.prompt([{"from": "human", "value": "Hi! How was your day? Tell me about it."}])


def bandwidth() -> float:
    """Main-memory read bandwidth in bytes/s: the best of 5 sums of a 256 MiB fp32 tensor (far beyond any cache)."""
    x = torch.ones(64 << 20)
    x.sum()  # warm-up: pages touched, threads started
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the linear layers of the blocks and the output projection (biases
    and int8 scales included); the emotion head is read once per reply, not per token."""
    total = 0
    for m in model.modules():
        if m is model.emotion_head:
            continue
        if isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in (m.weight, m.bias) if p is not None)
        elif isinstance(m, Int8Linear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total


def run(model, tok, prompt, new, use_cache, repeat):
    results = [generate(model, tok, prompt, max_new_tokens=new, temperature=0, ignore_end=True, use_cache=use_cache)
               for _ in range(repeat)]
    speeds = [r.n_new / r.seconds for r in results]
    return max(speeds), statistics.median(speeds), results[0].ids


def step_speed(model, prompt, new, repeat) -> float:
    best = 0.0
    for _ in range(repeat):
        gaps, t = [], time.perf_counter()
        for _ in Decoder(model, prompt, max_new_tokens=new, temperature=0):
            now = time.perf_counter()
            gaps.append(now - t)
            t = now
        best = max(best, 1 / statistics.median(gaps[1:]))
    return best


@torch.inference_mode()
def agreement(a, b, prompt, ids) -> float:
    """Top-1 agreement of two models reading the same sequence (its last block_size tokens)."""
    x = torch.tensor([(prompt + ids)[-a.cfg.block_size:]])
    la, lb = a(x)[0].argmax(-1), b(x)[0].argmax(-1)
    return (la == lb).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default,core")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repeat-uncached", type=int, default=1, help="uncached runs are slow: fewer repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--no-uncached", action="store_true")
    ap.add_argument("--model", help="also time a trained model folder (e.g. models/final)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; {load()}")
    bw = bandwidth()
    print(f"memory bandwidth (read, {torch.get_num_threads()} threads): {bw / 1e9:.1f} GB/s")
    print(f"{'config':8} {'params':>7} {'dtype':5} {'cache':5} {'best tok/s':>10} {'median':>7} {'step tok/s':>10} "
          f"{'weights MB':>10} {'bound tok/s':>11} {'distinct':>8}  notes")
    cases = [(name, lambda name=name: random_model(name, args.prompt)) for name in args.configs.split(",") if name]
    if args.model:
        cases.append(("trained", lambda: trained_model(args.model)))
    for name, make in cases:
        fp32, tok, prompt = make()
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        int8 = quantize_int8(copy.deepcopy(fp32))
        params = f"{fp32.param_counts()['total'] / 1e6:.1f}M"
        ref = None
        for dtype, model in (("fp32", fp32), ("bf16", bf16), ("int8", int8)):
            wb = weight_bytes(model)
            for use_cache in (True, False):
                if not use_cache and args.no_uncached:
                    continue
                repeat = args.repeat if use_cache else args.repeat_uncached
                best, med, ids = run(model, tok, prompt, args.new, use_cache, repeat)
                step = f"{step_speed(model, prompt, args.new, repeat):10.1f}" if use_cache else f"{'-':>10}"
                note = ""
                if ref is None:
                    ref = ids
                elif ids != ref:
                    same = next((i for i, (x, y) in enumerate(zip(ids, ref)) if x != y), len(ids))
                    note = f"differs from fp32 cached after {same} tokens"
                else:
                    note = "same tokens as fp32 cached"
                if dtype != "fp32" and use_cache:
                    note += f"; teacher-forced top-1 agreement {agreement(fp32, model, prompt, ref):.1%}"
                print(f"{name:8} {params:>7} {dtype:5} {'yes' if use_cache else 'no':5} {best:10.1f} {med:7.1f} {step} "
                      f"{wb / 1e6:10.1f} {bw / wb:11.1f} {len(set(ids)):8}  {note}", flush=True)
    print(load())


if __name__ == "__main__":
    main()
