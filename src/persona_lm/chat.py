"""`persona-lm chat`: talk to a model folder in the terminal, or pipe lines through it.

`Chat` holds one conversation: the persona's system prompt, the past turns, and the sampling settings. Before
each reply it fits the conversation into the context window: the reply's token budget is reserved first,
then the oldest whole user/assistant pairs are dropped (never the system prompt), and as a last resort the
new user turn is cut from the left, since its end is what the reply answers.

`run` is the loop around it. On a terminal it shows a `you> ` prompt and the persona's name; when stdin is
piped, each line is one user turn and each reply is exactly one line on stdout, so the output can be zipped
with the input. Command feedback and warnings always go to stderr.

With a user's weight memory (persona_lm.memory), `/remember FACT` trains the fact into the model's weights,
`/memories` lists what it holds and `/forget N|all` unlearns; they last across sessions, per `--user`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, TextIO

from persona_lm.errors import PersonaError

# Everything str.splitlines() breaks on: a piped reply must stay on one line.
_ONE_LINE = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})
HELP = "commands: /reset  /temp X  /emotion on|off  /remember FACT  /memories  /forget N|all  /quit"


class Chat:
    """One conversation with a model: history, fit-to-context, streamed replies."""

    def __init__(self, model, tokenizer, config: dict, *, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, repetition_penalty: float = 1.1, max_new_tokens: int = 128,
                 seed: int | None = None, warn=None, memory=None):
        self.model, self.tok = model, tokenizer
        self.memory = memory  # persona_lm.memory.Memory of the user, or None: memory commands are off
        self.name = config.get("persona") or "assistant"
        self.system = config.get("system_prompt") or ""
        self.emotions = config.get("emotions") or None
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.max_new_tokens, self.seed = repetition_penalty, max_new_tokens, seed
        self.warn = warn or note
        self.history: list[dict] = []  # alternating human/gpt turns, oldest first
        self.n_replies = 0
        self.last_emotion: str | None = None

    def reset(self) -> None:
        self.history = []

    @property
    def reserve(self) -> int:
        """Tokens kept free for the reply. Capped at half the window so a huge max_new_tokens still leaves room
        for the conversation; a longer reply is fine, the decoder re-windows when it reaches block_size."""
        return min(self.max_new_tokens, self.model.cfg.block_size // 2)

    def _head(self) -> list[dict]:
        return [{"from": "system", "value": self.system}] if self.system else []

    def fit(self, user: str) -> tuple[list[int], str]:
        """(prompt ids, the user text actually used); drops the oldest pairs from the history as needed. A model
        with memory attention gets the whole conversation: what outgrows the window goes into its memory."""
        if getattr(self.model.cfg, "memory_layers", ()):
            return self.tok.prompt(self._head() + self.history + [{"from": "human", "value": user}]), user
        ids, self.history, user = fit(self.tok, self.model.cfg.block_size - self.reserve, self._head(),
                                      self.history, user, self.warn)
        return ids, user

    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to `user` as text deltas; the turn pair joins the history once the reply is done,
        and `last_emotion` holds the emotion head's label for it."""
        from persona_lm.generate import stream

        ids, user = self.fit(user)
        seed = None if self.seed is None else self.seed + self.n_replies  # reproducible, yet not every reply alike
        gen = stream(self.model, self.tok, ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                     top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=seed,
                     emotions=self.emotions)
        yield from gen
        self.n_replies += 1
        self.last_emotion = gen.result.emotion
        self.history += [{"from": "human", "value": user}, {"from": "gpt", "value": gen.result.text}]


def fit(tok, budget: int, head: list[dict], history: list[dict], user: str, warn) -> tuple[list[int], list[dict], str]:
    """(prompt ids, the history kept, the user text used) with len(prompt) <= budget.

    Drops the oldest whole pairs from `history`; truncates `user` from the left only when the system turns
    (`head`) plus `user` alone cannot fit, and then says so through `warn`. The chat loop and the server share it.
    """
    while True:
        ids = tok.prompt(head + history + [{"from": "human", "value": user}])
        if len(ids) <= budget or not history:
            break
        history = history[2:]
    if len(ids) <= budget:
        return ids, history, user
    # Only the system turns and the new one are left: keep the end of the user's text.
    room = budget - len(tok.prompt(head + [{"from": "human", "value": ""}]))
    if room < 1:
        raise PersonaError(f"the system prompt alone leaves no room in a budget of {budget} tokens; use a shorter "
                           "one or fewer new tokens")
    body = tok.encode(user)
    while True:  # decoding and re-encoding a cut can change the count by a token or two: shrink until it fits
        text = tok.decode(body[-room:]).lstrip("\ufffd")  # the cut may split a character
        ids = tok.prompt(head + [{"from": "human", "value": text}])
        if len(ids) <= budget or room <= 1:
            break
        room -= len(ids) - budget
    warn(f"[your message was {len(body)} tokens; only its last {room} fit the context]")
    return ids, history, text


def command(chat: Chat, line: str, state: dict) -> bool:
    """Apply a /command; returns False when the loop should stop."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/quit":
        return False
    if name == "/reset":
        chat.reset()
        note("[history cleared]")
    elif name == "/temp":
        try:
            t = float(arg)
            if not 0 <= t <= 5:
                raise ValueError
        except ValueError:
            note(f"[/temp needs a number from 0 to 5, got {arg!r}; temperature stays {chat.temperature}]")
        else:
            chat.temperature = t
            note(f"[temperature {t}]")
    elif name == "/emotion" and arg in ("on", "off"):
        state["emotion"] = arg == "on"
        note(f"[emotion {arg}]")
    elif name in ("/remember", "/memories", "/forget"):
        memory_command(chat.memory, name, arg)
    else:
        note(f"[unknown command {line!r}; {HELP}]")
    return True


def memory_command(memory, name: str, arg: str) -> None:
    """/remember FACT, /memories, /forget N|all: feedback on stderr; a wrong argument is a message, not an exit."""
    if memory is None:
        note(f"[{name}: weight memory is off in this session]")
        return
    try:
        if name == "/remember":
            if not arg:
                raise PersonaError("/remember needs the fact, e.g. /remember my dog is called Rex")
            replaced, report = memory.remember(arg)
            note(f"[remembered: {arg}{' (replaces: ' + '; '.join(replaced) + ')' if replaced else ''}; "
                 f"{len(memory.texts)} fact(s) in memory, learnt in {report.seconds:.1f} s]")
        elif name == "/memories":
            note("\n".join(f"[{i}] {t}" for i, t in enumerate(memory.texts, 1)) or "[no memories yet]")
        else:
            removed = memory.forget(arg or "")
            note(f"[forgot: {'; '.join(removed)}; {len(memory.texts)} fact(s) left]")
    except PersonaError as e:
        note(f"[{e}]")


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(chat: Chat, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, interactive: bool | None = None) -> int:
    """The chat loop: a REPL on a terminal, one reply line per input line when piped."""
    if interactive is None:
        interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        note(f"chatting with {chat.name}; {HELP}")
    state = {"emotion": True}
    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=stdout)
            break
        if not interactive and not line:
            break  # EOF
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(chat, line, state):
                break
            continue
        if interactive:
            stdout.write(f"{chat.name}> ")
        try:
            for delta in chat.reply(line):
                stdout.write(delta if interactive else delta.translate(_ONE_LINE))
                stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            stdout.write("\n")
            note("[reply interrupted; it is not kept in the history]")
            continue
        if state["emotion"] and chat.last_emotion:
            stdout.write(f"  [{chat.last_emotion}]")
        stdout.write("\n")
        stdout.flush()
    return 0


def main(model_dir: str | Path, user: str | None = None, memory_dir: str | Path | None = "memory",
         dtype: str = "fp32", **sampling) -> int:
    """Load the model folder in `dtype` (quant.DTYPES) and chat as `user` (default: the OS user), with that user's
    weight memory from `memory_dir` (None: memory off; always off with int8 weights, which LoRA cannot train);
    PersonaError (no folder, bad files) is reported by the CLI."""
    from persona_lm import quant

    if not 0 <= sampling.get("temperature", 0.8) <= 5:
        raise PersonaError(f"--temperature must be from 0 to 5, got {sampling['temperature']}")
    if sampling.get("max_new_tokens", 128) < 1:
        raise PersonaError(f"--max-new-tokens must be at least 1, got {sampling['max_new_tokens']}")
    model, tok, config = quant.load(model_dir, dtype)
    if dtype == "int8" and memory_dir is not None:
        note("[--dtype int8: weight memory is off in this session (it trains LoRA on the weights)]")
        memory_dir = None
    memory = None
    if memory_dir is not None:
        from persona_lm.memory import Memory, load_config

        memory = Memory(model, tok, config, Path(model_dir), load_config(), Path(memory_dir), user, say=note)
        memory.start()
    return run(Chat(model, tok, config, memory=memory, **sampling))
