"""The training loop: one label shift, exact assistant masks, exact gradient accumulation, NaN stops,
damaged checkpoints skipped, bit-identical resume after SIGKILL, and DDP on gloo."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from persona_lm.model import GPT, GPTConfig
from persona_lm.params import Pretrain
from persona_lm.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer
from persona_lm.train import checkpoint
from persona_lm.train.batches import IGNORE, CorpusBatches, pad_sequences
from persona_lm.train.loop import TrainingError, batch_loss, lr_at, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(vocab=16, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))


def test_labels_are_shifted_exactly_once(tmp_path):
    """On the stream 0,1,...,9,0,1,... a model trained through our batches learns next = (x + 1) % 10.
    A second shift would teach (x + 2) % 10; no shift would teach x."""
    stream = torch.arange(400) % 10
    batches = CorpusBatches(stream, stream, None, 0.0, 8, 16, seed=1)
    x, y = batches.get("train", 0)["x"], batches.get("train", 0)["y"]
    assert torch.equal(y[:, :-1], x[:, 1:])
    model = tiny_model()
    phase = Pretrain(max_iters=60, batch_size=8, lr=3e-3, warmup_iters=0, eval_interval=60, eval_iters=1,
                     ckpt_interval=60, device="cpu")
    train(model, phase, batches, tmp_path / "ck", "h", {"live_dir": tmp_path / "live"}, "pretrain")
    with torch.no_grad():
        logits, _ = model(torch.arange(10).view(1, 10))
    assert logits.argmax(-1).view(-1).tolist() == [(i + 1) % 10 for i in range(10)]


def test_pad_sequences_targets_exactly_the_masked_tokens():
    ids, mask = [5, 6, 7, 8, 9], [0, 0, 1, 1, 1]
    x, y = pad_sequences([(ids, mask), ([1, 2, 3], [0, 1, 1])], pad_id=0)
    assert x.tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    assert y.tolist() == [[IGNORE, 7, 8, 9], [2, 3, IGNORE, IGNORE]]


def test_grad_accumulation_equals_one_big_batch():
    seqs = [([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1]), ([3, 3, 4], [0, 1, 1]), ([7, 8, 9, 10, 11], [0, 1, 0, 1, 1]),
            ([2, 4, 6, 8], [0, 0, 0, 1])]
    big_x, big_y = pad_sequences(seqs, 0)
    n = float((big_y != IGNORE).sum())
    model = tiny_model()
    loss, _ = batch_loss(model, {"x": big_x, "y": big_y}, n, 0.0, 1.0)
    loss.backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(big) > 10
    model.zero_grad()
    for part in (seqs[:1], seqs[1:3], seqs[3:]):
        x, y = pad_sequences(part, 0)
        loss, _ = batch_loss(model, {"x": x, "y": y}, n, 0.0, 1.0)
        loss.backward()
    for name, p in model.named_parameters():
        if name in big:
            assert torch.allclose(big[name], p.grad, atol=1e-6), name


def test_lr_schedule_warmup_hold_then_decay():
    ph = Pretrain(max_iters=110, lr=1.0, min_lr=0.1, warmup_iters=10, cooldown=0.3, decay="linear")
    lrs = [lr_at(s, ph) for s in range(111)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10:80] == [1.0] * 70                      # held until the last 30 of the 100 post-warmup steps
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[95] == pytest.approx(1.0 - 0.9 * 15 / 30)  # linear
    assert lrs[110] == pytest.approx(0.1)


def test_lr_schedule_cooldown_one_is_nanogpt_cosine():
    ph = Pretrain(max_iters=100, lr=1.0, min_lr=0.1, warmup_iters=10, cooldown=1.0, decay="cosine")
    for s in range(10, 101):
        assert lr_at(s, ph) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 90)))


def test_nan_loss_stops_without_writing(tmp_path):
    stream = torch.arange(200) % 10
    model = tiny_model()
    with torch.no_grad():
        model.wte.weight[3] = float("nan")
    phase = Pretrain(max_iters=5, batch_size=4, ckpt_interval=1, eval_interval=5, eval_iters=1, device="cpu")
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        train(model, phase, CorpusBatches(stream, stream, None, 0, 4, 16, 1), tmp_path / "ck", "h",
              {"live_dir": tmp_path / "live"}, "pretrain")
    assert not list((tmp_path / "ck").glob("step_*"))


def test_damaged_checkpoint_is_skipped(tmp_path, caplog):
    model = tiny_model()
    state = {"optimizer": {}, "rng": torch.get_rng_state(), "step": 1}
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, {**state, "step": step}, {"params_hash": "h"}, keep=5)
    newest = tmp_path / "step_0000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    path, meta = checkpoint.latest(tmp_path, "h")
    assert path.name == "step_0000001" and meta["step"] == 1
    assert meta["params_hash"] == "h" and meta["config"]["n_layer"] == 2 and "git_sha" in meta
    assert "damaged or incomplete" in caplog.text
    assert checkpoint.latest(tmp_path, "other-params") is None
    assert checkpoint.load_state(path)["step"] == 1


# ---------------------------------------------------------------------------------------------- stages

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project folder with a corpus and tokenizer, where the pretrain stage can run for real."""
    d = tmp_path_factory.mktemp("proj")
    texts = [f"Story {i}. The little robot number {i} rolled to the garden and counted {i % 7} bright flowers."
             for i in range(60)]
    (d / "data/interim").mkdir(parents=True)
    pl.DataFrame({"id": [str(i) for i in range(60)], "source": ["s"] * 60, "text": texts,
                  "split": ["val" if i % 10 == 0 else "train" for i in range(60)]}).write_parquet(d / "data/interim/corpus.parquet")
    save_tokenizer(train_tokenizer(texts, "bpe", 300, ["neutral", "joy"]), d / "models/tokenizer/tokenizer.json")
    params = {"persona": {"emotions": ["neutral", "joy"]},
              "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1},
              "pretrain": {"max_iters": 40, "batch_size": 4, "ckpt_interval": 5, "eval_interval": 10,
                           "eval_iters": 2, "warmup_iters": 5, "keep_checkpoints": 20, "device": "cpu"}}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/tokenize_corpus.py")], cwd=d, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return d


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _pretrain(d, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "stages/pretrain.py")], cwd=d, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _weights(d):
    return load_file(str(d / "models/pretrain/model.safetensors"))


def test_resume_after_sigkill_is_bit_identical(project, tmp_path):
    import shutil
    ref = tmp_path / "ref"
    shutil.copytree(project, ref)
    out, err = _pretrain(ref).communicate(timeout=300)
    assert (ref / "models/pretrain/model.safetensors").exists(), err
    expected = _weights(ref)

    run = tmp_path / "killed"
    shutil.copytree(project, run)
    ckpts = run / "models/.checkpoints/pretrain"
    for kill_at in (5, 15, 25):  # SIGKILL as soon as these checkpoints land, then run again
        proc = _pretrain(run)
        while not (ckpts / f"step_{kill_at:07d}").exists():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "models/pretrain/model.safetensors").exists()
    newest = max(int(p.name.split("_")[1]) for p in ckpts.glob("step_*"))  # the run may have got a step further
    out, err = _pretrain(run).communicate(timeout=300)
    assert "resuming from" in err and f"step {newest} of 40" in err and newest >= 25
    got = _weights(run)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    metrics = (ref / "reports/pretrain.json").read_text()
    assert (run / "reports/pretrain.json").read_text() == metrics
    # A forced re-run of a finished phase resumes at its last step: same weights, same metrics (no NaN).
    out, err = _pretrain(run).communicate(timeout=300)
    assert "step 40 of 40" in err and (run / "reports/pretrain.json").read_text() == metrics


@pytest.mark.parametrize("model", [{}, {"mlp": "moe", "n_experts": 32, "top_k": 1}], ids=["dense", "moe"])
def test_ddp_two_processes_on_gloo(project, tmp_path, model):
    """Two ranks train to the end; with mixture of experts an expert that no token of a rank's batch went to
    has no gradient there, which DDP must be told to expect."""
    import shutil
    d = tmp_path / "ddp"
    shutil.copytree(project, d)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["model"].update(model)
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "stages/pretrain.py")],
                          cwd=d, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = _weights(d)
    assert all(torch.isfinite(t).all() for t in weights.values())
    metrics = yaml.safe_load((d / "reports/pretrain.json").read_text())
    assert metrics["step"] == 40
    assert sorted(x.name for x in (d / "models").iterdir() if x.name.startswith(".pretrain")) == []
    aux = d / "reports/train/pretrain/plots/metrics/train/router_aux.tsv"
    assert aux.is_file() == bool(model)


def test_rows_choose_their_persona_embedding():
    from persona_lm.errors import PersonaError
    from persona_lm.params import parse_params
    from persona_lm.train.batches import ChatBatches
    from persona_lm.train.phase import chat_examples

    tok = ChatTokenizer(train_tokenizer(["hello there friend"] * 5, "bpe", 300, ["neutral", "joy"]))
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
             "emotions": [None], **({"persona": 1} if i % 2 else {})} for i in range(4)]
    p = parse_params({"persona": {"emotions": ["neutral", "joy"]}, "model": {"n_personas": 2}})
    examples = chat_examples(p, tok, rows)
    assert [e[2] for e in examples] == [0, 1, 0, 1]
    batch = ChatBatches(examples, examples, None, 0.0, 8, 32, tok.pad, seed=1).get("train", 0)
    assert batch["persona"].shape == (8,) and set(batch["persona"].tolist()) <= {0, 1}
    with pytest.raises(PersonaError, match=r"persona 1 is not in 0..0 \(raise model.n_personas\)"):
        chat_examples(parse_params({"persona": {"emotions": ["neutral", "joy"]}}), tok, rows)


def test_bf16_autocast_path_trains_on_cpu(tmp_path):
    """The autocast branch of the loop (bf16 on CPU here; bf16/fp16 on CUDA where available)."""
    stream = torch.arange(300) % 10
    model = tiny_model()
    phase = Pretrain(max_iters=4, batch_size=4, eval_interval=4, eval_iters=1, ckpt_interval=4, device="cpu",
                     precision="bf16")
    result = train(model, phase, CorpusBatches(stream, stream, None, 0, 4, 16, 1), tmp_path / "ck", "h",
                   {"live_dir": tmp_path / "live"}, "pretrain")
    assert result.step == 4 and torch.isfinite(torch.tensor(result.train_loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 master copies
