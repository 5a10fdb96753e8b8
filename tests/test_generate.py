"""Generation: cached decoding equals recomputation (re-windowing included), sampling filters keep exactly the
right tokens, the repetition penalty pushes negative logits down, streaming never splits a UTF-8 character."""

import pytest
import torch
import torch.nn as nn

from persona_lm.generate import (Batch, Decoder, KVCache, TextStream, apply_repetition_penalty, filter_logits, generate,
                                 sample, stream)
from persona_lm.model import GPT, GPTConfig
from persona_lm.tokenizer import ChatTokenizer, train_tokenizer

EMOTIONS = ["happy", "sad", "angry"]
LINES = ["Café crème brûlée, s'il vous plaît 😀", "Ça va? Très bien, merci! 🎉", "naïve façade, über schön 👍🏽",
         "日本語のテキスト ✨ and plain words", "Hello there, how are you today?", "I am fine, thank you 😀🎉"]
FAMILIES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=4),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
}


@pytest.fixture(scope="module")
def tok():
    # A small vocabulary keeps emoji and accented letters split over several byte tokens.
    return ChatTokenizer(train_tokenizer(LINES * 3, "bpe", 300, EMOTIONS))


def tiny(vocab_size, family="gpt2", block_size=32, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_embd=32, n_personas=2,
                    n_emotions=len(EMOTIONS), tie_embeddings=False, **FAMILIES[family], **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        nn.init.normal_(model.wte.weight, std=0.5)
        nn.init.normal_(model.lm_head.weight, std=0.5)
        nn.init.normal_(model.persona.weight, std=0.1)
        nn.init.normal_(model.emotion_head.weight, std=1.0)
    return model


def tokens(model, prompt, **kw):
    return list(Decoder(model, prompt, **kw))


def reference_greedy(model, prompt, n, persona=None):
    """Recompute everything from scratch each step, with the windowing rule the decoder documents."""
    block, keep = model.cfg.block_size, model.cfg.block_size // 2
    ids, start, out = list(prompt), 0, []
    p = None if persona is None else torch.tensor([persona])
    with torch.no_grad():
        for _ in range(n):
            if len(ids) - start > block:
                start = len(ids) - keep
            logits, _ = model(torch.tensor([ids[start:]]), p)
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_uncached_greedy(family):
    model = tiny(64, family)
    prompt = [3, 14, 15, 9, 26, 5, 35]
    kw = dict(max_new_tokens=20, temperature=0, persona=1)
    cached = tokens(model, prompt, **kw)
    assert cached == tokens(model, prompt, use_cache=False, **kw) == reference_greedy(model, prompt, 20, persona=1)
    # sampling draws the same random numbers on both paths, so a seed reproduces across them too
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=20, seed=7)
    assert tokens(model, prompt, **kw) == tokens(model, prompt, use_cache=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_rewindowing_past_block_size(family):
    model = tiny(64, family, block_size=16)
    prompt = list(range(10, 22))
    # a repetition penalty keeps greedy decoding from settling into one repeated token
    kw = dict(max_new_tokens=40, temperature=0, repetition_penalty=1.5)
    cached = tokens(model, prompt, **kw)
    assert len(cached) == 40
    assert cached == tokens(model, prompt, use_cache=False, **kw)
    assert tokens(model, prompt, max_new_tokens=40, temperature=0) == reference_greedy(model, prompt, 40)


def test_kv_cache_crop_reuses_a_prefix():
    model = tiny(64, "llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cache = KVCache(model.cfg)
    with torch.inference_mode():
        model(ids, cache=cache)
        cache.crop(3)
        step, _ = model(torch.tensor([[42, 43]]), cache=cache)
        full, _ = model(torch.tensor([[5, 6, 7, 42, 43]]))
    assert cache.length == 5
    torch.testing.assert_close(step[0], full[0, 3:])
    cache.reset()
    assert cache.length == 0


def test_repetition_penalty_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    # positive divided, negative multiplied: both seen tokens become less likely, unseen ones keep their logit
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    before, after = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]
    assert apply_repetition_penalty(logits, torch.tensor([[1]]), 1.0) is logits
    exempt = torch.tensor([False, True, False, False])  # e.g. <|end|>, present in every past turn
    assert apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0, exempt).tolist() == [[1.0, -2.0, 1.0, -1.0]]


def test_top_k_and_top_p_keep_exact_sets():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 by probability
    kept = lambda out: {i for i, v in enumerate(out.tolist()) if v != float("-inf")}
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=3)) == {0, 1, 3}
    assert kept(filter_logits(logits, top_p=0.4)) == {1}
    assert kept(filter_logits(logits, top_p=0.75)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.85)) == {0, 1, 3}
    assert kept(filter_logits(logits, top_k=2, top_p=0.99)) == {1, 3}
    assert kept(filter_logits(logits)) == {0, 1, 2, 3}
    torch.testing.assert_close(filter_logits(logits, top_p=0.85)[[0, 1, 3]], logits[[0, 1, 3]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_p=0.75, generator=g)) for _ in range(200)}
    assert draws == {1, 3}
    assert int(sample(logits, temperature=0)) == 1


def test_seeded_determinism(tok):
    model = tiny(tok.vocab_size)
    prompt = tok.prompt([{"from": "human", "value": "Hello there"}])
    kw = dict(max_new_tokens=15, temperature=1.0, ignore_end=True)
    a, b = generate(model, tok, prompt, seed=1, **kw), generate(model, tok, prompt, seed=1, **kw)
    c = generate(model, tok, prompt, seed=2, **kw)
    assert a.ids == b.ids and a.text == b.text
    assert a.ids != c.ids


def test_max_new_tokens_and_result(tok):
    model = tiny(tok.vocab_size)
    prompt = tok.prompt([{"from": "human", "value": "Hello there"}])
    r = generate(model, tok, prompt, max_new_tokens=9, temperature=0, ignore_end=True)
    assert (r.n_new, len(r.ids), r.finish_reason, r.n_prompt) == (9, 9, "length", len(prompt))
    assert r.text == tok.decode(r.ids) and r.seconds > 0
    assert generate(model, tok, prompt, max_new_tokens=0).finish_reason == "length"


def test_too_long_prompt_raises(tok):
    model = tiny(tok.vocab_size, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, tok, list(range(17)))
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [])


def test_emotion_is_read_where_the_end_is_predicted(tok):
    model = tiny(tok.vocab_size)
    prompt = tok.prompt([{"from": "human", "value": "How are you?"}])
    kw = dict(temperature=0, repetition_penalty=1.3)
    free = generate(model, tok, prompt, max_new_tokens=12, ignore_end=True, **kw).ids
    j = next(i for i in range(2, 12) if free[i] not in free[:i])
    assert not tok.stop_ids & set(free[:j + 1])
    stop_ids = tok.stop_ids
    tok.stop_ids = stop_ids | {free[j]}  # pretend a token the model will produce ends a reply
    try:
        stopped = generate(model, tok, prompt, max_new_tokens=12, emotions=EMOTIONS, **kw)
        cut = generate(model, tok, prompt, max_new_tokens=j, emotions=EMOTIONS, **kw)
        assert generate(model, tok, prompt, max_new_tokens=12, **kw).emotion is None
    finally:
        tok.stop_ids = stop_ids
    assert (stopped.ids, stopped.finish_reason, cut.ids, cut.finish_reason) == (free[:j + 1], "stop", free[:j], "length")
    for r in (stopped, cut):
        # read at the position whose logits produced the last token: for a finished reply, its last content token
        x = torch.tensor([prompt + r.ids[:-1]])
        with torch.no_grad():
            _, emo = model(x, emotion_index=torch.tensor([x.shape[1] - 1]))
        assert r.emotion == EMOTIONS[int(emo.argmax())]


class Scripted(nn.Module):
    """Stands in for GPT: always predicts the next token of `script`, so the text layer can be tested exactly."""

    def __init__(self, script, n_prompt, vocab_size):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=vocab_size, block_size=256, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.script, self.n_prompt, self.emotion_head = script, n_prompt, None
        self.lm_head = nn.Identity()
        self.unused = nn.Parameter(torch.zeros(1))

    def new_cache(self, batch_size=1, device=None, dtype=torch.float32):
        return KVCache(self.cfg, batch_size, device, dtype)

    def hidden(self, idx, persona=None, cache=None):
        end = idx.shape[1] + (cache.length if cache is not None else 0)
        if cache is not None:
            cache.advance(idx.shape[1])
        h = torch.zeros(*idx.shape, self.cfg.vocab_size)
        h[:, -1, self.script[min(end - self.n_prompt, len(self.script) - 1)]] = 10.0
        return h


def scripted_reply(tok, script, **kw):
    prompt = tok.prompt([{"from": "human", "value": "hi"}])
    g = stream(Scripted(script, len(prompt), tok.vocab_size), tok, prompt, temperature=0, **kw)
    deltas = list(g)
    return deltas, g.result


def test_stream_never_splits_utf8(tok):
    text = "Voilà! Ça va? 😀🎉 naïve 👍🏽 日本語 über"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs characters split over tokens"
    for script, reason in ((ids + [tok.end], "stop"), (ids, "length")):
        deltas, r = scripted_reply(tok, script, max_new_tokens=len(script))
        assert "".join(deltas) == r.text == text and r.finish_reason == reason
        assert not any("\ufffd" in d for d in deltas)
        assert len(deltas) > 5  # streamed, not emitted at the end in one piece


def test_stop_strings(tok):
    script = tok.encode("Hi\nUs then. 😀\nUser: more text") + [tok.end]
    deltas, r = scripted_reply(tok, script, stop=["\nUser:", "zzz"], max_new_tokens=50)
    assert r.text == "".join(deltas) == "Hi\nUs then. 😀"
    assert r.finish_reason == "stop" and r.n_new < len(script)
    assert not any("\nUser" in d for d in deltas)
    deltas, r = scripted_reply(tok, script, max_new_tokens=50)
    assert r.text == "Hi\nUs then. 😀\nUser: more text" and r.ids[-1] == tok.end


def test_text_stream_matches_full_decode_on_any_ids(tok):
    """Byte soup included (stray continuation bytes, cut characters, special tokens): deltas add up exactly."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = torch.randint(0, tok.vocab_size, (40,), generator=g).tolist()
        ts = TextStream(tok)
        assert "".join(ts.push(i) for i in ids) + ts.flush() == tok.decode(ids)


def test_text_stream_holds_back_a_possible_stop(tok):
    ts = TextStream(tok, stop=["END"])
    out = [ts.push(i) for i in tok.encode("ok EN")]
    assert "".join(out) == "ok " and not ts.stopped
    out += [ts.push(i) for i in tok.encode("D!")]
    assert ts.stopped and ts.text == "ok " and "".join(out) + ts.flush() == "ok "


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=20, top_p=0.9, seed=5,
                                                                 repetition_penalty=1.2)])
def test_batch_rows_equal_their_solo_replies(tok, family, sampling):
    from persona_lm.generate import generate_batch

    model = tiny(tok.vocab_size, family, block_size=64)
    texts = ["Hi", "How are you today, my friend?", "Café?", "Tell me something nice about the weather."]
    prompts = [tok.prompt([{"from": "human", "value": t}]) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row padded by a different amount
    kw = dict(max_new_tokens=12, stop=["!"], emotions=EMOTIONS, **sampling)
    batch = generate_batch(model, tok, prompts, **kw)
    for prompt, got in zip(prompts, batch):
        alone = generate(model, tok, prompt, **kw)
        assert (got.ids, got.text, got.finish_reason, got.emotion, got.n_prompt) == \
            (alone.ids, alone.text, alone.finish_reason, alone.emotion, alone.n_prompt)
    with pytest.raises(ValueError, match="block_size"):
        generate_batch(model, tok, [list(range(60))], max_new_tokens=8)


def test_padded_positions_never_attend_to_padding():
    from persona_lm.model import padded_positions

    pos, mask = padded_positions(0, 4, torch.tensor([0, 2]))
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    pos, mask = padded_positions(4, 1, torch.tensor([0, 2]))  # one decode step after the prompt
    assert pos.tolist() == [[4], [2]] and mask[:, 0].int().tolist() == [[[1, 1, 1, 1, 1]], [[0, 0, 1, 1, 1]]]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_join_and_leave_and_each_decodes_as_alone(tok, family):
    """Continuous batching: rows with different prompts, lengths, sampling settings, seeds and personas join
    one or two per step and leave when done (some re-window: block 32, up to 82 new tokens); each row's tokens equal
    the lone Decoder's, sampled rows included."""
    model = tiny(tok.vocab_size, family, block_size=32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, tok.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (12,), generator=g)]
    settings = [dict(max_new_tokens=5 + 7 * i, temperature=0 if i % 2 else 0.9, top_k=0 if i % 3 else 20, seed=i,
                     repetition_penalty=1.0 + 0.1 * (i % 3), persona=i % 2 if i % 4 else None) for i in range(12)]
    alone = [tokens(model, p, **kw) for p, kw in zip(prompts, settings)]
    batch, decoders = Batch(model), [Decoder(model, p, **kw) for p, kw in zip(prompts, settings)]
    out, waiting, widths = {id(d): [] for d in decoders}, list(decoders), set()
    while waiting or len(batch):
        if waiting:  # one alone, then two together (a left-padded prefill), then one alone...
            n = 1 + len(widths) % 2
            batch.add(*waiting[:n])
            waiting = waiting[n:]
        widths.add(len(batch))
        for d, t in batch.sample():
            out[id(d)].append(t)
            if len(out[id(d)]) == d.max_new_tokens:
                batch.drop(d)
        batch.step()
    assert [out[id(d)] for d in decoders] == alone
    assert max(widths) >= 6 and len(widths) > 3  # rows really shared steps, and the batch grew and shrank
    assert batch.kv == [] and batch.length == 0  # every row left: nothing held


def test_batch_drop_mid_reply_frees_the_row_and_leaves_the_others_alone(tok):
    model = tiny(tok.vocab_size, "llama", block_size=32)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    alone = [tokens(model, p, max_new_tokens=20, temperature=0) for p in prompts]
    batch, decoders = Batch(model), [Decoder(model, p, max_new_tokens=20, temperature=0) for p in prompts]
    for d in decoders:
        batch.add(d)
    got = {id(d): [] for d in decoders}
    for step in range(20):
        for d, t in batch.sample():
            got[id(d)].append(t)
        if step == 3:  # the longest prompt's client hangs up: its row goes, the timeline shrinks to the others
            batch.drop(decoders[0])
            assert len(batch) == 2 and batch.kv[0].shape[0] == 2 and batch.length == max(r.cached for r in batch.rows)
        batch.step()
    assert got[id(decoders[0])] == alone[0][:4]
    assert [got[id(d)] for d in decoders[1:]] == alone[1:]


def test_batch_refuses_memory_attention_models(tok):
    model = tiny(tok.vocab_size, "gpt2", memory_layers=(1,))
    assert not Batch.batchable(model)
    with pytest.raises(ValueError, match="memory attention"):
        Batch(model).add(Decoder(model, [1, 2, 3]))
