"""`persona-lm` console script: one subcommand per user-facing tool; heavy imports stay inside each."""

from __future__ import annotations

import argparse
import json
import sys

from persona_lm.errors import PersonaError


def _transcript(args: argparse.Namespace) -> int:
    from persona_lm.data.transcripts import read_transcript

    for path in args.files:
        for cue in read_transcript(path):
            print(json.dumps({"start": cue.start, "end": cue.end, "text": cue.text}, ensure_ascii=False))
    return 0


def _sharegpt_check(args: argparse.Namespace) -> int:
    from persona_lm.data.sharegpt import read_sharegpt
    from persona_lm.errors import InputError

    bad = 0
    for path in args.files:
        try:
            got = read_sharegpt(path)
        except InputError as e:
            print(e)
            bad += 1
            continue
        for line in got.report():
            print(line)
        bad += bool(got.refused)
        print(f"{path}: {got.summary()}")
    return 1 if bad else 0


def _messages(args: argparse.Namespace) -> int:
    """The rows import_messages would build from these exports: JSON lines on stdout, its counts on stderr."""
    from pydantic import ValidationError

    from persona_lm.data.messages import import_messages
    from persona_lm.params import Messages, format_error

    try:
        cfg = Messages.model_validate({
            "exports": [{"path": path, "format": args.format, "me": args.me} for path in args.files],
            "region": args.region, "scrub_pii": not args.no_scrub,
            **({"gap_minutes": args.gap_minutes} if args.gap_minutes is not None else {}),
        })
    except ValidationError as e:
        raise PersonaError("\n".join(format_error(err, "persona-lm messages") for err in e.errors())) from None
    result = import_messages(cfg)
    for row in result.rows:
        print(json.dumps(row, ensure_ascii=False))
    for line in result.summary():
        print(line, file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from persona_lm.chat import main as chat

    return chat(args.model, user=args.user, memory_dir=args.memory, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                seed=args.seed, dtype=args.dtype)


def _remember(args: argparse.Namespace) -> int:
    """Teach one fact to a user's weight memory: the model learns it now, and chat and serve recall it later."""
    from pathlib import Path

    import torch

    from persona_lm.memory import Memory, load_config
    from persona_lm.train.checkpoint import load_model

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model, tok, config = load_model(Path(args.model), device="cuda" if torch.cuda.is_available() else "cpu")
    memory = Memory(model, tok, config, Path(args.model), load_config(), Path(args.memory), args.user, say=say)
    replaced, report = memory.remember(args.fact)
    say(f"remembered for {memory.user}: {' '.join(args.fact.split())}"
        + (f" (replaces: {'; '.join(replaced)})" if replaced else "")
        + f"; {len(memory.texts)} fact(s) in memory, learnt in {report.seconds:.1f} s")
    return 0


def _export(args: argparse.Namespace) -> int:
    from persona_lm.export import FORMATS

    if args.quant is not None and args.format != "gguf":
        raise PersonaError(f"--quant only applies to --format gguf, not {args.format}")
    extra = {"quant": args.quant or "f16"} if args.format == "gguf" else {}
    out = FORMATS[args.format](args.model, args.out, persona=args.persona, **extra)
    print(f"wrote {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from persona_lm.server import Limits, Sampling, main as serve

    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, max_open=args.max_open,
                    default_max_tokens=args.max_new_tokens)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty)
    for name, value, low in (("--max-body-bytes", args.max_body_bytes, 1024), ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--max-open", args.max_open, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise PersonaError(f"{name} must be at least {low}, got {value}")
    if args.max_new_tokens > args.max_tokens_limit:
        raise PersonaError(f"--max-new-tokens ({args.max_new_tokens}) exceeds --max-tokens-limit ({args.max_tokens_limit})")
    return serve(args.model, host=args.host, port=args.port, limits=limits, sampling=sampling, memory_dir=args.memory,
                 dtype=args.dtype)


def _tournament(args: argparse.Namespace) -> int:
    from pathlib import Path

    from persona_lm.tournament import run_tournament

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        winner, folder = run_tournament(Path(args.config), restart=args.restart, say=say)
    except KeyboardInterrupt:
        say("tournament interrupted; the same command resumes it")
        return 130
    print((folder / "results.md").read_text(encoding="utf-8"))
    say(f"table: {folder / 'results.md'}, plot: {folder / 'val_loss.png'}, winner's params: {folder / 'winner.yaml'}")
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/final", help="model folder (default: models/final)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="weights: fp32 (default), bf16, or int8 (weight-only, CPU; faster batch-1 decode, see README)")


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=None, help="whose memory (default: your OS user name)")
    p.add_argument("--memory", default="memory", metavar="DIR", help="the private folder memories are kept in "
                   "(default: memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcript", help="a VTT/SRT file -> clean transcript as JSON lines on stdout")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_transcript)

    p = sub.add_parser("sharegpt-check", help="read ShareGPT files as build_sharegpt does: each row it would skip "
                       "(file:line: why) and the fixes it makes; exit 1 when a row or a file is refused")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_sharegpt_check)

    p = sub.add_parser("messages", help="chat exports -> the ShareGPT rows the import_messages stage would build "
                                        "(JSON lines on stdout; counts and drops by reason on stderr)")
    p.add_argument("files", nargs="+", help="WhatsApp/Signal .txt, Telegram result.json, Instagram message_1.json")
    p.add_argument("--me", required=True, help="your display name in the exports: your side becomes the gpt voice")
    p.add_argument("--format", choices=["auto", "whatsapp", "telegram", "signal", "instagram"], default="auto")
    p.add_argument("--gap-minutes", type=float, default=None,
                   help="a longer pause starts a new conversation (default: messages.gap_minutes' default, 240)")
    p.add_argument("--region", default=None, help="ISO 3166 region of phone numbers written without a country code "
                                                  "(default: guessed from the export's language)")
    p.add_argument("--no-scrub", action="store_true", help="keep emails, URLs, phone numbers, IBANs and cards")
    p.set_defaults(func=_messages)

    p = sub.add_parser("export", help="write a model folder as a transformers folder (hf), a peft adapter (peft) "
                                      "or a GGUF file for llama.cpp / Ollama (gguf)")
    p.add_argument("out", help="the folder to write, or the .gguf file (replaced atomically if it holds an earlier "
                               "export)")
    p.add_argument("--format", choices=["hf", "peft", "gguf"], default="hf",
                   help="hf: a transformers model (adapters merged); peft: a base-model run's adapter; gguf: one "
                        "file for llama.cpp, plus an Ollama Modelfile beside it")
    p.add_argument("--quant", choices=["f16", "q8_0"], default=None,
                   help="gguf only: weight type of the matrices (default: f16)")
    p.add_argument("--model", default="models/final", help="model folder (default: models/final)")
    p.add_argument("--persona", type=int, default=0, help="persona index folded into the weights (default: 0)")
    p.set_defaults(func=_export)

    p = sub.add_parser("chat", help="chat with a model folder (reads stdin line by line when piped)")
    _sampling_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None)
    _memory_args(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("remember", help="teach a fact to a user's weight memory (a LoRA adapter, no database)")
    p.add_argument("fact", help='what to remember, in your words: "my dog is called Rex"')
    p.add_argument("--model", default="models/final", help="model folder (default: models/final)")
    _memory_args(p)
    p.set_defaults(func=_remember)

    p = sub.add_parser("tournament", help="let the data pick the architecture: candidates (params overrides) "
                       "trained as DVC experiments, the better half kept each round (successive halving)")
    p.add_argument("--config", default="tournament.yaml", help="candidates and rounds (default: tournament.yaml)")
    p.add_argument("--restart", action="store_true", help="forget this tournament's runs and start it again")
    p.set_defaults(func=_tournament)

    p = sub.add_parser("serve", help="OpenAI-compatible API and web chat page for a model folder")
    _sampling_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length when a request sets no max_tokens")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-open", type=int, default=64, help="requests open at once; more get 429")
    p.add_argument("--memory", default=None, metavar="DIR", help="apply the weight memory of each request's `user` "
                   "from this folder (default: off)")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PersonaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
