"""`persona-lm chat`: history always fits the context (system prompt kept), piped stdin gives one reply line per
user line, commands work, greedy replies are reproducible, and user errors are one line, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from persona_lm.chat import Chat
from persona_lm.train.checkpoint import load_model

EMOTIONS = ["joy", "sadness", "anger"]
LINES = ["Hello there, how are you today?", "I am fine, thank you.", "What a lovely day for a walk in the park.",
         "Rosie likes tea and long talks.", "Tell me something nice."]
CLI = Path(sys.executable).parent / "persona-lm"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("chat"), LINES, EMOTIONS)


def chat_cli(model_dir, lines, *args):
    return subprocess.run([str(CLI), "chat", "--model", str(model_dir), "--temperature", "0",
                           "--max-new-tokens", "8", *args],
                          input="".join(l + "\n" for l in lines), capture_output=True, text=True, timeout=60)


def replies(out: str) -> list[str]:
    assert out.endswith("\n")
    return out[:-1].split("\n")


def has_label(line: str) -> bool:
    return any(line.endswith(f"  [{e}]") for e in EMOTIONS)


def test_fit_keeps_system_and_stays_in_context(model_dir):
    model, tok, config = load_model(model_dir)
    chat = Chat(model, tok, config, temperature=0, max_new_tokens=8, warn=lambda m: None)
    block, system = model.cfg.block_size, tok.prompt([{"from": "system", "value": "You are Rosie."}])[:-1]
    for i in range(12):
        ids, _ = chat.fit(f"message number {i}: what a lovely day for a walk")
        assert len(ids) + chat.max_new_tokens <= block
        assert ids[:len(system)] == system
        chat.history += [{"from": "human", "value": f"message number {i}"}, {"from": "gpt", "value": "I am fine."}]
    assert 0 < len(chat.history) < 24 and len(chat.history) % 2 == 0
    assert chat.history[0]["from"] == "human"  # whole pairs dropped, oldest first


def test_fit_truncates_a_long_turn_from_the_left(model_dir):
    model, tok, config = load_model(model_dir)
    warnings = []
    chat = Chat(model, tok, config, temperature=0, max_new_tokens=8, warn=warnings.append)
    chat.history = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    ids, used = chat.fit(" ".join(LINES * 4) + " THE END")
    assert len(ids) + 8 <= model.cfg.block_size
    assert chat.history == [] and used.endswith("THE END") and len(warnings) == 1
    reply = "".join(chat.reply(" ".join(LINES * 4)))  # the reply itself runs fine on the truncated prompt
    assert isinstance(reply, str) and chat.last_emotion in EMOTIONS


def test_piped_session(model_dir):
    lines = ["Hello there", "How are you?", "/temp 0.5", "/temp 0", "/emotion off", "Tell me something nice.",
             "/reset", "Hello there", "/quit", "this line is never read"]
    r = chat_cli(model_dir, lines)
    assert r.returncode == 0, r.stderr
    out = replies(r.stdout)
    assert len(out) == 4  # one line per user turn (random bytes included), none for commands, none after /quit
    assert [has_label(l) for l in out] == [True, True, False, False]
    assert out[0].rsplit("  [", 1)[0].strip()  # a real reply, not an instant stop
    assert out[3] == out[0].rsplit("  [", 1)[0]  # after /reset, the same greedy reply as at the start
    assert "temperature 0.5" in r.stderr and not any(l.startswith("you> ") for l in out)
    again = chat_cli(model_dir, lines)
    assert again.stdout == r.stdout  # greedy decoding is deterministic


def test_bad_temp_is_a_message(model_dir):
    r = chat_cli(model_dir, ["/temp hot", "/temp 9", "Hello there"])
    assert r.returncode == 0 and len(replies(r.stdout)) == 1
    assert r.stderr.count("/temp needs a number from 0 to 5") == 2 and "Traceback" not in r.stderr


def test_missing_model_dir(tmp_path):
    r = chat_cli(tmp_path / "nope", ["Hello"])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
