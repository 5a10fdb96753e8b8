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
    from persona_lm.data.sharegpt import check_file

    bad = 0
    for path in args.files:
        report = check_file(path)
        for line in report:
            print(line)
        if report:
            bad += 1
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcript", help="a VTT/SRT file -> clean transcript as JSON lines on stdout")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_transcript)

    p = sub.add_parser("sharegpt-check", help="validate ShareGPT .json/.jsonl files (exit 1 when invalid)")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_sharegpt_check)
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
