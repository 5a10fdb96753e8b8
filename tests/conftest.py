"""Shared fixtures: the repo root and the real public data in ../shared/data (tests skip when it is absent),
tiny model folders, the CLI server, and loopback HTTP servers."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real public data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def shared_cases() -> Path:
    """The real-world input cases in ../shared/cases (see its README.md); tests skip when it is absent."""
    cases = Path(__file__).resolve().parents[2] / "shared" / "cases"
    if not cases.is_dir():
        pytest.skip(f"real-world input cases not found at {cases}")
    return cases


def dvc(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`dvc *args` in `cwd` with this environment's executables first on PATH (stage commands say `python`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def git_repo_copy(dest: Path, edit=None) -> Path:
    """What a fresh clone has: the tracked files of this checkout copied to `dest` and committed there.
    `edit(dest)` may change them (tiny params) before the commit."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    if edit:
        edit(dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=dest, check=True)
    return dest


def tiny_model_dir(tmp: Path, lines: list[str], emotions: list[str], block_size: int = 64) -> Path:
    """An untrained one-layer model folder (tokenizer trained on `lines`) for the chat, server and page tests."""
    import torch
    import torch.nn as nn

    from persona_lm.model import GPT, GPTConfig
    from persona_lm.tokenizer import save_tokenizer, train_tokenizer
    from persona_lm.train.checkpoint import save_model_dir

    tok = train_tokenizer(lines * 3, "bpe", 300, emotions)
    save_tokenizer(tok, tmp / "tokenizer.json")
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                          n_emotions=len(emotions), tie_embeddings=False))
    with torch.no_grad():  # spread the logits: an untrained tied model answers <|assistant|> (a stop token) at once
        nn.init.normal_(model.wte.weight, std=0.5)
        nn.init.normal_(model.lm_head.weight, std=0.5)
    out = tmp / "final"
    save_model_dir(out, model, tmp / "tokenizer.json",
                   {"emotions": emotions, "persona": "Rosie", "system_prompt": "You are Rosie."})
    return out


class Server:
    """`persona-lm serve --port 0` in a subprocess; `url` is read from the line it prints once bound."""

    def __init__(self, model: Path, *args: str):
        cli = Path(sys.executable).parent / "persona-lm"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(cli), "serve", "--model", str(model), "--port", "0", *args],
                                     stderr=subprocess.PIPE, text=True, env=env)
        seen = []
        while "serving Rosie at http://127.0.0.1:" not in (line := self.proc.stderr.readline()):
            seen.append(line)  # warnings a library may print first
            assert line and len(seen) < 50, "".join(seen)  # "" = the server exited
        self.url = line.split(" at ")[1].split()[0].rstrip("/")
        wait_ready(self.url)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def wait_ready(url: str) -> None:
    """Poll /v1/models until the app answers (the socket is bound before uvicorn starts serving)."""
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def serve(handle):
    """A 127.0.0.1 server on a free port; `handle(method, path, headers)` returns (status, headers, body).
    Yields (base url, list of (method, path) requests seen)."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, body: bool):
            seen.append((self.command, self.path))
            status, headers, data = handle(self.command, self.path, self.headers)
            self.send_response(status)
            for k, v in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):
            self._reply(body=True)

        def do_HEAD(self):
            self._reply(body=False)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A port nothing listens on: bound once to pick it, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def headless_chromium(user_data_dir: Path, *flags: str, performance_log: bool = False):
    """Debian's chromium + chromedriver through selenium (system binaries: nothing is downloaded). Skips when
    they are missing, unless PERSONA_LM_REQUIRE_BROWSER=1 (as .ci/run sets), where it fails instead."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("PERSONA_LM_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("chromium + chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
                 "--no-first-run", "--metrics-recording-only", f"--user-data-dir={user_data_dir}", *flags):
        options.add_argument(flag)
    if performance_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
