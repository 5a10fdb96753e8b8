"""Weight memory on a trained model: recall after a context wipe, what it costs the model, and what a write costs.

    .venv/bin/python bench/weight_memory.py [--model models/final] [--seeds 0 1 2] [--variants none ewc replay both]
        [--data full|answers|distil] [--facts 1 5 20] [--curve N] [-S steps=80 -S lr=0.003 ...]

Run from the project root after `make repro` (params.yaml, data/processed/sharegpt, models/final with its
fisher.safetensors). For each seed, 5 facts (user_facts.make_facts) are taught in one write (memory.teach, the
persona's system prompt first, as chat puts it), then asked with their held-out `test_questions`, each in a fresh
conversation (probes.fact_recall "wiped", greedy), and after the facts were pushed out of the window ("beyond_window").
First, the same scenarios without memory (in_context: the facts in the conversation, the ceiling). Before and after: the identity rate (probes.identity) and the
assistant loss on the ShareGPT val split (rendered as the finetune phase renders it). Variants: `none` (no EWC,
no replay), `ewc` (weight_memory.ewc_lambda), `replay` (weight_memory.replay_share), `both`. `-S key=value`
overrides weight_memory params for every variant.

--data chooses the training conversations: `full` (memory.conversations: every way memory.questions asks a fact
-> its answer; a fact no pattern reads, restated, as the answer to "what do you remember about me?"), `answers`
(the fact's train questions -> answer only), `distil` (as full, but each answer is the model's own reply to the
train question with the fact told in context, when that reply recalls the fact; else the template answer). Anchor
conversations (weight_memory.anchors) are added to each by memory.teach.

--facts K... teaches the first K facts of each seed in one write, for each K (default 5). --curve N teaches the first
1..N (each write re-learns all so far, as /remember does) and reports the val loss and identity after each: the
forgetting curve of each variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from persona_lm import memory, probes  # noqa: E402
from persona_lm.params import load_params, parse_params  # noqa: E402
from persona_lm.train import phase  # noqa: E402
from persona_lm.train.batches import IGNORE, crop, pad_sequences  # noqa: E402
from persona_lm.train.checkpoint import load_model  # noqa: E402
from persona_lm.user_facts import make_facts, recalled  # noqa: E402

VARIANTS = {"none": (False, False), "ewc": (True, False), "replay": (False, True), "both": (True, True)}


@torch.no_grad()
def val_loss(model, examples, pad_id: int, batch: int = 32) -> float:
    """Mean assistant-token cross-entropy (nats) over `examples`, every token weighted alike."""
    total, count, block = 0.0, 0, model.cfg.block_size
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch):
        x, y = pad_sequences([crop(ids, mask, block) for ids, mask, _ in examples[i:i + batch]], pad_id)
        logits, _ = model(x.to(device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += int((y != IGNORE).sum())
    return total / count


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def distilled(prober, facts) -> tuple[list[list[dict]], int]:
    """memory.conversations with each answer replaced by the model's reply given the fact in context, when it
    recalls the fact. Returns (conversations, how many answers were the model's own)."""
    convs = memory.conversations([f.statement for f in facts])
    asked = [(f, q) for f in facts for q in f.train_questions]
    ctx = [[{"from": "human", "value": f.statement}, {"from": "gpt", "value": "Got it, I'll remember that!"},
            {"from": "human", "value": q}] for f, q in asked]
    own = {}
    for (f, q), r in zip(asked, prober.reply_all(ctx, 24)):
        if r is not None and recalled(r.text, f):
            own[q] = r.text.strip()
    for c in convs:
        if c[0]["value"] in own:
            c[1] = {"from": "gpt", "value": own[c[0]["value"]]}
    return convs, len(own)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/final")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--data", choices=["full", "answers", "distil"], default="full")
    ap.add_argument("--facts", type=int, nargs="+", default=[5], help="facts taught in one write (each K in turn)")
    ap.add_argument("--curve", type=int, default=0, help="teach 1..N facts per seed and report the forgetting curve")
    ap.add_argument("-S", dest="set", action="append", default=[], help="weight_memory.KEY=VALUE override")
    ap.add_argument("--out", help="write every run, replies included, as JSON to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    p = load_params()
    overrides = {k: json.loads(v) if v[:1] in "0123456789-[{tfn" else v for k, v in (s.split("=", 1) for s in args.set)}
    base_cfg = parse_params({"weight_memory": {**p.weight_memory.model_dump(), **overrides}}).weight_memory
    model, tok, config = load_model(Path(args.model))
    system = config.get("system_prompt")
    fisher = memory.load_fisher(Path(args.model), model, print)
    rows = memory.read_rows()
    val = phase.chat_examples(p, tok, phase.sharegpt_rows("val"))
    prober = probes.Prober(model, tok, system, config.get("emotions") or [], p.eval.max_new_tokens)

    def measure() -> dict:
        return {"identity": probes.identity(prober, p.persona)["rate"], "val_loss": val_loss(model, val, tok.pad)}

    t0 = time.perf_counter()
    before = measure()
    print(f"model {args.model}: identity {before['identity']:.3f}, val loss {before['val_loss']:.4f} "
          f"(measured in {time.perf_counter() - t0:.1f} s); Fisher {'yes' if fisher else 'no'}; "
          f"{len(rows)} replay rows; weight_memory {base_cfg.model_dump()}", flush=True)
    out = {"before": before, "params": base_cfg.model_dump(), "data": args.data, "variants": {}}
    counts = list(range(1, args.curve + 1)) if args.curve else args.facts
    out["without_memory"] = {}
    for k in counts:  # the model as trained, no adapter: each scenario's recall (in context is the ceiling)
        rates = {s: statistics.mean(probes.fact_recall(prober, make_facts(max(*args.facts, args.curve), seed)[:k], s)
                                    ["rate"] for seed in args.seeds) for s in probes.SCENARIOS}
        out["without_memory"][k] = rates
        print(f"== without memory, {k} facts: " + ", ".join(f"{s} {r:.3f}" for s, r in rates.items()), flush=True)
    for variant in args.variants:
        use_ewc, use_replay = VARIANTS[variant]
        cfg = base_cfg.model_copy(update={"ewc_lambda": base_cfg.ewc_lambda if use_ewc else 0.0,
                                          "replay_share": base_cfg.replay_share if use_replay else 0.0})
        runs = []
        for seed in args.seeds:
            all_facts = make_facts(max(*args.facts, args.curve), seed)
            for k in counts:
                facts = all_facts[:k]
                convs, own = None, None
                if args.data == "answers":
                    convs = [[{"from": "human", "value": q}, {"from": "gpt", "value": f.answer}]
                             for f in facts for q in f.train_questions]
                elif args.data == "distil":
                    convs, own = distilled(prober, facts)
                report = []
                rss0 = peak_rss_mb()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                memory.teach(model, tok, [f.statement for f in facts], cfg, fisher if use_ewc else None,
                             rows if use_replay else None, system=system, seed=seed, report=report, convs=convs)
                run = {"seed": seed, "facts": k, "seconds": report[0].seconds, "loss": report[0].loss,
                       "ewc": report[0].ewc, "peak_rss_mb": peak_rss_mb(), "rss_rise_mb": peak_rss_mb() - rss0}
                if torch.cuda.is_available():
                    run["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                if own is not None:
                    run["distilled_answers"] = own
                wiped = probes.fact_recall(prober, facts, "wiped")
                train_q = prober.reply_all([[{"from": "human", "value": q}] for f in facts for q in f.train_questions],
                                           probes.RECALL_TOKENS)
                pairs = [(f, q) for f in facts for q in f.train_questions]
                run["recall"] = wiped["rate"]
                run["recall_beyond_window"] = probes.fact_recall(prober, facts, "beyond_window")["rate"]
                run["recall_train_questions"] = sum(recalled(r.text, f) for (f, _), r in zip(pairs, train_q)) / len(pairs)
                run.update(measure())
                run["replies"] = [[r.get("question"), r.get("reply"), r.get("passed")] for r in wiped["results"]]
                run["train_replies"] = [[q, r.text, recalled(r.text, f)] for (f, q), r in zip(pairs, train_q)]
                memory.detach(model)
                runs.append(run)
                print(json.dumps({"variant": variant, **{k2: (round(v, 4) if isinstance(v, float) else v)
                                                         for k2, v in run.items() if "replies" not in k2}}), flush=True)
        out["variants"][variant] = runs
        for k in sorted({r["facts"] for r in runs}):
            last = [r for r in runs if r["facts"] == k]
            print(f"== {variant}, {k} facts: recall {statistics.mean(r['recall'] for r in last):.3f} "
                  f"(beyond the window {statistics.mean(r['recall_beyond_window'] for r in last):.3f}) "
                  f"(train questions {statistics.mean(r['recall_train_questions'] for r in last):.3f}), "
                  f"identity {before['identity']:.3f} -> {statistics.mean(r['identity'] for r in last):.3f}, "
                  f"val loss {before['val_loss']:.4f} -> {statistics.mean(r['val_loss'] for r in last):.4f}, "
                  f"write {statistics.mean(r['seconds'] for r in last):.1f} s, "
                  f"peak RSS {max(r['peak_rss_mb'] for r in last):.0f} MB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
