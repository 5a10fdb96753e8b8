"""`persona-lm serve`: the official `openai` client gets the same replies as in-process generation, streamed
and not; concurrent streams don't disturb each other; bad requests get OpenAI-shaped 4xx errors and leave the
server running; a client that hangs up frees its slot."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import Server, tiny_model_dir
from persona_lm.generate import generate
from persona_lm.server import APIError, Engine
from persona_lm.train.checkpoint import load_model

openai = pytest.importorskip("openai")

EMOTIONS = ["joy", "sadness", "anger"]
LINES = ["Hello there, how are you today?", "I am fine, thank you. 🙂", "Café au lait, s'il vous plaît.",
         "Rosie likes tea and long talks.", "Tell me something nice.", "Ñandú and jalapeño: ¿qué tal?"]
CLI = Path(sys.executable).parent / "persona-lm"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("serve"), LINES, EMOTIONS, block_size=128)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(model_dir: Path, user: str, **sampling):
    """The reply in-process generation gives for a one-turn conversation under the persona's system prompt."""
    model, tok, config = load_model(model_dir)
    ids = tok.prompt([{"from": "system", "value": config["system_prompt"]}, {"from": "human", "value": user}])
    return generate(model, tok, ids, emotions=config["emotions"], **{"top_k": 40, "repetition_penalty": 1.1, **sampling})


def test_models_lists_the_persona(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["rosie"]
    assert models[0].model_extra["emotions"] == EMOTIONS and models[0].model_extra["context_length"] == 128


def test_completion_matches_in_process_generation(client, model_dir):
    want = expected(model_dir, "Hello there!", temperature=0, top_p=0.95, max_new_tokens=40)
    got = client.chat.completions.create(model="rosie", messages=[{"role": "user", "content": "Hello there!"}],
                                         temperature=0, max_tokens=40)
    choice = got.choices[0]
    assert choice.message.content == want.text and choice.finish_reason == want.finish_reason
    assert choice.message.emotion == want.emotion and want.emotion in EMOTIONS
    assert got.usage.prompt_tokens == want.n_prompt and got.usage.completion_tokens == want.n_new
    assert got.model == "rosie" and got.id.startswith("chatcmpl-")


def test_stream_carries_the_same_reply_and_its_emotion(client, model_dir):
    want = expected(model_dir, "Tell me something nice.", temperature=0.9, top_p=0.9, seed=11, max_new_tokens=60)
    chunks = list(client.chat.completions.create(
        model="rosie", messages=[{"role": "user", "content": "Tell me something nice."}], temperature=0.9,
        top_p=0.9, seed=11, max_tokens=60, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 3, "the reply should arrive in pieces"
    assert "".join(content) == want.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == want.finish_reason
    assert finish[0].choices[0].delta.model_extra["emotion"] == want.emotion
    assert chunks[-1].usage.completion_tokens == want.n_new and chunks[0].choices[0].delta.role == "assistant"


def test_raw_stream_ends_with_done(server):
    body = {"model": "rosie", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"]


def test_history_stop_strings_and_system_prompt_are_applied(client, model_dir):
    model, tok, _ = load_model(model_dir)
    turns = [{"role": "system", "content": "You are Max."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello!"}, {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    ids = tok.prompt([{"from": "system", "value": "You are Max."}, {"from": "human", "value": "hi"},
                      {"from": "gpt", "value": "hello!"}, {"from": "human", "value": "again"}])
    want = generate(model, tok, ids, temperature=0, top_k=40, repetition_penalty=1.1, max_new_tokens=30)
    got = client.chat.completions.create(model="rosie", messages=turns, temperature=0, max_tokens=30)
    assert got.choices[0].message.content == want.text and got.usage.prompt_tokens == len(ids)
    stop = want.text[len(want.text) // 2:][:3]
    cut = client.chat.completions.create(model="rosie", messages=turns, temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == want.text[:want.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_twenty_concurrent_streams_each_get_their_own_reply(client):
    def ask(seed: int, stream: bool) -> str:
        r = client.chat.completions.create(model="rosie", messages=[{"role": "user", "content": f"story {seed}"}],
                                           temperature=1.0, seed=seed, max_tokens=48, stream=stream)
        if not stream:
            return r.choices[0].message.content
        parts = [c.choices[0].delta.content or "" for c in r if c.choices]
        return "".join(parts)

    alone = [ask(seed, False) for seed in range(20)]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda s: ask(s, True), range(20)))
    assert together == alone
    assert len(set(alone)) > 10  # different seeds and prompts give different replies


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    (b'{"model": "rosie", "messages": []}', 400, "messages"),
    (b'{"model": "rosie", "messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content"),
    (b'{"model": "rosie", "messages": [{"role": "robot", "content": "x"}]}', 400, "messages.0.role"),
    (b'{"model": "rosie", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "rosie", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "rosie", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}', 400, "max_tokens"),
    (b'{"model": "rosie", "messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n"),
    (b'{"model": "rosie", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', 400, "stop"),
    (b'{"model": "rosie", "messages": [{"role": "assistant", "content": "x"}]}', 400, "messages"),
    (b'{"model": "rosie", "messages": [' + b'{"role": "user", "content": "x"},' * 300 + b'{"role": "user", "content": "y"}]}',
     400, "messages"),
    (b"\xff\xfe garbage", 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_malformed_requests_get_openai_shaped_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_oversize_bodies_are_refused_with_or_without_content_length(server):
    big = json.dumps({"model": "rosie", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=big, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must be enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413


def test_unknown_routes_and_methods(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_client_errors_surface_in_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="rosie", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"


def test_server_survives_everything_above(server, client):
    # Runs after the malformed-request tests (file order): the same process still answers.
    assert server.proc.poll() is None
    r = client.chat.completions.create(model="rosie", messages=[{"role": "user", "content": "still there?"}],
                                       max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_hangs_up_frees_its_slot(model_dir):
    s = Server(model_dir, "--max-open", "1", "--max-tokens-limit", "10000000")
    try:
        body = {"model": "rosie", "messages": [{"role": "user", "content": "go on"}], "stream": True,
                "max_tokens": 10000000, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the response
            next(lines)  # the first chunk: the request holds the only slot now
            busy = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                              json={"model": "rosie", "messages": [{"role": "user", "content": "me too"}]})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        # Hung up mid-reply; without cancellation the slot would stay taken for 10M tokens (hours).
        deadline = time.monotonic() + 60
        while True:
            r = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                           json={"model": "rosie", "messages": [{"role": "user", "content": "me too"}], "max_tokens": 3})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
    finally:
        s.close()


def test_engine_refuses_beyond_its_limit():
    class Never:
        def __iter__(self):
            return iter(())
        result = None

    async def run():
        engine = Engine(max_open=2)
        try:
            jobs = [engine.submit(Never()), engine.submit(Never())]
            with pytest.raises(APIError) as e:
                engine.submit(Never())
            assert e.value.status == 429
            for job in jobs:
                assert (await job.events.get())[0] == "done"
            engine.submit(Never())  # finished requests make room
        finally:
            engine.stop()

    asyncio.run(run())


def test_engine_keeps_serving_when_one_generation_fails():
    class Count:
        def __init__(self, n, fail_at=None):
            self.n, self.fail_at, self.result = n, fail_at, f"counted to {n}"

        def __iter__(self):
            for i in range(self.n):
                if i == self.fail_at:
                    raise RuntimeError("boom")
                yield str(i)

    async def events(job):
        out = []
        while not out or out[-1][0] == "delta":
            out.append(await job.events.get())
        return out

    async def run():
        engine = Engine(max_open=4)
        try:
            bad, good = engine.submit(Count(10, fail_at=3)), engine.submit(Count(6))
            got_bad, got_good = await events(bad), await events(good)
        finally:
            engine.stop()
        assert [v for k, v in got_bad if k == "delta"] == ["0", "1", "2"] and got_bad[-1][0] == "error"
        assert [v for k, v in got_good if k == "delta"] == list("012345") and got_good[-1] == ("done", "counted to 6")

    asyncio.run(run())


def test_serve_refuses_a_port_in_use_in_one_line(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([str(CLI), "serve", "--model", str(model_dir), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in proc.stderr


def test_serve_reports_a_missing_model_folder(tmp_path):
    proc = subprocess.run([str(CLI), "serve", "--model", str(tmp_path / "nope"), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no such model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_batches_replies_that_join_and_leave_at_different_times(model_dir):
    """Requests submitted together share batched steps, ask for different lengths, settings and stop strings,
    and each gets exactly the reply it gets alone; one is cancelled mid-reply and the rest go on."""
    from persona_lm.generate import stream

    model, tok, config = load_model(model_dir)
    emotions = config["emotions"]
    asks = [dict(max_new_tokens=8 + 9 * i, temperature=0.0 if i % 2 else 1.0, seed=i, top_k=0 if i % 3 else 40,
                 stop=["e"] if i == 3 else (), repetition_penalty=1.0 + 0.1 * (i % 2)) for i in range(6)]
    prompts = [tok.prompt([{"from": "human", "value": LINES[i]}]) for i in range(6)]

    def make(i):
        return stream(model, tok, prompts[i], emotions=emotions, **asks[i])

    alone = [generate(model, tok, prompts[i], emotions=emotions, **asks[i]) for i in range(6)]

    async def run():
        engine = Engine(max_open=8, model=model)
        try:
            jobs = [engine.submit(make(i)) for i in range(6)]
            quitter = engine.submit(make(5))
            assert (await quitter.events.get())[0] == "delta"
            quitter.cancelled = True
            got = []
            for job in jobs:
                kind, value = await job.events.get()
                while kind == "delta":
                    kind, value = await job.events.get()
                got.append((kind, value))
            assert engine.open == 0  # the cancelled reply's slot was freed too
            return got, engine.widest
        finally:
            engine.stop()

    got, widest = asyncio.run(run())
    assert widest >= 6
    assert [k for k, _ in got] == ["done"] * 6
    assert [(r.text, r.ids, r.finish_reason, r.emotion) for _, r in got] == \
        [(r.text, r.ids, r.finish_reason, r.emotion) for r in alone]
