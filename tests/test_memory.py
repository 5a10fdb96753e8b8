"""Weight memory: facts become training conversations without the held-out questions, the EWC penalty has the
gradient of its formula, the Fisher is the mean squared per-token gradient, a taught fact raises the answer to a
held-out question and detaching restores the model exactly, stores are written atomically and bad files are
skipped (never unpickled), /remember /memories /forget and `persona-lm remember` work end to end, the server
keeps users apart under concurrency, and a base-model run gets its Fisher and memory too."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import Server, tiny_model_dir
from persona_lm import memory
from persona_lm.errors import PersonaError
from persona_lm.generate import generate
from persona_lm.params import parse_params
from persona_lm.train.checkpoint import load_model
from persona_lm.user_facts import make_facts, parse_fact

peft = pytest.importorskip("peft")

EMOTIONS = ["joy", "sadness", "anger"]
LINES = ["Hello there, how are you today?", "I am fine, thank you.", "What a lovely day for a walk in the park.",
         "Rosie likes tea and long talks.", "My dog is called Rex and your dog is called Rex.", "Tell me something nice."]
SYSTEM = "You are Rosie."
FAST = {"steps": 40, "lr": 0.01, "replay_share": 0.0, "anchors": 0}  # a strong, quick adapter for a one-layer model
CLI = Path(sys.executable).parent / "persona-lm"


def cfg(**kw):
    return parse_params({"weight_memory": {**FAST, **kw}}).weight_memory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("memory"), LINES, EMOTIONS, block_size=128)


@pytest.fixture
def loaded(model_dir):
    model, tok, config = load_model(model_dir)
    return model, tok, config


def lora_layers(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def answer_logprob(model, tok, question: str, answer: str) -> float:
    """Summed log-probability of `answer` as the reply to `question` under the system prompt."""
    ids, mask = memory.render(tok, [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], SYSTEM)
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    with torch.no_grad():
        logp = model(x)[0][0].log_softmax(-1).gather(-1, y[:, None])[:, 0]
    return float((logp * torch.tensor(mask[1:], dtype=torch.float32)).sum())


def greedy(model, tok, question: str, n: int = 12) -> str:
    """The reply `persona-lm serve` gives at temperature 0 with its default repetition penalty."""
    ids = tok.prompt([{"from": "system", "value": SYSTEM}, {"from": "human", "value": question}])
    return generate(model, tok, ids, temperature=0, max_new_tokens=n, repetition_penalty=1.1).text


# ------------------------------------------------------------------------------------------ training data

def test_training_data_never_holds_the_held_out_questions():
    from persona_lm.params import Params

    facts = make_facts(21, seed=5)
    texts = [f.statement for f in facts]
    pairs = [(c[0]["value"], c[1]["value"]) for c in memory.conversations(texts)]
    held_out = {q.lower() for f in make_facts(21, seed=6) for q in f.test_questions}
    identity = {q.lower() for fact in Params().persona.facts.values() for q in fact.questions}
    for f in facts:
        assert {(q, f.answer) for q in f.train_questions} <= set(pairs)
        assert sum(a == f.answer for _, a in pairs) == len(f.train_questions) * (1 + len(memory.FRAMES)) + 1
    assert not {q.lower() for q, _ in pairs} & held_out
    assert len(pairs) == len(set(pairs)) and not [q for q, _ in pairs if q in memory.ABOUT_ME]  # all read: no list
    for n in (0, 5, 100):
        asked = [q.lower() for q in memory.anchor_questions(texts[:3], n, seed=1)]
        assert not set(asked) & (held_out | identity) and len(asked) == len(set(asked))
        assert not set(asked) & {q.lower() for f in facts[:3] for q in f.train_questions}  # never a told fact's
    assert memory.anchor_questions(texts[:3], 5, seed=1)[:len(memory.SELF)] == list(memory.SELF)
    assert len(memory.anchor_questions(texts[:3], 5, seed=1)) == len(memory.SELF) + 5


@pytest.mark.parametrize("text, restated", [
    ("I work at the bakery", "You work at the bakery."),
    ("I'm tired and my feet hurt!", "You're tired and your feet hurt!"),
    ("i was born in Lisbon", "You were born in Lisbon."),
    ("Tomorrow I am visiting my sister; she was ill", "Tomorrow you are visiting your sister; she was ill."),
    ("My brother and I built it myself", "Your brother and you built it yourself."),
])
def test_a_fact_no_pattern_reads_is_restated_to_its_speaker(text, restated):
    assert parse_fact(text) is None
    assert memory.conversations([text]) == [[{"from": "human", "value": q}, {"from": "gpt", "value": restated}]
                                            for q in memory.ABOUT_ME]
    mixed = memory.conversations(["I have a dog called Rex", text, "I collect stamps"])
    assert {c[1]["value"] for c in mixed if c[0]["value"] in memory.ABOUT_ME} == {restated + " You collect stamps."}


def test_a_newer_fact_about_the_same_thing_replaces_the_older(tmp_path):
    store = memory.UserStore(tmp_path, "ann")
    assert store.add("my dog is called Rex") == []
    assert store.add("I live in Elmsby") == []
    assert store.add("My dog's name is Fido.") == ["my dog is called Rex"]
    assert store.add("I like long walks") == []
    assert store.add("I  like long walks") == ["I like long walks"]  # the same words again: kept once
    assert store.texts == ["I live in Elmsby", "My dog's name is Fido.", "I like long walks"]


# ---------------------------------------------------------------------------------------------------- EWC

def test_ewc_penalty_and_its_gradient_match_the_formula():
    from persona_lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8)).double()
    fisher = {n: torch.rand_like(w) for n, w in memory.fisher_targets(model).items()}
    memory.attach(model, cfg(r=2, alpha=6), seed=1)
    params = memory.adapter_parameters(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)
            p.requires_grad_(True)
    terms = memory.ewc_terms(model, fisher)
    assert len(terms) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    lam, scale = 3.0, 6 / 2
    value = memory.ewc_penalty(terms, lam)
    grads = torch.autograd.grad(value, params)
    want, by_param = 0.0, {}
    for layer, f in terms:
        A, B = layer.lora_A["memory"].weight, layer.lora_B["memory"].weight
        dW = scale * B.detach() @ A.detach()
        want += lam / 2 * float((f * dW ** 2).sum())
        by_param[id(A)] = lam * scale * B.detach().T @ (f * dW)  # d/dA of lam/2 sum F (sBA)^2
        by_param[id(B)] = lam * scale * (f * dW) @ A.detach().T
    assert value.item() == pytest.approx(want, rel=1e-12)
    for p, g in zip(params, grads):
        assert torch.allclose(g, by_param[id(p)], rtol=1e-10, atol=1e-12)
    # and against finite differences (torch's checker), with A and B swapped in for the layer's own
    layer, f = terms[0]

    class Penalty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self):
            return memory.ewc_penalty([(self.layer, f)], lam)

    def penalty(A, B):
        return torch.func.functional_call(Penalty(), {"layer.lora_A.memory.weight": A,
                                                      "layer.lora_B.memory.weight": B}, ())

    A, B = (layer.lora_A["memory"].weight.detach().clone().requires_grad_(),
            layer.lora_B["memory"].weight.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(penalty, (A, B))


def test_fisher_is_the_mean_squared_per_token_gradient(loaded):
    model, tok, _ = loaded
    examples = [memory.render(tok, c, SYSTEM) for c in memory.conversations(["I have a cat called Mochi"])[:3]]
    fisher = memory.estimate_fisher(model, examples, tok.pad)
    names = list(fisher)
    assert names == [f"{n}.weight" for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    want = {n: torch.zeros_like(f) for n, f in fisher.items()}
    weights = dict(model.named_parameters())
    for ids, mask in examples:
        model.zero_grad()
        logits = model(torch.tensor([ids[:-1]]))[0][0]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        nll = -logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0][keep].sum()
        nll.backward()
        for n in want:
            want[n] += weights[n].grad ** 2 / int(keep.sum()) / len(examples)
    assert all(torch.allclose(fisher[n], want[n], rtol=1e-4, atol=1e-12) for n in names)
    assert all(not w.requires_grad or n.startswith(("wte", "wpe", "persona", "blocks", "ln_f", "lm_head",
                                                    "emotion_head")) for n, w in model.named_parameters())
    memory.attach(model, cfg())
    with pytest.raises(PersonaError, match="without memory adapters"):
        memory.estimate_fisher(model, examples, tok.pad)


# -------------------------------------------------------------------------------------------------- teach

def test_teach_raises_the_answer_to_a_held_out_question_and_detach_restores_the_model(loaded, model_dir):
    model, tok, _ = loaded
    fact = make_facts(1, seed=3)[0]
    idx = torch.tensor([tok.prompt([{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hi"}])])
    with torch.no_grad():
        plain = model(idx)[0]
    before = answer_logprob(model, tok, fact.test_questions[0], fact.answer)
    report = []
    assert memory.teach(model, tok, [fact.statement], cfg(), system=SYSTEM, report=report) is model
    assert report[0].steps == 40 and report[0].examples == len(memory.questions(fact))
    assert lora_layers(model) == 4 and not model.training
    assert not any(p.requires_grad for p in memory.adapter_parameters(model))
    after = answer_logprob(model, tok, fact.test_questions[0], fact.answer)
    assert after > before + 5  # nats: the held-out paraphrase now leads to the answer
    memory.activate(model, None)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain)  # adapter off: the model as loaded
    memory.activate(model, memory.ADAPTER)
    assert answer_logprob(model, tok, fact.test_questions[0], fact.answer) == pytest.approx(after)
    memory.detach(model)
    assert lora_layers(model) == 0 and not hasattr(model, "peft_config")
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain)
    assert model.state_dict().keys() == load_model(model_dir)[0].state_dict().keys()  # the plain model again


def test_anchors_are_the_models_own_replies_and_are_trained_alongside(loaded, monkeypatch):
    from persona_lm.generate import generate_batch

    model, tok, _ = loaded
    fact = "my dog is called Rex"
    asked = memory.anchor_questions([fact], 6, seed=0)
    assert len(asked) == len(memory.SELF) + 6 and not set(asked) & set(parse_fact(fact).train_questions)
    prompts = [tok.prompt([{"from": "system", "value": SYSTEM}, {"from": "human", "value": q}]) for q in asked]
    want = [r.text.strip() for r in generate_batch(model, tok, prompts, temperature=0, max_new_tokens=32)]
    assert memory.anchors(model, tok, asked, SYSTEM) == [
        [{"from": "human", "value": q}, {"from": "gpt", "value": w}] for q, w in zip(asked, want) if w]

    seen = []

    def rosie(m, t, questions, system):  # stand-in replies that are plain text (the random model's are bytes)
        seen.append((list(questions), lora_layers(m)))
        return [[{"from": "human", "value": q}, {"from": "gpt", "value": "I am Rosie, your friend."}] for q in questions]

    monkeypatch.setattr(memory, "anchors", rosie)
    kept = lambda: sum(answer_logprob(model, tok, q, "I am Rosie, your friend.") for q in asked)  # noqa: E731
    memory.teach(model, tok, [fact], cfg(), system=SYSTEM)
    plain = kept()
    report = []
    memory.teach(model, tok, [fact], cfg(anchors=6), system=SYSTEM, report=report)
    assert seen == [(asked, 0)]  # asked of the model as loaded: the previous adapter was taken off first
    assert report[0].examples == len(memory.questions(parse_fact(fact))) + len(asked)
    assert kept() > plain + 10


def test_ewc_and_replay_each_keep_the_model_closer_to_what_it_knew(loaded, model_dir):
    model, tok, _ = loaded
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": a}, {"from": "gpt", "value": b}]}
            for i, (a, b) in enumerate(zip(LINES, LINES[1:] + LINES[:1]))]
    old = [memory.render(tok, r["conversations"], SYSTEM) for r in rows]
    fisher = memory.estimate_fisher(model, old, tok.pad)
    fact = ["My favourite fruit is papaya."]

    def drift():  # the Fisher-weighted change of the weights, and the loss on the old conversations
        terms = memory.ewc_terms(model, fisher)
        with torch.no_grad():
            change = float(memory.ewc_penalty(terms, 2.0))
            loss = sum(-answer_logprob(model, tok, r["conversations"][0]["value"], r["conversations"][1]["value"])
                       for r in rows)
        return change, loss

    memory.teach(model, tok, fact, cfg(), system=SYSTEM)
    plain_change, plain_loss = drift()
    memory.teach(model, tok, fact, cfg(ewc_lambda=1e4), fisher, system=SYSTEM)
    ewc_change, _ = drift()
    report = []
    memory.teach(model, tok, fact, cfg(replay_share=0.5), None, rows, system=SYSTEM, report=report)
    _, replay_loss = drift()
    assert ewc_change < plain_change / 2
    assert replay_loss < plain_loss and report[0].replay_examples == len(rows)


# -------------------------------------------------------------------------------------------------- store

def mem(loaded, model_dir, root, user="ann", **kw):
    model, tok, config = loaded
    said = []
    kw = {"ewc_lambda": 0.0, **kw}  # these test models have no Fisher (its message is tested on its own)
    m = memory.Memory(model, tok, config, model_dir, cfg(**kw), root, user, say=said.append,
                      replay_path=root / "no-rows.jsonl")
    return m, said


def test_memory_is_private_atomic_and_survives_a_failed_write(loaded, model_dir, tmp_path, monkeypatch):
    root = tmp_path / "memory"
    m, said = mem(loaded, model_dir, root)
    m.remember("my dog is called Rex")
    folder = memory.user_folder(root, "ann")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert json.loads((folder / "facts.json").read_text())["facts"][0]["text"] == "my dog is called Rex"
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                               "memory.json"}
    facts, weights = (folder / "facts.json").read_bytes(), (folder / "adapter/adapter_model.safetensors").read_bytes()

    import safetensors.torch

    def dies(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        m.remember("I live in Elmsby")
    monkeypatch.undo()
    assert (folder / "adapter/adapter_model.safetensors").read_bytes() == weights  # the old adapter, whole
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "facts.json"]  # no temporary leftovers
    assert "Elmsby" in (folder / "facts.json").read_text()  # the user's words were written first
    monkeypatch.setattr(memory, "write_json", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        m.forget("all")
    monkeypatch.undo()
    assert "Elmsby" in (folder / "facts.json").read_text() and facts != (folder / "facts.json").read_bytes()
    # the next start sees an adapter that holds other facts than facts.json, and learns them again
    again, said = mem(loaded, model_dir, root)
    again.start()
    assert said == ["[memory: re-learning 2 fact(s) of ann (learnt for another model or other facts)]"]
    store = memory.UserStore(root, "ann")
    assert store.read_facts() and store.read_adapter(loaded[0], again.fingerprint, "check") == "loaded"


class Payload:
    """Unpickling this creates a file: a loader that unpickles would be caught by the marker appearing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_files_are_skipped_with_a_message_and_never_unpickled(loaded, model_dir, tmp_path):
    root, marker = tmp_path / "memory", tmp_path / "unpickled"
    m, _ = mem(loaded, model_dir, root)
    m.remember("I have a cat called Mochi")
    folder = memory.user_folder(root, "ann")
    torch.save({"w": Payload(marker)}, folder / "adapter/adapter_model.safetensors")
    again, said = mem(loaded, model_dir, root)
    again.start()
    assert said[0].startswith("[memory: skipping the adapter in ") and "unreadable" in said[0]
    assert said[1] == "[memory: re-learning 1 fact(s) of ann (its adapter was unreadable)]"
    assert lora_layers(loaded[0]) == 4 and not marker.exists()

    (folder / "facts.json").write_text('{"facts": [{"text": 3}]}')
    broken, said = mem(loaded, model_dir, root)
    assert broken.texts == [] and said[0].startswith(f"[memory: skipping {folder / 'facts.json'}: unreadable")
    broken.remember("I live in Tindle")
    kept = list(folder.glob("facts.corrupt-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == '{"facts": [{"text": 3}]}'
    assert json.loads((folder / "facts.json").read_text())["facts"][0]["text"] == "I live in Tindle"

    for damage in (b"", b"{not json", json.dumps({"format": 99}).encode()):
        (folder / "adapter/memory.json").write_bytes(damage)
        assert memory.UserStore(root, "ann", said.append, [{"text": "I live in Tindle"}]).read_adapter(
            loaded[0], broken.fingerprint) == "bad"

    fake = tmp_path / "model"
    shutil.copytree(model_dir, fake)
    said.clear()
    assert memory.load_fisher(fake, loaded[0], said.append) is None and "no fisher.safetensors" in said[-1]
    torch.save({"w": Payload(marker)}, fake / memory.FISHER_FILE)
    assert memory.load_fisher(fake, loaded[0], said.append) is None and "unreadable" in said[-1]
    memory.save_fisher(fake / memory.FISHER_FILE, {"blocks.0.attn.c_attn.weight": torch.ones(3, 3)})
    assert memory.load_fisher(fake, loaded[0], said.append) is None and "does not fit this model" in said[-1]
    assert not marker.exists()


def test_forget_one_or_all(loaded, model_dir, tmp_path):
    root = tmp_path / "memory"
    m, _ = mem(loaded, model_dir, root)
    m.remember("my dog is called Rex")
    m.remember("I live in Elmsby")
    with pytest.raises(PersonaError, match=r"a fact number from 1 to 2 or 'all', got '3'"):
        m.forget("3")
    assert m.forget("1") == ["my dog is called Rex"] and m.texts == ["I live in Elmsby"]
    meta = json.loads((memory.user_folder(root, "ann") / "adapter/memory.json").read_text())
    assert meta["facts"] == memory.facts_digest(["I live in Elmsby"])  # re-learnt from what remains
    assert m.forget("all") == ["I live in Elmsby"] and m.texts == []
    assert not (memory.user_folder(root, "ann") / "adapter").exists() and lora_layers(loaded[0]) == 0
    with pytest.raises(PersonaError, match="there is nothing to forget"):
        m.forget("1")


def test_a_model_retrained_since_relearns_from_the_facts(loaded, model_dir, tmp_path):
    root = tmp_path / "memory"
    m, _ = mem(loaded, model_dir, root)
    m.remember("my dog is called Rex")
    other = tmp_path / "retrained"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "step": 1}))
    model, tok, config = load_model(other)
    again = memory.Memory(model, tok, config, other, cfg(ewc_lambda=0), root, "ann", say=(said := []).append)
    again.start()
    assert said == ["[memory: re-learning 1 fact(s) of ann (learnt for another model or other facts)]"]
    fresh, said = mem((model, tok, config), other, root)
    fresh.start()
    assert said == [] and lora_layers(model) == 4


def test_user_ids_become_safe_distinct_folders(tmp_path):
    plain = memory.user_folder(tmp_path, "alice_01")
    odd = [memory.user_folder(tmp_path, u) for u in ("../etc", "a/b", "alice@example.com", "Ālice", "x" * 65, ".")]
    assert plain == tmp_path / "alice_01"
    assert all(p.parent == tmp_path and p.name.startswith("~") and len(p.name) == 33 for p in odd)
    assert len(set(odd)) == len(odd)


# ------------------------------------------------------------------------------------------ CLI and chat

def cli(args, cwd, stdin=""):
    return subprocess.run([str(CLI), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=180)


@pytest.fixture
def project(tmp_path):
    """A working folder whose params.yaml sets the fast memory params."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"weight_memory": FAST}))
    return tmp_path


def test_remember_then_chat_commands(model_dir, project):
    r = cli(["remember", "my dog is called Rex", "--model", str(model_dir), "--user", "alice"], project)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("remembered for alice: my dog is called Rex; 1 fact(s) in "
                                                        "memory, learnt in ")
    assert stat.S_IMODE((project / "memory").stat().st_mode) == 0o700
    lines = ["/memories", "/remember I live in Elmsby", "/remember my dog's name is Fido", "/memories", "/forget 9",
             "/forget 1", "/memories", "Hello there", "/forget all", "/memories"]
    r = cli(["chat", "--model", str(model_dir), "--user", "alice", "--temperature", "0", "--max-new-tokens", "6"],
            project, "".join(l + "\n" for l in lines))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1  # the one user turn; commands answer on stderr
    assert r.stderr.count("[memory: no fisher.safetensors in ") == 1  # said once: this model has none
    err = [l for l in r.stderr.splitlines() if l.startswith("[") and not l.startswith("[memory: no fisher")]
    assert err[0] == "[1] my dog is called Rex"  # loaded, not re-learnt: no message before it
    assert err[1].startswith("[remembered: I live in Elmsby; 2 fact(s) in memory, learnt in ")
    assert err[2].startswith("[remembered: my dog's name is Fido (replaces: my dog is called Rex); 2 fact(s)")
    assert err[3:5] == ["[1] I live in Elmsby", "[2] my dog's name is Fido"]
    assert err[5] == "[/forget needs a fact number from 1 to 2 or 'all', got '9']"
    assert err[6] == "[forgot: I live in Elmsby; 1 fact(s) left]"
    assert err[7] == "[1] my dog's name is Fido"
    assert err[8] == "[forgot: my dog's name is Fido; 0 fact(s) left]" and err[9] == "[no memories yet]"
    r = cli(["chat", "--model", str(model_dir), "--user", "bob", "--max-new-tokens", "4"], project, "/memories\n")
    assert r.returncode == 0 and "[no memories yet]" in r.stderr and not (project / "memory/bob").exists()


def test_bad_memory_params_name_the_key(model_dir, project):
    (project / "params.yaml").write_text(yaml.safe_dump({"weight_memory": {"steps": 0}}))
    r = cli(["remember", "my dog is called Rex", "--model", str(model_dir)], project)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: weight_memory.steps: must be >= 1 (got 0)")


def test_chat_without_memories_keeps_the_plain_model(loaded, model_dir, tmp_path):
    m, said = mem(loaded, model_dir, tmp_path / "memory")
    m.start()
    assert said == [] and lora_layers(loaded[0]) == 0 and not (tmp_path / "memory").exists()


# ------------------------------------------------------------------------------------------------- server

def test_server_keeps_each_users_memory_to_that_user(model_dir, tmp_path):
    root = tmp_path / "memory"
    model, tok, config = load_model(model_dir)
    memory.Memory(model, tok, config, model_dir, cfg(), root, "alice@example.com",
                  replay_path=tmp_path / "none.jsonl").remember("my dog is called Rex")
    question = "What's my dog called?"
    with_memory = greedy(model, tok, question, 24)
    memory.detach(model)
    without = greedy(model, tok, question, 24)
    assert with_memory != without
    server = Server(model_dir, "--memory", str(root))
    try:
        def ask(user):
            body = {"model": "rosie", "messages": [{"role": "user", "content": question}], "temperature": 0,
                    "max_tokens": 24, "stream": True, **({"user": user} if user else {})}
            text = ""
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                        text += choices[0]["delta"].get("content") or ""
            return text

        users = ["alice@example.com", "bob", None, "alice@example.com", "bob", "alice@example.com", None, "carol"]
        with ThreadPoolExecutor(len(users)) as pool:
            got = list(pool.map(ask, users))
    finally:
        server.close()
    assert got == [with_memory if u == "alice@example.com" else without for u in users]


# ---------------------------------------------------------------------------------------------- base model

def test_a_base_model_run_gets_a_fisher_and_a_memory(tmp_path):
    from bases import llama_base, stage, write_project

    folder = llama_base(tmp_path / "base")
    d = write_project(tmp_path / "proj", {"base": {"model": str(folder)}, "pretrain": {"max_iters": 0},
                                          "lora": {"r": 4}, "model": {"block_size": 256},
                                          "weight_memory": {"fisher_examples": 8}})
    for name in ("train_tokenizer", "tokenize_corpus", "pretrain", "finetune", "train_emotion"):
        proc = stage(d, name)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
    final = d / "models/final"
    assert "Fisher of 8 conversations" in proc.stderr
    from safetensors.torch import load_file

    fisher = load_file(str(final / memory.FISHER_FILE))
    assert {k.rsplit(".", 2)[-2] for k in fisher} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
    model, tok, config = load_model(final)  # merged: the run's adapter is folded in, memory goes on top
    fact = make_facts(1, seed=11)[0]
    before = answer_logprob_base(model, tok, config, fact)
    m = memory.Memory(model, tok, config, final, cfg(), tmp_path / "memory", "ann", replay_path=tmp_path / "x")
    m.remember(fact.statement)
    after = answer_logprob_base(model, tok, config, fact)
    assert after > before + 5
    saved = json.loads((memory.user_folder(tmp_path / "memory", "ann") / "adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8
    model2, tok2, config2 = load_model(final)
    m2 = memory.Memory(model2, tok2, config2, final, cfg(), tmp_path / "memory", "ann", say=(said := []).append)
    m2.start()
    assert said == [] and answer_logprob_base(model2, tok2, config2, fact) == pytest.approx(after, abs=1e-4)
    with pytest.raises(PersonaError, match="loaded merged"):
        memory.attach(load_model(final, merge=False)[0], cfg())


def answer_logprob_base(model, tok, config, fact):
    global SYSTEM
    saved, SYSTEM = SYSTEM, config.get("system_prompt")
    try:
        return answer_logprob(model, tok, fact.test_questions[0], fact.answer)
    finally:
        SYSTEM = saved
