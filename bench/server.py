"""`persona-lm serve` under load: time to first token and tokens/s per stream and in total at 1, 8 and 32 streams.

    .venv/bin/python bench/server.py [--configs default,core] [--streams 1,8,32] [--new 128] [--repeat 3]

`default` is the trained model folder (models/final; --model to change it). `core` is the 13.9M configuration
(n_layer 6, n_head 6, n_embd 384, block_size 256) with random weights and a byte-level BPE tokenizer of up to 8192
tokens trained on ../shared/data's TinyStories text, written to a temporary model folder: speed does not depend on
the weights. Starts the server on a free loopback port, then for each concurrency level sends that many
streaming requests at once (different prompts, temperature 0.8, fixed seeds, `ignore_eos` so every reply is
exactly --new tokens) over raw loopback sockets, all from one asyncio loop. Per stream: TTFT = request sent ->
first content delta; tokens/s = --new / (last delta - first delta). Total = all tokens / wall time of the round.
Each figure is the median over streams in the best of --repeat rounds (ranked by wall time). The engine decodes
the open streams together (continuous batching), so the total grows with the number of streams while each
stream slows by much less than the stream count. The last lines compare 8 streams with 1 against the targets:
total >= 5x one stream's, TTFT <= 2x one stream's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "corpus" / "tinystories_train_head.txt"
PROMPTS = ["Hi! What's your name?", "Tell me about your day.", "What do you like to do?", "I feel a bit sad today.",
           "Do you like music?", "What makes you happy?", "Tell me a short story.", "How are you feeling?"]


def start(model: str) -> tuple[subprocess.Popen, str]:
    cli = Path(sys.executable).parent / "persona-lm"
    proc = subprocess.Popen([str(cli), "serve", "--model", model, "--port", "0", "--max-tokens-limit", "4096"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stderr.readline()
    if " at http://" not in line:
        sys.exit(f"server did not start: {line}{proc.stderr.read()}")
    url = line.split(" at ")[1].split()[0].rstrip("/")
    while True:
        try:
            httpx.get(url + "/v1/models", timeout=5)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)


async def one_stream(port: int, i: int, new: int) -> dict:
    """One streaming request over a raw loopback socket with TCP_NODELAY: a full HTTP client adds its own
    buffering and write pattern (httpx's separate header and body writes cost ~40 ms of delayed ACK here)."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                       "stream": True, "max_tokens": new, "ignore_eos": True, "temperature": 0.8, "seed": i,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(head + body)
    first = last = None
    tokens = 0
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"request failed: {status!r} {await reader.read()!r}")
    while await reader.readline() not in (b"\r\n", b""):  # response headers
        pass
    pending = b""
    while True:  # chunked transfer encoding: size line, data, CRLF
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        pending += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            if not event.startswith(b"data: {"):
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    writer.close()
    return {"ttft": first - t0, "tok_s": tokens / max(last - first, 1e-9), "tokens": tokens}


def round_(port: int, streams: int, new: int) -> tuple[float, list[dict]]:
    async def run():
        return await asyncio.gather(*(one_stream(port, i, new) for i in range(streams)))
    t0 = time.perf_counter()
    results = asyncio.run(run())
    return time.perf_counter() - t0, results


def core_model(folder: Path) -> str:
    """A random-weight model folder of the 13.9M configuration (see the module docstring)."""
    import torch

    from persona_lm.model import GPT, GPTConfig
    from persona_lm.tokenizer import save_tokenizer, train_tokenizer
    from persona_lm.train.checkpoint import save_model_dir

    if not SHARED.is_file():
        sys.exit(f"{SHARED}: missing; the core configuration needs ../shared/data beside the project")
    tok = train_tokenizer(SHARED.read_text(encoding="utf-8").splitlines(), "bpe", 8192, [])
    save_tokenizer(tok, folder / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=256, n_layer=6, n_head=6, n_embd=384))
    save_model_dir(folder / "core", model, folder / "tokenizer.json", {"persona": "Core", "system_prompt": ""})
    print(f"core: {model.param_counts()['total'] / 1e6:.1f}M parameters, vocabulary {tok.get_vocab_size()}")
    return str(folder / "core")


def bench(model: str, streams: list[int], new: int, repeat: int) -> None:
    proc, url = start(model)
    port = int(url.rsplit(":", 1)[1])
    try:
        round_(port, 1, 16)  # warm-up: first-request allocations and lazy imports
        print(f"model {model}, {new} new tokens per stream, best of {repeat}, load average {os.getloadavg()[0]:.2f}")
        print(f"{'streams':>7} {'TTFT ms (median)':>17} {'TTFT ms (max)':>14} {'tok/s per stream':>17} {'tok/s total':>12}")
        seen = {}
        for n in streams:
            wall, results = min((round_(port, n, new) for _ in range(repeat)), key=lambda r: r[0])
            ttft = statistics.median(r["ttft"] * 1000 for r in results)
            total = sum(r["tokens"] for r in results) / wall
            seen[n] = (ttft, total)
            print(f"{n:>7} {ttft:>17.1f} {max(r['ttft'] * 1000 for r in results):>14.1f} "
                  f"{statistics.median(r['tok_s'] for r in results):>17.1f} {total:>12.1f}")
        if 1 in seen and 8 in seen:
            (t1, a1), (t8, a8) = seen[1], seen[8]
            print(f"8 streams vs 1: total {a8 / a1:.2f}x (target >= 5x), median TTFT {t8 / t1:.2f}x (target <= 2x)")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="default,core")
    ap.add_argument("--model", default=str(ROOT / "models/final"), help="the `default` model folder")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            if name == "default":
                if not (Path(args.model) / "model.safetensors").exists():
                    sys.exit(f"{args.model}: no model folder; run `make repro` first or pass --model")
                bench(args.model, streams, args.new, args.repeat)
            elif name == "core":
                bench(core_model(Path(tmp)), streams, args.new, args.repeat)
            else:
                sys.exit(f"unknown config {name!r}: default or core")


if __name__ == "__main__":
    main()
