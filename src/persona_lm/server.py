"""`persona-lm serve`: an OpenAI-compatible chat server with a web chat page, for one model folder.

Routes: `POST /v1/chat/completions` (JSON, or SSE with `stream: true`), `GET /v1/models`, `GET /` (the page,
self-contained: no CDN, works offline). Every reply carries the emotion head's label in an extra `emotion`
field: `choices[0].message.emotion`, or `choices[0].delta.emotion` in the last streamed chunk.

The model runs on one worker thread (`Engine`), so the event loop never blocks on torch. It decodes every open
request together, one batched forward per token for all of them (continuous batching, generate.Batch); a
request joins or leaves between two steps. Requests are bounded (body
size, message count, max_tokens, open requests) and every error is JSON in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.

With `--memory DIR`, a request's OpenAI `user` field selects that user's weight memory (persona_lm.memory): the
engine switches to the user's adapter before each step of their reply, so interleaved users never share one.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from persona_lm.chat import fit
from persona_lm.errors import PersonaError
from persona_lm.generate import Batch, Generation, stream as generation


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens: int = 2048        # the largest max_tokens a request may ask for
    max_open: int = 64            # requests generating or waiting at once; more get 429
    default_max_tokens: int = 256


@dataclass(frozen=True)
class Sampling:
    """Server-side defaults; a request's temperature / top_p / max_tokens override them."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Job:
    """One request's generation, as seen from both sides: the worker pushes events, the handler awaits them."""

    def __init__(self, generation, loop: asyncio.AbstractEventLoop, switch=None):
        self.generation, self.loop = generation, loop
        self.switch = switch  # called on the worker before each step: puts the request's user memory in place
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.it = None

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """The worker thread that owns the model. Each round it admits new jobs, then advances every open one:

    - with `model` given (and batchable, see generate.Batch), replies are decoded together by continuous
      batching: one batched forward per round for all of them, one token each; jobs join (the prompts that
      arrived since the last round prefilled together) and leave (finished or cancelled, its cache row freed) between rounds, whatever its sampling
      settings, stop strings and length;
    - otherwise, and for jobs that switch weights before each step (a user's weight memory: rows of one forward
      share one set of weights), jobs take turns, one text delta each.

    A job holds its slot until the worker is done with it: finished, failed, or cancelled (client gone), which is
    noticed at its next round. A failure in one job's generation ends that job only; one in the batched forward
    ends the jobs in it."""

    def __init__(self, max_open: int, model=None):
        self.max_open = max_open
        self.batch = Batch(model) if model is not None and Batch.batchable(model) else None
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.open = 0
        self.widest = 0  # the most replies one batched forward has decoded together (a figure for tests and logs)
        self.thread = threading.Thread(target=self._run, name="persona-lm-engine", daemon=True)
        self.thread.start()

    def submit(self, generation, switch=None) -> Job:
        with self.lock:
            if self.open >= self.max_open:
                raise APIError(429, f"the server is busy ({self.open} requests open, limit {self.max_open}); "
                               "retry later", type_="rate_limit_error", code="server_busy")
            self.open += 1
        job = Job(generation, asyncio.get_running_loop(), switch)
        self.inbox.put(job)
        return job

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def _finish(self, job: Job, kind: str | None = None, value=None) -> None:
        with self.lock:
            self.open -= 1
        if kind:
            job.emit(kind, value)

    def _batches(self, job: Job) -> bool:
        gen = job.generation
        return (self.batch is not None and job.switch is None and isinstance(gen, Generation)
                and gen.decoder.cache is not None)

    def _run(self) -> None:
        turns: list[Job] = []            # jobs taking turns
        rows: dict[int, Job] = {}        # batched jobs by id(their Decoder)
        while True:
            joining: list[Job] = []
            try:
                while True:  # admit everything waiting; block only when there is nothing to do
                    job = self.inbox.get(block=not (turns or rows or joining))
                    if job is None:
                        return
                    if self._batches(job):
                        joining.append(job)
                    else:
                        job.it = iter(job.generation)
                        turns.append(job)
            except queue.Empty:
                pass
            if joining:
                self._join(joining, rows)
            for job in list(turns):
                if job.cancelled:
                    job.it.close()
                    turns.remove(job)
                    self._finish(job)
                    continue
                try:
                    if job.switch is not None:
                        job.switch()
                    delta = next(job.it)
                except StopIteration:
                    turns.remove(job)
                    self._finish(job, "done", job.generation.result)
                except Exception as e:  # a bug in one generation must not take the others down
                    turns.remove(job)
                    self._finish(job, "error", e)
                else:
                    job.emit("delta", delta)
            if rows:
                self._batch_round(rows)

    def _join(self, jobs: list[Job], rows: dict[int, Job]) -> None:
        """New rows, their prompts prefilled together in one forward."""
        try:
            for job in jobs:
                job.generation.begin()
            self.batch.add(*(job.generation.decoder for job in jobs))
        except Exception as e:
            for job in jobs:
                self._finish(job, "error", e)
        else:
            rows.update((id(job.generation.decoder), job) for job in jobs)

    def _leave(self, job: Job, rows: dict[int, Job], kind: str | None = None, value=None) -> None:
        self.batch.drop(job.generation.decoder)
        del rows[id(job.generation.decoder)]
        self._finish(job, kind, value)

    def _batch_round(self, rows: dict[int, Job]) -> None:
        """One token for every batched job: sample, hand each to its job (text, stop), then one forward."""
        for job in [j for j in rows.values() if j.cancelled]:
            self._leave(job, rows)
        try:
            tokens = self.batch.sample() if rows else []
            for decoder, tok in tokens:
                job = rows[id(decoder)]
                try:
                    delta, done = job.generation.push(tok)
                except Exception as e:
                    self._leave(job, rows, "error", e)
                    continue
                if delta:
                    job.emit("delta", delta)
                if done:
                    self._leave(job, rows, "done", job.generation.result)
            if rows:
                self.widest = max(self.widest, len(rows))
                self.batch.step()
        except Exception as e:  # the batched forward failed: every job in it ends with the error
            for job in list(rows.values()):
                self._leave(job, rows, "error", e)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """Strict types (no "0.5" for a number); unknown fields are ignored, as OpenAI-compatible local servers
    do, because clients send many defaults of their own."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)  # whose weight memory applies (with --memory)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(errors: list[dict]) -> APIError:
    """The first schema error as one line naming the parameter, e.g. `messages.0.content: ... (got 5)`."""
    e = errors[0]
    # Union members show up in the location as type names ("content.str"): they are not parameters.
    loc = [str(x) for x in e.get("loc", ()) if not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x))]
    param = ".".join(loc) or None
    got = e.get("input")
    shown = json.dumps(got, default=repr)[:80] if got is not None and e.get("type") != "missing" else None
    msg = f"{param}: {e.get('msg')}" if param else str(e.get("msg"))
    return APIError(400, msg + (f" (got {shown})" if shown else ""), param=param)


class BodyLimit:
    """ASGI middleware: reads the whole request body up to `limit` bytes (413 beyond it, whether or not
    Content-Length is sent), then replays it to the app; later receives (disconnects) pass through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, too_big)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _send_error(send, too_big)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send, err: APIError) -> None:
    payload = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def page() -> str:
    return resources.files("persona_lm").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(model, tok, config: dict, *, limits: Limits = Limits(), sampling: Sampling = Sampling(), memory=None):
    """The ASGI app for one loaded model. The engine thread starts with the app and stops with it. `memory`: a
    persona_lm.memory.Bank applying each request's `user` memory, or None (the `user` field is ignored)."""
    persona = config.get("persona") or "assistant"
    model_id = persona.lower().replace(" ", "-")
    emotions = config.get("emotions") or None
    system = config.get("system_prompt") or ""
    block = model.cfg.block_size
    created = int(time.time())
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["engine"] = Engine(limits.max_open, model if memory is None else None)
        yield
        state["engine"].stop()

    app = FastAPI(title="persona-lm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "persona-lm",
            "persona": persona, "emotions": emotions or [], "context_length": block}]}

    async def parse(request: Request) -> ChatRequest:
        """The body as JSON whatever the Content-Type says (curl's -d sends a form type), then the schema."""
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e.errors()) from None

    def prompt_for(req) -> tuple[list[int], int]:
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"messages: at most {limits.max_messages} messages per request (got {len(req.messages)})",
                           param="messages")
        wanted = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if wanted > limits.max_tokens:
            raise APIError(400, f"max_tokens: at most {limits.max_tokens} (got {wanted})", param="max_tokens")
        head: list[dict] = []
        turns: list[dict] = []
        for i, m in enumerate(req.messages):
            if m.role in ("system", "developer"):
                if turns:
                    raise APIError(400, f"messages.{i}: system messages must come before the conversation",
                                   param=f"messages.{i}.role")
                head.append({"from": "system", "value": m.text()})
            else:
                turns.append({"from": "human" if m.role == "user" else "gpt", "value": m.text()})
        if not turns or turns[-1]["from"] != "human":
            raise APIError(400, "messages: the last message must be the user's", param="messages")
        if not head and system:
            head = [{"from": "system", "value": system}]
        elif len(head) > 1:
            head = [{"from": "system", "value": "\n".join(h["value"] for h in head)}]
        try:
            ids, _, _ = fit(tok, block - min(wanted, block // 2), head, turns[:-1], turns[-1]["value"], lambda _: None)
        except PersonaError as e:
            raise APIError(400, str(e), param="messages") from None
        return ids, wanted

    def stops(req) -> list[str]:
        s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(s) > 4 or any(len(x) > 256 for x in s):
            raise APIError(400, "stop: at most 4 strings of at most 256 characters", param="stop")
        return s

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request)
        ids, max_new = prompt_for(req)
        gen = generation(model, tok, ids, stop=stops(req), emotions=emotions, max_new_tokens=max_new,
                         temperature=sampling.temperature if req.temperature is None else req.temperature,
                         top_k=sampling.top_k, top_p=sampling.top_p if req.top_p is None else req.top_p,
                         repetition_penalty=sampling.repetition_penalty, seed=req.seed, ignore_end=req.ignore_eos)
        engine: Engine = state["engine"]
        job = engine.submit(gen, memory.switcher(req.user) if memory is not None else None)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, rid, now, model_id, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            kind, result = await job.events.get()
            while kind == "delta":  # the text arrives whole in the result
                kind, result = await job.events.get()
        finally:
            job.cancelled = True  # a no-op once finished; stops the work when the client went away
        if kind == "error":
            raise APIError(500, f"generation failed: {result}")
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "finish_reason": result.finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": result.text, "emotion": result.emotion}}],
                "usage": _usage(result)}

    return app


def _usage(result) -> dict:
    return {"prompt_tokens": result.n_prompt, "completion_tokens": result.n_new,
            "total_tokens": result.n_prompt + result.n_new}


async def _sse(job: Job, rid: str, created: int, model_id: str, include_usage: bool):
    """SSE chunks in OpenAI's order: role, content deltas, the finish chunk (with the emotion), optional
    usage, then `[DONE]`. A client that disconnects cancels the generation."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(APIError(500, f'generation failed: {value}').body())}\n\n"
                return
            else:
                yield chunk({"emotion": value.emotion}, value.finish_reason)
                if include_usage:
                    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                            "choices": [], "usage": _usage(value)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled = True  # a no-op once finished; stops the work when the client went away


def main(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
         sampling: Sampling = Sampling(), memory_dir: str | Path | None = None, dtype: str = "fp32") -> int:
    """Load the model folder in `dtype` (quant.DTYPES) and serve until interrupted. Binds the socket first so the
    printed URL is the real one (port 0 picks a free port: tests use it)."""
    import uvicorn

    from persona_lm import quant

    if dtype == "int8" and memory_dir is not None:
        raise PersonaError("--memory needs trainable weights (LoRA): use --dtype fp32 or bf16 with it, not int8")
    model, tok, config = quant.load(model_dir, dtype)
    bank = None
    if memory_dir is not None:
        from persona_lm.memory import Bank

        bank = Bank(model, Path(model_dir), Path(memory_dir), say=lambda m: print(m, file=sys.stderr, flush=True))
    app = create_app(model, tok, config, limits=limits, sampling=sampling, memory=bank)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this machine can talk to the model",
              file=sys.stderr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise PersonaError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {config.get('persona') or 'the model'} at http://{shown}:{bound}/ "
          f"(OpenAI API at http://{shown}:{bound}/v1)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
