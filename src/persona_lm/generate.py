"""Generation: KV cache, sampling and streaming — the only generation code in the project.

Three layers, each usable on its own:
- `Decoder` turns a prompt into a stream of token ids: prefill the prompt once, then feed one token per step
  through the KV cache (or, with `use_cache=False`, recompute the whole window: the reference and benchmark
  baseline). It stops only at max_new_tokens; the caller decides when a reply is over.
- `TextStream` turns token ids into text deltas that never split a UTF-8 character and never leak a stop string.
- `stream()` / `generate()` join the two for one chat reply: stop tokens, stop strings, max_new_tokens, and the
  reply's detected emotion.

The context never exceeds `block_size`. The prompt must fit (the chat layer drops the oldest whole turns
before calling); when prompt + reply reach `block_size` mid-reply, the decoder re-windows: it keeps the most
recent `block_size // 2` tokens and prefills them again, so one prefill buys block_size // 2 more cached steps.
Learned position embeddings have nothing beyond `block_size`, so a sliding cache is not an option for them;
for RoPE re-prefilling is simply correct too. `use_cache=False` windows by the same rule, so both paths agree.

A model with memory attention (model.memory_layers) takes prompts of any length: the tokens that leave the
window at a re-window are compressed into its memory (model.Memory) instead of being dropped, and a prompt
longer than `block_size` is prefilled window by window by the same rule, as if its tokens had been generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


class KVCache:
    """Preallocated keys and values for every layer: one (batch, 2 * n_kv_head, block_size, head_dim) buffer
    each, keys in the first n_kv_head heads and values in the rest.

    The attention layers call `append(layer, kv)` once per layer with the new chunk (keys and values as one
    tensor: one copy) and attend over the returned view; the model calls `advance(T)` after the last layer.
    Nothing is allocated per step.
    """

    def __init__(self, cfg, batch_size: int = 1, device=None, dtype=torch.float32):
        shape = (batch_size, 2 * cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.block_size = cfg.block_size
        self.length = 0

    def append(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        start, T = self.length, kv.shape[2]
        if start + T > self.block_size:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > block_size {self.block_size}")
        buf = self.kv[layer]
        buf.narrow(2, start, T).copy_(kv)
        return buf.narrow(2, 0, start + T)

    def advance(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        self.length = 0

    def crop(self, n: int) -> None:
        """Keep the first n positions (e.g. a shared prompt prefix); later appends overwrite the rest."""
        self.length = max(0, min(n, self.length))


class MemoryKVCache(KVCache):
    """A KV cache whose memory layers also hold the compressed memory: the slots sit in front of the window in
    the same buffer, so attention stays one call over [memory ; window]. The model passes the cache as its
    `memory` too: `attend` adds the memory bias (model.memory_mask). `push(n)` compresses the window's oldest n
    positions into the slots and empties the window (the caller re-prefills what it keeps). `rope`: the model's
    (cos, sin) tables, to take the rotation off the cached keys before pooling (memory keys carry none)."""

    def __init__(self, cfg, batch_size: int = 1, device=None, dtype=torch.float32, rope=None):
        super().__init__(cfg, batch_size, device, dtype)
        self.layers, self.n_kv_head = cfg.memory_layers, cfg.n_kv_head
        self.rate, self.n_slots, self.rope = cfg.memory_compression, cfg.memory_slots, rope
        for layer in self.layers:
            self.kv[layer] = torch.zeros((batch_size, 2 * cfg.n_kv_head, cfg.memory_slots + cfg.block_size,
                                          cfg.head_dim), device=device, dtype=dtype)
        self.held = 0  # memory slots in use, the same number at every memory layer

    def append(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        start, T = self.length, kv.shape[2]
        if start + T > self.block_size:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > block_size {self.block_size}")
        off = self.held if layer in self.layers else 0
        buf = self.kv[layer]
        buf.narrow(2, off + start, T).copy_(kv)
        return buf.narrow(2, 0, off + start + T)

    def attend(self, layer: int, fresh: torch.Tensor, kv: torch.Tensor, mask, bias: torch.Tensor):
        """(kv, mask) for attention at `layer`: the cached [memory ; window] view as it is, the mask with the
        memory bias on the slots (see model.Memory.attend, the uncached counterpart)."""
        if not self.held or layer not in self.layers:
            return kv, mask
        from persona_lm.model import memory_mask

        S = kv.shape[2] - self.held
        if mask is not None:
            mask = mask[..., self.held:]  # the attention layer built it over slots and window alike
        return kv, memory_mask(bias, self.held, mask, fresh.shape[2], S, kv.dtype)

    def push(self, n: int) -> None:
        from persona_lm.model import apply_rope, remember

        held = self.held
        for layer in self.layers:
            buf = self.kv[layer]
            slots = buf[:, :, :self.held] if self.held else None
            leaving = buf[:, :, self.held:self.held + n]
            if self.rope is not None:
                cos, sin = (t[:n].to(buf.dtype) for t in self.rope)
                k, v = leaving.split_with_sizes([self.n_kv_head, self.n_kv_head], 1)
                leaving = torch.cat([apply_rope(k, cos, -sin), v], dim=1)  # rotating back by -angle
            slots = remember(slots, leaving, self.rate, self.n_slots)
            held = slots.shape[2]
            buf[:, :, :held] = slots
        self.held, self.length = held, 0

    def reset(self) -> None:
        self.length = self.held = 0


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float,
                             exempt: torch.Tensor | None = None) -> torch.Tensor:
    """Make tokens already in `ids` less likely: positive logits are divided by `penalty`, negative ones
    multiplied by it. Dividing a negative logit would raise it — the bug this function exists to avoid.

    logits (..., V), ids (..., N) long, exempt: optional (V,) bool mask of tokens never penalised (chat control
    tokens: every past turn ends in <|end|>, which must stay as likely as the model thinks). Returns a new tensor.
    """
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    seen = logits.gather(-1, ids)
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    if exempt is not None:
        penalised = torch.where(exempt[ids], seen, penalised)
    return logits.scatter(-1, ids, penalised)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k and outside the nucleus to -inf (0 / 1.0 disable each).

    top-k keeps exactly k tokens (ties broken by torch.topk); top-p keeps the smallest set of most likely
    tokens whose probability reaches top_p, always at least one.
    """
    if top_k and top_k < logits.shape[-1]:
        vals, idx = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, idx, sorted_logits)
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (...,) from logits (..., V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


class Decoder:
    """Token ids continuing `prompt`, one per iteration, up to `max_new_tokens`.

    After each yielded token, `last_hidden` (1, n_embd) holds the final hidden state of the position whose
    logits produced it: the emotion head reads the reply there at no extra cost.
    """

    def __init__(self, model, prompt: Sequence[int], *, max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 persona: int | None = None, use_cache: bool = True, penalty_exempt: Sequence[int] = ()):
        block = model.cfg.block_size
        self.remembers = bool(getattr(model.cfg, "memory_layers", ()))
        if len(prompt) == 0:
            raise ValueError("the prompt is empty: generation needs at least one token to continue")
        if len(prompt) > block and not self.remembers:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the model's context (block_size) is {block}; "
                             "drop the oldest turns before generating")
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.max_new_tokens, self.n_prompt = max_new_tokens, len(prompt)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.exempt = repetition_penalty, None
        if penalty_exempt:
            self.exempt = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=self.device)
            self.exempt[list(penalty_exempt)] = True
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.persona = None if persona is None else torch.tensor([persona], device=self.device)
        self.cache = model.new_cache(1, self.device, p.dtype) if use_cache else None
        self.memory = None  # with memory attention: the cache (a MemoryKVCache), or uncached a model.Memory
        if self.remembers and use_cache:
            self.memory = self.cache
        self.ids = torch.empty(1, len(prompt) + max_new_tokens, dtype=torch.long, device=self.device)
        self.ids[0, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        self.keep = max(1, block // 2)
        self.last_hidden: torch.Tensor | None = None

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        # Only the last position's logits are needed: skipping the rest makes prefill cheaper.
        # A one-token step runs without oneDNN: its GELU costs ~18 us a call however small the input, where
        # PyTorch's own kernel takes 4 us (~10% of a 13.9M-model step on 2 cores). Prefills keep it: bf16
        # matmuls over many tokens need it.
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = onednn and idx.shape[1] > 1
        try:
            if self.memory is None:
                h = self.model.hidden(idx, self.persona, self.cache)
            else:
                h = self.model.hidden(idx, self.persona, self.cache, memory=self.memory)
        finally:
            torch.backends.mkldnn.enabled = onednn
        self.last_hidden = h[:, -1]
        return self.model.lm_head(self.last_hidden).float()

    def _leave(self, n: int) -> None:
        """The window's oldest n tokens leave it: into memory (the cache then starts a new window), or gone."""
        if self.remembers:
            self.memory.push(n)
        elif self.cache is not None:
            self.cache.reset()

    @torch.inference_mode()
    def __iter__(self) -> Iterator[int]:
        model, ids, cache, block = self.model, self.ids, self.cache, self.model.cfg.block_size
        was_training = model.training
        model.eval()
        try:
            if self.max_new_tokens <= 0:
                return
            if cache is not None:
                cache.reset()
            elif self.remembers:
                from persona_lm.model import Memory

                self.memory = Memory(model.cfg)
            n, start = self.n_prompt, 0
            while n - start > block:  # a long prompt (memory attention only): window by window
                self._logits(ids[:, start:start + block])
                self._leave(block + 1 - self.keep)
                start += block + 1 - self.keep
            logits = self._logits(ids[:, start:n])
            for step in range(self.max_new_tokens):
                logits = apply_repetition_penalty(logits, ids[:, :n], self.repetition_penalty, self.exempt)
                tok = sample(logits, self.temperature, self.top_k, self.top_p, self.generator)
                ids[:, n] = tok
                n += 1
                yield int(tok)
                if step == self.max_new_tokens - 1:
                    break
                if n - start > block:  # re-window: keep the most recent tokens, prefill them from scratch
                    self._leave(n - self.keep - start)
                    start = n - self.keep
                    logits = self._logits(ids[:, start:n])
                elif cache is not None:
                    logits = self._logits(ids[:, n - 1:n])
                else:
                    logits = self._logits(ids[:, start:n])
        finally:
            model.train(was_training)


class TextStream:
    """Incremental detokenisation.

    A character whose bytes are spread over several tokens decodes as a trailing U+FFFD until its last byte
    arrives, so trailing U+FFFD is held back; so is any tail that could be the start of a stop string. Once a
    stop string appears the text is cut before it and `stopped` is set. Decoding restarts from the last token
    after which the text ended on a whole character (bytes after a character boundary decode independently),
    so a push costs the same at token 500 as at token 5. Tokenizers whose decoders drop a word's leading space
    at the start of a decode (sentencepiece style, `decode_needs_context`) decode the restart with the token
    before it and cut that token's text off again.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self.anchor, self.anchor_text = 0, ""  # ids[:anchor] decode to anchor_text, ending on a whole character

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.anchor_text + self._decode_from(self.anchor)
        if not text.endswith("\ufffd"):
            self.anchor, self.anchor_text = len(self.ids), text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.text = True, text[:min(hits)]
            return self._emit(len(self.text))
        self.text = text
        stable = len(text.rstrip("\ufffd"))
        return self._emit(stable - self._stop_prefix(text[:stable]))

    def _decode_from(self, start: int) -> str:
        if start and self.tokenizer.decode_needs_context:  # see the class docstring
            head = self.tokenizer.decode(self.ids[start - 1:start])
            text = self.tokenizer.decode(self.ids[start - 1:])
            return text[len(head):] if text.startswith(head) else text
        return self.tokenizer.decode(self.ids[start:])

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta


@dataclass
class Result:
    text: str
    ids: list[int]            # every sampled token, the one that stopped generation included
    finish_reason: str        # "stop" (stop token or stop string) | "length" (max_new_tokens)
    emotion: str | None
    n_prompt: int
    n_new: int
    seconds: float


class Generation:
    """One reply: iterate for text deltas; afterwards `result` holds the whole Result.

    The tokens come from its own Decoder when iterated, or from a `Batch` that decodes many replies together
    (the server), which hands each sampled token to `push`."""

    def __init__(self, model, tokenizer, prompt: Sequence[int], *, stop: Sequence[str] = (),
                 emotions: Sequence[str] | None = None, ignore_end: bool = False, **sampling):
        self.model, self.tokenizer, self.stop, self.emotions = model, tokenizer, stop, emotions
        # Control tokens are structure, not content: the repetition penalty leaves them alone.
        self.decoder = Decoder(model, prompt, penalty_exempt=sorted(tokenizer.special_ids), **sampling)
        self.stop_ids = set() if ignore_end else tokenizer.stop_ids
        self.result: Result | None = None
        self.text = TextStream(tokenizer, stop)
        self.ids: list[int] = []
        self.t0: float | None = None

    def begin(self) -> None:
        """Start the clock (the prompt's prefill counts in Result.seconds)."""
        self.t0 = time.perf_counter()

    def push(self, tok: int) -> tuple[str, bool]:
        """One sampled token in: (the text it completes, possibly "", and whether the reply is over)."""
        self.ids.append(tok)
        if tok in self.stop_ids:
            return self._end("stop")
        delta = self.text.push(tok)
        if self.text.stopped:
            return delta + self._end("stop")[0], True
        if len(self.ids) >= self.decoder.max_new_tokens:
            return delta + self._end("length")[0], True
        return delta, False

    def _end(self, reason: str) -> tuple[str, bool]:
        delta = self.text.flush()
        self.result = Result(self.text.text, self.ids, reason, self._emotion(), self.decoder.n_prompt, len(self.ids),
                             time.perf_counter() - self.t0)
        return delta, True

    def __iter__(self) -> Iterator[str]:
        self.begin()
        for tok in self.decoder:
            delta, done = self.push(tok)
            if delta:
                yield delta
            if done:
                return
        self._end("length")  # max_new_tokens <= 0: nothing was generated

    @torch.inference_mode()
    def _emotion(self) -> str | None:
        """The emotion head on the hidden state that predicted the reply's end (or its last token)."""
        head = getattr(self.model, "emotion_head", None)
        h = self.decoder.last_hidden
        if head is None or not self.emotions or h is None:
            return None
        if len(self.emotions) != head.out_features:
            raise ValueError(f"{len(self.emotions)} emotion labels for an emotion head of {head.out_features}")
        return self.emotions[int(head(h).argmax(-1))]


class Batch:
    """Continuous batching: many Decoders advanced by one batched forward per step, as a server needs them.

    Requests join and leave between steps (Orca's iteration-level scheduling, Yu et al. 2022, "Orca: A
    Distributed Serving System for Transformer-Based Generative Models"). The rows share one KV cache timeline:
    each row's tokens end at the newest position and the row is left-padded before them, so one step feeds every
    row's last token at the same position and `GPT.hidden`'s `pad` keeps each row's positions and attention its
    own. Rows that join together are prefilled together (left-padded, as in generate_batch), one that joins alone
    in its Decoder's own cache, and their keys and values are copied into the batch: when a prompt is longer than
    the timeline, the timeline grows to the right (every other row gains padding); when rows leave, padding every
    row shares is cut off again. A row whose window is full re-windows as a lone Decoder does (keeps the newest
    block_size // 2 tokens and prefills them again, alone), so prompts, sampling, repetition penalty and
    re-windowing follow the Decoder's rules row by row.

    On this CPU build every row comes out bit for bit as the lone Decoder's (the tests check it, sampled rows
    included), but nothing guarantees it in general: a (B, n_embd) matrix product may round a row's last bit
    differently from a (1, n_embd) one (GPU kernels do), and then a near-tie can break the other way. Not for
    memory attention models (each row's memory would need its own slots): see `batchable`.
    """

    def __init__(self, model):
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.block = model.cfg.block_size
        self.keep = max(1, self.block // 2)
        self.rows: list[_Row] = []
        self.kv: list[torch.Tensor] = []  # per layer (rows, 2 * n_kv_head, block_size, head_dim), as KVCache
        self.length = 0                   # the shared timeline: every row's tokens end at this position

    @staticmethod
    def batchable(model) -> bool:
        return not getattr(model.cfg, "memory_layers", ()) and hasattr(model, "blocks")

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, *decoders: Decoder) -> None:
        """Prefill the decoders' prompts (together, left-padded as in generate_batch) and make them rows; their first
        tokens are sampled by the next `sample`."""
        for d in decoders:
            if d.cache is None or d.remembers:
                raise ValueError("a batch needs cached Decoders of a model without memory attention")
        if len(decoders) == 1:  # alone: in the decoder's own cache, exactly as a lone reply
            d = decoders[0]
            d.cache.reset()
            row = _Row(d, d.n_prompt, 0, logits=d._logits(d.ids[:, :d.n_prompt]))
            self._place([row], [[buf[:, :, :row.n] for buf in d.cache.kv]])
            return
        width = max(d.n_prompt for d in decoders)
        pad = torch.tensor([width - d.n_prompt for d in decoders], device=self.device)
        idx = torch.zeros(len(decoders), width, dtype=torch.long, device=self.device)
        for b, d in enumerate(decoders):
            idx[b, width - d.n_prompt:] = d.ids[0, :d.n_prompt]
        cache = self.model.new_cache(len(decoders), self.device, self.dtype)
        h = self.model.hidden(idx, self._personas(decoders), cache, pad)[:, -1]
        logits = self.model.lm_head(h).float()
        rows = []
        for b, d in enumerate(decoders):
            d.last_hidden = h[b:b + 1]
            rows.append(_Row(d, d.n_prompt, 0, logits=logits[b:b + 1]))
        self._place(rows, [[buf[b:b + 1, :, width - d.n_prompt:width] for buf in cache.kv]
                           for b, d in enumerate(decoders)])

    def drop(self, decoder: Decoder) -> None:
        """The row of `decoder` leaves (finished or cancelled); its cache row is freed at once."""
        keep = [i for i, r in enumerate(self.rows) if r.decoder is not decoder]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        self.kv = [buf.index_select(0, index) for buf in self.kv]
        self._compact()

    @torch.inference_mode()
    def sample(self) -> list[tuple[Decoder, int]]:
        """Each row's next token from its pending logits, with the row's own sampling settings and generator.

        The same operations as the lone `apply_repetition_penalty` and `sample`, on all rows at once: the penalty
        as one masked update (each row's penalised tokens kept as a mask, `_Row.seen`), temperature and the top-k /
        top-p filters on the rows that share settings; only the draw itself is per row (each row's generator)."""
        rows = self.rows
        if not rows:
            return []
        decoders = [r.decoder for r in rows]
        if len(rows) == 1:  # alone: the lone Decoder's own calls
            d, row = decoders[0], rows[0]
            logits = apply_repetition_penalty(row.logits, d.ids[:, :row.n], d.repetition_penalty, d.exempt)
            row.seen = None  # not kept up to date alone: rebuilt when the row has company
            return self._record([int(sample(logits, d.temperature, d.top_k, d.top_p, d.generator))])
        for row in rows:
            if row.seen is None:
                d = row.decoder
                row.seen = torch.zeros(1, self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
                row.seen[0, d.ids[0, :row.n]] = True
                if d.exempt is not None:
                    row.seen &= ~d.exempt
        logits = torch.cat([r.logits for r in rows])
        penalty = torch.tensor([d.repetition_penalty for d in decoders], device=self.device).view(-1, 1)
        if bool((penalty != 1.0).any()):
            seen = torch.cat([r.seen for r in rows]) & (penalty != 1.0)
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        toks = logits.argmax(-1)
        groups: dict[tuple, list[int]] = {}
        for b, d in enumerate(decoders):
            if d.temperature > 0:
                groups.setdefault((d.top_k, d.top_p), []).append(b)
        for (top_k, top_p), members in groups.items():
            index = torch.tensor(members, device=self.device)
            temperature = torch.tensor([decoders[b].temperature for b in members], device=self.device).view(-1, 1)
            probs = filter_logits(logits[index].float() / temperature, top_k, top_p).softmax(-1)
            for i, b in enumerate(members):
                toks[b] = torch.multinomial(probs[i:i + 1], 1, generator=decoders[b].generator)[0, 0]
        return self._record(toks.tolist())

    def _record(self, toks: list[int]) -> list[tuple[Decoder, int]]:
        out = []
        for row, tok in zip(self.rows, toks):
            d = row.decoder
            d.ids[0, row.n] = tok
            row.n += 1
            if row.seen is not None:
                row.seen[0, tok] = d.exempt is None or not bool(d.exempt[tok])
            out.append((d, tok))
        return out

    @torch.inference_mode()
    def step(self) -> None:
        """Feed every row's newest token (one batched forward), re-windowing the rows whose window is full."""
        full = [r for r in self.rows if r.n - r.start > self.block]
        for row in full:
            self.drop(row.decoder)
        if self.rows:
            self._compact()
            rows = self.rows
            if len(rows) == 1:
                idx = rows[0].decoder.ids[:, rows[0].n - 1:rows[0].n]
            else:
                idx = torch.stack([r.decoder.ids[0, r.n - 1] for r in rows]).view(-1, 1)
            pad = [self.length - r.cached for r in rows]
            # no padding (one row, or rows of one length): the plain causal path, as a lone Decoder takes
            pad = torch.tensor(pad, device=self.device) if any(pad) else None
            persona = self._personas([r.decoder for r in rows])
            cache = _SharedCache(self.kv, self.length)
            onednn = torch.backends.mkldnn.enabled  # one token per row: as Decoder._logits, without oneDNN
            torch.backends.mkldnn.enabled = False
            try:
                h = self.model.hidden(idx, persona, cache, pad)[:, -1]
            finally:
                torch.backends.mkldnn.enabled = onednn
            self.length += 1
            logits = self.model.lm_head(h).float()
            for b, row in enumerate(rows):
                row.cached += 1
                row.logits = logits[b:b + 1]
                row.decoder.last_hidden = h[b:b + 1]
        for row in full:  # prefilled alone, then back in
            row.start = row.n - self.keep
            row.decoder.cache.reset()
            row.logits = row.decoder._logits(row.decoder.ids[:, row.start:row.n])
            self._place([row], [[buf[:, :, :row.n - row.start] for buf in row.decoder.cache.kv]])

    def _personas(self, decoders: Sequence[Decoder]) -> torch.Tensor | None:
        """(B,) persona ids, persona 0 for rows that name none (as GPT.hidden's default); None when none does."""
        if all(d.persona is None for d in decoders):
            return None
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        return torch.cat([zero if d.persona is None else d.persona for d in decoders])

    def _place(self, rows: list["_Row"], kvs: list[list[torch.Tensor]]) -> None:
        """Make `rows` new rows of the batch, row i holding `kvs[i]` (per layer (1, 2 * n_kv_head, c_i, head_dim):
        its c_i tokens) and ending at the timeline's newest position."""
        longest = max(kv[0].shape[2] for kv in kvs)
        if longest > self.length:  # the timeline grows to the right: the rows so far gain padding
            self._shift(longest - self.length)
        first = kvs[0]
        if not self.kv:
            shape = (0, first[0].shape[1], self.block, first[0].shape[3])
            self.kv = [torch.zeros(shape, device=self.device, dtype=t.dtype) for t in first]
        L = self.length
        for layer, buf in enumerate(self.kv):
            lines = torch.zeros((len(rows), *buf.shape[1:]), device=self.device, dtype=buf.dtype)
            for i, kv in enumerate(kvs):
                c = kv[layer].shape[2]
                lines[i, :, L - c:L] = kv[layer][0]
            self.kv[layer] = torch.cat([buf, lines])
        for row, kv in zip(rows, kvs):
            row.cached = kv[0].shape[2]
            self.rows.append(row)

    def _shift(self, d: int) -> None:
        """Move the timeline d positions to the right (d < 0: to the left, cutting shared padding)."""
        L = self.length
        for buf in self.kv:
            if d > 0:
                buf[:, :, d:d + L] = buf[:, :, :L].clone()
            else:
                buf[:, :, :L + d] = buf[:, :, -d:L].clone()
        self.length = L + d

    def _compact(self) -> None:
        if not self.rows:
            self.kv, self.length = [], 0
            return
        shared = self.length - max(r.cached for r in self.rows)  # padding that every row has
        if shared > 0:
            self._shift(-shared)


@dataclass
class _Row:
    decoder: Decoder
    n: int                   # tokens in decoder.ids (prompt and reply so far)
    start: int               # where the current window begins in decoder.ids
    cached: int = 0          # this row's tokens in the batch cache, ending at the timeline's newest position
    logits: torch.Tensor | None = None  # (1, vocab): the next token's, not yet sampled
    seen: torch.Tensor | None = None    # (1, vocab) bool: the tokens the repetition penalty applies to (batched)


class _SharedCache(KVCache):
    """The batch's buffers seen through KVCache's interface for one forward (GPT.hidden appends and advances)."""

    def __init__(self, kv: list[torch.Tensor], length: int):
        self.kv, self.block_size, self.length = kv, kv[0].shape[2], length


def stream(model, tokenizer, prompt: Sequence[int], **kw) -> Generation:
    """Text deltas of one reply as they are produced; see `generate` for the arguments."""
    return Generation(model, tokenizer, prompt, **kw)


def generate(model, tokenizer, prompt: Sequence[int], **kw) -> Result:
    """One reply to `prompt` (token ids, e.g. ChatTokenizer.prompt(turns)).

    Keyword arguments: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, seed,
    persona, use_cache (see Decoder); stop (strings that end the reply, not included in it), emotions (the
    emotion head's labels, to detect the reply's emotion), ignore_end (keep going past <|end|>: benchmarks).
    """
    g = stream(model, tokenizer, prompt, **kw)
    for _ in g:
        pass
    return g.result


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                   temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   seed: int | None = None, stop: Sequence[str] = (), emotions: Sequence[str] | None = None) -> list[Result]:
    """Replies to several prompts with one forward pass per step for all of them (evaluation's many probes).

    The prompts are left-padded to one length; the model's `pad` argument keeps each row's positions and
    attention its own, and each row is sampled with its own generator seeded by `seed`, so a row decodes what
    `generate()` decodes for it alone (a batched matrix product may round differently: a near-tie can break
    the other way). Every prompt plus max_new_tokens must fit block_size (no re-windowing here): ValueError
    otherwise. Rows that finish early ride along until the last one ends. Returns one Result per prompt, in
    order; `seconds` is the whole batch's time.
    """
    t0 = time.perf_counter()
    block, B = model.cfg.block_size, len(prompts)
    if not prompts:
        return []
    if any(len(pr) == 0 or len(pr) + max_new_tokens > block for pr in prompts):
        raise ValueError(f"generate_batch needs every prompt non-empty and prompt + max_new_tokens <= block_size {block}")
    device = next(model.parameters()).device
    width = max(len(pr) for pr in prompts)
    pad = torch.tensor([width - len(pr) for pr in prompts], device=device)
    ids = torch.full((B, width + max_new_tokens), tokenizer.pad, dtype=torch.long, device=device)
    for b, pr in enumerate(prompts):
        ids[b, width - len(pr):width] = torch.tensor(list(pr), dtype=torch.long)
    exempt = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)
    exempt[sorted(tokenizer.special_ids)] = True
    generators = [None if seed is None else torch.Generator(device=device).manual_seed(seed) for _ in range(B)]
    streams = [TextStream(tokenizer, stop) for _ in range(B)]
    new: list[list[int]] = [[] for _ in range(B)]
    reasons, ends = ["length"] * B, [None] * B
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, device, next(model.parameters()).dtype)
        h = model.hidden(ids[:, :width], None, cache, pad)[:, -1]
        n = width
        for step in range(max_new_tokens):
            logits = model.lm_head(h).float()
            for b in range(B):
                if ends[b] is not None:
                    continue
                row = apply_repetition_penalty(logits[b:b + 1], ids[b:b + 1, int(pad[b]):n], repetition_penalty, exempt)
                tok = int(sample(row, temperature, top_k, top_p, generators[b]))
                ids[b, n] = tok
                new[b].append(tok)
                if tok in tokenizer.stop_ids:
                    reasons[b] = "stop"
                else:
                    streams[b].push(tok)
                    if streams[b].stopped:
                        reasons[b] = "stop"
                if reasons[b] == "stop" or step == max_new_tokens - 1:
                    ends[b] = h[b:b + 1]  # the state whose logits gave the last token: the emotion head reads it
            n += 1
            if all(e is not None for e in ends):
                break
            h = model.hidden(ids[:, n - 1:n], None, cache, pad)[:, -1]
    finally:
        model.train(was_training)
    head = getattr(model, "emotion_head", None)
    seconds = time.perf_counter() - t0
    results = []
    for b in range(B):
        streams[b].flush()
        emotion = None
        if head is not None and emotions:
            emotion = emotions[int(head(ends[b]).argmax(-1))]
        results.append(Result(streams[b].text, new[b], reasons[b], emotion, len(prompts[b]), len(new[b]), seconds))
    return results
