"""Memory attention (Compressive Transformer): compression pools exactly the tokens that leave the window, no
position ever sees a later token, memory carries earlier tokens into later windows (and nothing without it),
the cached decode equals an uncached recomputation written out here, training windows compute what decoding
computes, the long phase-3 dialogues put their facts out of the window before asking, and export and chat
treat a memory model as documented."""

import math

import pytest
import torch
import torch.nn as nn

from persona_lm.chat import Chat
from persona_lm.errors import ParamsError, PersonaError
from persona_lm.export.hf import family
from persona_lm.generate import Decoder
from persona_lm.model import GPT, GPTConfig, Memory, compress, remember, window_stride
from persona_lm.params import parse_params
from persona_lm.tokenizer import ChatTokenizer, train_tokenizer
from persona_lm.train import phase
from persona_lm.train.batches import IGNORE, EmotionBatches, MemoryBatches, collate_windows
from persona_lm.train.loop import batch_loss, train
from persona_lm.user_facts import parse_fact

FAMILIES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu"),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
}
MEMORY = dict(memory_layers=(0, 1), memory_compression=2, memory_slots=6)


def tiny(family="gpt2", block_size=16, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=block_size, n_layer=2, n_head=4, n_embd=32, tie_embeddings=False,
                    **FAMILIES[family], **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        nn.init.normal_(model.wte.weight, std=0.5)
        nn.init.normal_(model.lm_head.weight, std=0.5)
        for block in model.blocks:  # heads that weigh memory differently
            if "memory_bias" in block.attn._parameters:
                nn.init.normal_(block.attn.memory_bias, std=1.0)
    return model


def without_memory(model):
    plain = GPT(GPTConfig.from_dict({**model.cfg.to_dict(), "memory_layers": ()})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "memory_bias" not in k})
    return plain


def positions(model, ids):
    """Logits (len(ids) - 1, vocab) of every position as training computes them: windows read in order."""
    batch = collate_windows([(ids, [1] * len(ids), 0)], model.cfg.block_size, 0)
    with torch.no_grad():
        return model(batch["x"])[0][0, :len(ids) - 1]


def test_compress_pools_consecutive_positions_oldest_first():
    kv = torch.arange(10.0).view(1, 1, 5, 2)  # positions (0,1) (2,3) (4,5) (6,7) (8,9)
    assert compress(kv, 2).tolist() == [[[[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]]]  # the newest group is alone
    assert compress(kv, 5).tolist() == [[[[4.0, 5.0]]]]
    assert torch.equal(compress(kv, 1), kv)
    slots = remember(None, kv, 2, 4)
    assert slots.shape[2] == 3
    slots = remember(slots, kv[:, :, :2] + 100, 2, 4)  # one new slot: 4 in all, none dropped yet
    assert slots[0, 0, :, 0].tolist() == [1.0, 5.0, 8.0, 101.0]
    slots = remember(slots, kv[:, :, :4] + 200, 2, 4)  # two more: the two oldest go
    assert slots[0, 0, :, 0].tolist() == [8.0, 101.0, 201.0, 205.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_window_is_the_plain_model(family):
    """Before anything has left the window, memory is empty and the model computes what it computes without."""
    model = tiny(family, **MEMORY)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], without_memory(model)(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(model(x.unsqueeze(1))[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_position_sees_a_later_token(family):
    """Across windows and memory: changing token t leaves every earlier position unchanged."""
    model = tiny(family, **MEMORY)
    ids = torch.randint(0, 64, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    base = positions(model, ids)
    for t in (5, 20, 40, 60):
        changed = list(ids)
        changed[t] = (changed[t] + 1) % 64
        other = positions(model, changed)
        assert torch.equal(base[:t], other[:t]), t
        assert not torch.allclose(base[t:], other[t:])


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_carries_tokens_that_left_the_window(family):
    """A token that left the window still changes later predictions through memory, and not without memory."""
    model = tiny(family, **MEMORY)  # 6 slots of 2 tokens: about 12 tokens behind the window
    plain = without_memory(model)
    ids = torch.randint(0, 64, (80,), generator=torch.Generator().manual_seed(2)).tolist()
    changed = list(ids)
    changed[2] = (changed[2] + 1) % 64
    stride = window_stride(16)  # token 2 leaves after the first window; the second window starts at `stride`
    later = slice(16, 16 + stride)  # the positions the second window predicts
    assert not torch.allclose(positions(model, ids)[later], positions(model, changed)[later])
    assert torch.equal(positions(plain, ids)[later], positions(plain, changed)[later])


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_bias_weighs_memory_on_both_paths(family):
    """A memory bias of -inf hides memory: training windows and the cached decode then compute what the model
    without memory computes (which drops what leaves the window)."""
    model = tiny(family, **MEMORY)
    plain = without_memory(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.memory_bias.fill_(float("-inf"))
    ids = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    torch.testing.assert_close(positions(model, ids), positions(plain, ids))
    kw = dict(max_new_tokens=40, temperature=0)
    assert list(Decoder(model, ids[:10], **kw)) == list(Decoder(plain, ids[:10], **kw))


def reference_greedy(model, prompt, n):
    """Greedy decoding recomputed from scratch at every step: the window is re-run in full over the memory;
    when it overflows, the oldest tokens but block_size // 2 leave it and their keys and values, taken from a
    full run of the window they left, are compressed into memory. A prompt longer than the window enters it
    the same way, as if its tokens had been generated."""
    block, keep = model.cfg.block_size, model.cfg.block_size // 2
    memory = Memory(model.cfg)
    ids, start, out = list(prompt), 0, []
    with torch.no_grad():
        while len(ids) - start > block:
            model.hidden(torch.tensor([ids[start:start + block]]), memory=memory)
            memory.push(block + 1 - keep)
            start += block + 1 - keep
        for _ in range(n):
            if len(ids) - start > block:
                model.hidden(torch.tensor([ids[start:len(ids) - 1]]), memory=memory)  # the window they leave
                memory.push(len(ids) - keep - start)
                start = len(ids) - keep
            h = model.hidden(torch.tensor([ids[start:]]), memory=memory)
            out.append(int(model.lm_head(h[0, -1]).argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [5, 16, 17, 45])
def test_cached_decode_equals_uncached(family, prompt_len):
    model = tiny(family, **MEMORY)
    prompt = torch.randint(0, 64, (prompt_len,), generator=torch.Generator().manual_seed(3)).tolist()
    kw = dict(max_new_tokens=40, temperature=0)  # 40 new tokens: several re-windows
    cached = list(Decoder(model, prompt, **kw))
    assert cached == list(Decoder(model, prompt, use_cache=False, **kw)) == reference_greedy(model, prompt, 40)
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=20, seed=7, repetition_penalty=1.3)
    assert list(Decoder(model, prompt, **kw)) == list(Decoder(model, prompt, use_cache=False, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_windows_compute_what_decoding_computes(family):
    """The logits training reads at position t are those the decoder computes after a prompt of t + 1 tokens."""
    model = tiny(family, **MEMORY)
    ids = torch.randint(0, 64, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    train_logits = positions(model, ids)
    for t in (3, 15, 16, 24, 25, 40, 58):
        for use_cache in (True, False):
            decoder = Decoder(model, ids[:t + 1], max_new_tokens=1, temperature=0, use_cache=use_cache)
            list(decoder)
            with torch.no_grad():
                torch.testing.assert_close(model.lm_head(decoder.last_hidden)[0], train_logits[t])


def test_memory_learns_to_recall_a_token_that_left_the_window():
    """Sequences `2 v 1 v noise... 1 v`: the value v is said (and repeated at once, in the window), then 20 noise
    tokens push it out of the 16-token window, then it is asked for again. Trained through the long-dialogue
    windows, memory attention recalls it; the same model without memory stays at chance (1 in 20)."""
    def data(n, g):
        rows = []
        for _ in range(n):
            v = int(torch.randint(10, 30, (1,), generator=g))
            ids = [2, v, 1, v] + torch.randint(30, 60, (20,), generator=g).tolist() + [1, v]
            rows.append((ids, [0] * 3 + [1] + [0] * 21 + [1], 0))
        return rows

    far, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only waits on a second thread (ten times slower on a busy CPU)
    try:
        for layers in ((0,), ()):
            far[layers] = trained_recall(layers, data)
    finally:
        torch.set_num_threads(threads)
    assert far[(0,)] > 0.9 and far[()] < 0.2


def trained_recall(layers, data) -> float:
    """Recall at the last position after 600 training steps of the windows path (the in-window one is asserted)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, memory_layers=layers,
                          memory_compression=2, memory_slots=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        batch = collate_windows(data(32, g), 16, 0)
        loss = nn.functional.cross_entropy(model(batch["x"])[0].flatten(0, 1), batch["y"].flatten(),
                                           ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch = collate_windows(data(200, torch.Generator().manual_seed(9)), 16, 0)
    with torch.no_grad():
        pred = model.eval()(batch["x"])[0].argmax(-1)
    assert (pred[:, 2] == batch["y"][:, 2]).float().mean() > 0.9  # in the window both recall it
    return float((pred[:, 24] == batch["y"][:, 24]).float().mean())


def test_memory_off_keeps_the_prompt_limit():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        Decoder(model, list(range(17)))
    assert len(list(Decoder(tiny("gpt2", **MEMORY), list(range(40)), max_new_tokens=3))) == 3


def test_windows_step_as_the_decoder_rewindows():
    ids = list(range(1, 41))  # 39 targets
    mask = [0] * 10 + [1] * 30
    batch = collate_windows([(ids, mask, 1), (ids[:12], mask[:12], 0)], 16, 0)
    stride = window_stride(16)
    K = batch["x"].shape[1]
    assert batch["x"].shape == (2, K, 16) and K == 1 + -(-(39 - 16) // stride)
    for k in range(K):
        assert batch["x"][0, k].tolist() == (ids[:-1] + [0] * 99)[k * stride:k * stride + 16]
    assert batch["y"].shape == (2, (K - 1) * stride + 16)
    assert batch["y"][0, :39].tolist() == [IGNORE] * 9 + ids[10:]  # each target once, in order
    assert (batch["y"][0, 39:] == IGNORE).all() and (batch["y"][1, 11:] == IGNORE).all()  # padding
    assert batch["persona"].tolist() == [1, 0]
    model = tiny("gpt2", **MEMORY)
    with torch.no_grad():
        assert model(batch["x"])[0].shape == (2, batch["y"].shape[1], 64)


LINES = ["Hello there, how are you today?", "I am fine, thank you.", "What a lovely day for a walk in the park.",
         "Rosie likes tea and long talks.", "Tell me something nice about your day.", "The rain sounds cosy."]


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer(train_tokenizer(LINES * 3, "bpe", 400, ["neutral", "joy"]))


def rows(n=12):
    return [{"id": f"r{i}", "conversations": [{"from": "human", "value": LINES[i % 6]},
                                              {"from": "gpt", "value": LINES[(i + 1) % 6]}], "persona": i % 2}
            for i in range(n)]


def memory_params(**memory):
    return parse_params({"model": {"block_size": 64, "n_personas": 2, "memory": {"enabled": True, **memory}},
                         "persona": {"emotions": ["neutral", "joy"]}})


def turns(tok, ids):
    """(role, text, first index, last index) of each rendered turn."""
    roles = {i: r for r, i in tok.role.items()}
    starts = [i for i, t in enumerate(ids) if t in roles] + [len(ids)]
    return [(roles[ids[a]], tok.decode(ids[a + 1:b]), a, b - 1) for a, b in zip(starts, starts[1:])]


def test_long_dialogues_ask_after_the_facts_left_the_window(tok):
    """Each fact is told, then asked with a training question and answered where the window no longer holds the
    telling; one per episode is also asked at once; fillers come from one persona's rows; the held-out test
    questions never appear."""
    p = memory_params(episodes=2, facts=2)
    dialogues = phase.memory_dialogues(p, tok, rows(), 6, seed=5)
    assert len(dialogues) == 6 and dialogues != phase.memory_dialogues(p, tok, rows(), 6, seed=6)
    stride = window_stride(64)
    for ids, mask, persona in dialogues:
        told, far, near, fillers = {}, 0, 0, set()
        parsed = turns(tok, ids)
        for n, (role, text, first, last) in enumerate(parsed):
            fact = parse_fact(text) if role == "human" else None
            if fact:
                told[fact.value] = (fact, last)
            elif role == "human" and text in LINES:
                fillers.add(LINES.index(text) % 2)  # rows(): line i is row i's human turn, persona i % 2
            elif role == "human":  # a question: a training question of a told fact, answered by the next turn
                fact, end = next((f, e) for f, e in told.values() if text in f.train_questions)
                assert text not in fact.test_questions
                _, reply, a, b = parsed[n + 1]
                assert reply == fact.answer and all(mask[a + 1:b + 1])
                if parse_fact(parsed[n - 2][1]):  # asked at once, right after the telling
                    near += 1
                    continue
                for t in range(a + 1, b + 1):  # every answer token is predicted by a window past the telling
                    k = max(0, -(-(t - 64) // stride))  # the window whose new positions hold target t
                    assert k * stride > end
                far += 1
        assert len(told) == far == 4 and near == 2  # 2 episodes of 2 facts, all distinct, one asked at once each
        assert fillers == {persona}


def test_long_dialogues_need_short_conversations(tok):
    long_row = {"id": "x", "conversations": [{"from": "human", "value": " ".join(LINES * 4)},
                                             {"from": "gpt", "value": "ok"}]}
    with pytest.raises(PersonaError, match="at most 32 tokens"):
        phase.memory_dialogues(memory_params(), tok, [long_row], 2, seed=0)


def test_params_validate_memory_and_default_off():
    assert parse_params({}).model.memory.enabled is False
    assert phase.memory_config(parse_params({}))["memory_layers"] == ()
    assert phase.memory_config(memory_params())["memory_layers"] == (0, 1, 2, 3)
    assert phase.memory_config(memory_params(layers=[1]))["memory_layers"] == (1,)
    with pytest.raises(ParamsError, match="model.memory.layers"):
        memory_params(layers=[4])
    with pytest.raises(ParamsError, match="model.memory.compression"):
        memory_params(compression=0)
    base = parse_params({"model": {"memory": {"enabled": True}}, "base": {"model": "HuggingFaceTB/SmolLM2-135M"}})
    with pytest.raises(PersonaError, match="model.memory.enabled"):
        phase.check_memory(base)


def test_memory_batches_mix_long_dialogues_into_phase_3(tok):
    p = memory_params(share=0.5)
    emotion_ex = [(ids + [tok.end], [0] * len(ids) + [1], 1, 0) for ids, _, _ in
                  phase.chat_examples(p, tok, rows(4))]
    emotion = EmotionBatches(emotion_ex, emotion_ex, batch_size=2, block_size=64, pad_id=tok.pad, seed=0)
    batches = MemoryBatches(emotion, phase.memory_dialogues(p, tok, rows(), 4, seed=0), 0.5, 2, 64, tok.pad, 0)
    kinds = [batches.get("train", s)["x"].dim() for s in range(40)]
    assert 3 in kinds and 2 in kinds  # both kinds at share 0.5
    assert all(batches.get("val", s)["x"].dim() == 2 for s in range(10))
    for s in range(40):  # a step that draws an emotion batch draws the one a run without memory draws
        if kinds[s] == 2:
            assert torch.equal(batches.get("train", s)["x"], emotion.get("train", s)["x"])
    model = phase._own(p, tok)
    assert model.cfg.memory_layers == ()  # phases 1 and 2 read single windows: no memory weights
    model.set_memory(**phase.memory_config(p))
    batch = next(batches.get("train", s) for s in range(40) if kinds[s] == 3)
    n = float((batch["y"] != IGNORE).sum())
    loss, parts = batch_loss(model, batch, n, 0.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and model.wte.weight.grad is not None


def test_phase_3_trains_through_memory(tmp_path):
    """The loop trains on long-dialogue batches; what memory records carries no gradient (Transformer-XL)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **MEMORY))
    seqs = [(torch.randint(0, 64, (50,)).tolist(), [1] * 50, 0) for _ in range(8)]

    class Windows:
        def get(self, split, step, rank=0):
            return collate_windows(seqs[step % 4 * 2:step % 4 * 2 + 2], 16, 0)

    from persona_lm.params import Emotion

    cfg = Emotion(max_iters=3, batch_size=2, eval_interval=3, eval_iters=1, ckpt_interval=3, device="cpu",
                  precision="fp32")
    result = train(model, cfg, Windows(), tmp_path / "ck", "h", {"live_dir": tmp_path / "live"}, "t")
    assert result.step == 3 and math.isfinite(result.train_loss)
    memory = Memory(model.train().cfg)
    model.hidden(torch.randint(0, 64, (1, 16)), memory=memory)
    assert memory.window and not any(kv.requires_grad for kv in memory.window.values())


def test_export_refuses_memory_attention():
    with pytest.raises(PersonaError, match="model.memory.enabled"):
        family(GPTConfig(vocab_size=10, memory_layers=(0,)))
    assert family(GPTConfig(vocab_size=10)) == "gpt2"


def test_chat_hands_a_memory_model_the_whole_conversation(tok):
    config = {"persona": "Rosie", "system_prompt": "You are Rosie."}
    for layers, keeps_all in (((0,), True), ((), False)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                              memory_layers=layers)).eval()
        chat = Chat(model, tok, config, temperature=0, max_new_tokens=4, warn=lambda m: None)
        for i in range(8):
            chat.history += [{"from": "human", "value": LINES[i % 6]}, {"from": "gpt", "value": LINES[(i + 1) % 6]}]
        whole = tok.prompt([{"from": "system", "value": "You are Rosie."}] + chat.history
                           + [{"from": "human", "value": "Hello there"}])
        ids, user = chat.fit("Hello there")
        assert (ids == whole and len(chat.history) == 16) == keeps_all
        assert len(whole) > 32 and (keeps_all or len(ids) <= 32 - 4)
        list(chat.reply("Hello there"))  # a prompt longer than the window: the memory model prefills it in windows
        assert chat.n_replies == 1 and len(chat.history) == (18 if keeps_all else len(chat.history))
