"""Optimizer choice: Muon's update is the scaled polar factor of its Nesterov momentum, only the blocks' 2-D
matrices get Muon, `optimizer: adamw` is the AdamW of before, GradScaler and resume work with both optimizers
at once, and params refuse Muon where it does not apply, naming the key."""

import shutil

import pytest
import torch

from persona_lm.errors import ParamsError
from persona_lm.model import GPT, GPTConfig
from persona_lm.params import Pretrain, parse_params
from persona_lm.train.batches import CorpusBatches
from persona_lm.train.loop import Optimizers, make_optimizer, set_lr, train


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32, n_emotions=3, **kw))


def with_spectrum(shape, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random matrix with singular values spread over [0.2, 1] (well inside what 5 Newton-Schulz steps
    orthogonalise), and its polar factor U @ V^T, known without an SVD."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return u @ torch.diag(torch.linspace(1.0, 0.2, k)) @ v.T, u @ v.T


def test_muon_update_is_the_scaled_polar_factor_of_nesterov_momentum():
    """Two steps on every hidden matrix, against the momentum and polar factor computed here: step t moves W by
    -lr * 0.2 * sqrt(max(rows, cols)) * O after decaying it by (1 - lr * wd), where O has the singular vectors
    of the Nesterov look-ahead M_t and singular values within Newton-Schulz's tolerance of 1 (Jordan et al.
    2024: roughly 0.7 to 1.2 after 5 quintic steps; exactly U V^T only in the limit)."""
    lr, muon_lr, wd, mu = 1e-3, 0.02, 0.1, 0.95
    model = tiny_model()
    phase = Pretrain(optimizer="muon", lr=lr, muon_lr=muon_lr, weight_decay=wd, muon_momentum=mu)
    opt = make_optimizer(model, phase, "cpu")
    set_lr(opt, 0.5 * lr)  # a schedule at half its peak: Muon runs at half of muon_lr
    step_lr = 0.5 * muon_lr
    hidden = {n: p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    g = torch.Generator().manual_seed(1)
    first = {}
    for step in (1, 2):
        polar, before = {}, {n: p.detach().clone() for n, p in hidden.items()}
        for name, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        for name, p in hidden.items():
            target, polar[name] = with_spectrum(p.shape, g)
            if step == 1:  # buffer (1 - mu) g1, look-ahead (1 - mu) g1 + mu * buffer = (1 - mu)(1 + mu) g1
                p.grad = target
                first[name] = target
            else:  # buffer mu (1 - mu) g1 + (1 - mu) g2, look-ahead (1 - mu)((1 + mu) g2 + mu^2 g1): pick g2 so
                p.grad = (target - mu ** 2 * first[name]) / (1 + mu)  # that the look-ahead is `target`'s
        opt.step()
        for name, p in hidden.items():
            scale = step_lr * 0.2 * max(p.shape) ** 0.5
            update = (before[name] * (1 - step_lr * wd) - p.detach()) / scale
            u, s, vh = torch.linalg.svd(update, full_matrices=False)
            assert 0.6 < s.min() and s.max() < 1.25, (name, step, s)
            assert torch.allclose(u @ vh, polar[name], atol=0.02), (name, step)
            assert torch.nn.functional.cosine_similarity(update.flatten(), polar[name].flatten(), dim=0) > 0.97


def test_only_the_blocks_matrices_get_muon():
    model = tiny_model()
    model.blocks[0].mlp.experts = torch.nn.Parameter(torch.zeros(2, 8, 8))  # a future MoE layer's 3-D weight
    model.blocks[1].mlp.c_fc.weight.requires_grad_(False)
    model.ln_f.weight.requires_grad_(False)
    opt = make_optimizer(model, Pretrain(optimizer="muon"), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = [{names[id(p)] for p in g["params"]} for g in opt.optimizers["adamw"].param_groups]
    assert muon == {f"blocks.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")} - {"blocks.1.mlp.c_fc.weight"}
    assert adamw[0] == {"wte.weight", "wpe.weight", "persona.weight", "emotion_head.weight", "blocks.0.mlp.experts"}
    assert "lm_head.weight" not in names.values()  # tied: the same tensor as wte.weight, trained by AdamW
    assert "emotion_head.bias" in adamw[1] and "blocks.0.ln_1.weight" in adamw[1]
    assert not {"blocks.1.mlp.c_fc.weight", "ln_f.weight"} & (muon | adamw[0] | adamw[1])  # frozen: in neither
    assert [g["weight_decay"] for g in opt.optimizers["adamw"].param_groups] == [0.1, 0.0]


def test_adamw_is_the_optimizer_of_before(tmp_path):
    """`optimizer: adamw` builds the fused AdamW as before (decay on >=2-D weights), with a plain AdamW state
    dict (older checkpoints resume), and the Muon knobs change nothing."""
    model = tiny_model()
    opt = make_optimizer(model, Pretrain(lr=2e-3, beta2=0.99), "cpu")
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.99)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [g["params"] for g in opt.param_groups] == [[p for p in params if p.dim() >= 2],
                                                       [p for p in params if p.dim() < 2]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0] and "lr_scale" not in opt.param_groups[0]
    set_lr(opt, 1.2345e-3)
    assert [g["lr"] for g in opt.param_groups] == [1.2345e-3, 1.2345e-3]  # exactly: scaled by 1.0

    stream = torch.arange(400) % 10
    weights = []
    for i, knobs in enumerate([{}, {"optimizer": "adamw", "muon_lr": 0.5, "muon_momentum": 0.5, "muon_ns_steps": 2}]):
        model = tiny_model()
        phase = Pretrain(max_iters=12, batch_size=4, warmup_iters=3, eval_interval=12, eval_iters=1,
                         ckpt_interval=12, device="cpu", **knobs)
        train(model, phase, CorpusBatches(stream, stream, None, 0.0, 4, 16, seed=1), tmp_path / f"ck{i}", "h",
              {"live_dir": tmp_path / f"live{i}"}, "pretrain")
        weights.append(model.state_dict())
    for name, t in weights[0].items():
        assert torch.equal(t, weights[1][name]), name


def test_grad_scaler_unscales_and_skips_both_optimizers():
    """The loop's fp16 path: one unscale_ covers AdamW's and Muon's gradients; an inf in either skips both."""
    def run(scale: float, poison: bool):
        model = tiny_model()
        opt = make_optimizer(model, Pretrain(optimizer="muon", lr=1e-2), "cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        logits, _ = model(torch.arange(12).view(2, 6) % 16)
        scaler.scale(logits.float().pow(2).mean()).backward()
        if poison:
            model.blocks[0].attn.c_proj.weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        return model, opt

    plain, _ = run(1.0, False)
    scaled, opt = run(2.0 ** 12, False)  # a power of two: unscaling is exact
    assert len(opt.optimizers["muon"].state) == 8 and len(opt.optimizers["adamw"].state) > 0
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters()):
        assert torch.equal(a, b), name
    skipped, opt = run(2.0 ** 12, True)
    assert not opt.optimizers["muon"].state and not opt.optimizers["adamw"].state
    for (name, a), b in zip(tiny_model().named_parameters(), skipped.parameters()):
        assert torch.equal(a, b), name


def test_muon_resume_mid_run_is_bit_identical(tmp_path):
    """A run stopped after its step-10 checkpoint and started again ends with the weights of one that never
    stopped: both optimizers' state (Muon's momentum, AdamW's moments) and the lr scale come back."""
    stream = torch.arange(600) % 10
    batches = CorpusBatches(stream, stream, None, 0.0, 4, 16, seed=1)
    phase = Pretrain(max_iters=20, batch_size=4, warmup_iters=4, eval_interval=20, eval_iters=1, ckpt_interval=10,
                     keep_checkpoints=5, device="cpu", optimizer="muon", muon_lr=0.01)
    whole = tiny_model(dropout=0.1)
    train(whole, phase, batches, tmp_path / "whole", "h", {"live_dir": tmp_path / "live-whole"}, "pretrain")
    state = torch.load(tmp_path / "whole" / "step_0000010" / "state.pt", weights_only=True)
    assert set(state["optimizer"]) == {"adamw", "muon"}
    assert state["optimizer"]["muon"]["param_groups"][0]["lr_scale"] == pytest.approx(10.0)

    shutil.copytree(tmp_path / "whole" / "step_0000010", tmp_path / "stopped" / "step_0000010")
    torch.manual_seed(123)  # other initial weights and RNG state: the checkpoint's replace both
    resumed = GPT(whole.cfg)
    result = train(resumed, phase, batches, tmp_path / "stopped", "h", {"live_dir": tmp_path / "live-stopped"},
                   "pretrain")
    assert result.resumed_from == 10 and result.step == 20
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("data, message", [
    ({"pretrain": {"optimizer": "sgd"}}, "params.yaml: pretrain.optimizer: must be one of"),
    ({"finetune": {"muon_momentum": 1.0}}, "params.yaml: finetune.muon_momentum: must be < 1"),
    ({"emotion": {"muon_lr": 0}}, "params.yaml: emotion.muon_lr: must be > 0.0 (got 0)"),
    ({"pretrain": {"muon_adjust_lr": "keller"}}, "params.yaml: pretrain.muon_adjust_lr: must be one of"),
    ({"base": {"model": "org/name"}, "pretrain": {"optimizer": "muon"}},
     "params.yaml: pretrain.optimizer: muon trains our own model's block matrices, not base.model org/name"),
    ({"lora": {"r": 8}, "finetune": {"optimizer": "muon"}},
     "params.yaml: finetune.optimizer: muon does not train LoRA adapters (lora.r is 8"),
])
def test_bad_optimizer_params_name_the_key(data, message):
    with pytest.raises(ParamsError) as e:
        parse_params(data)
    assert str(e.value).splitlines()[0].startswith(message)


def test_muon_is_allowed_where_it_trains_our_blocks():
    """Pretraining from scratch trains all weights even with lora.r > 0; a phase outside lora.phases too."""
    p = parse_params({"lora": {"r": 8, "phases": ["finetune"]},
                      "pretrain": {"optimizer": "muon"}, "emotion": {"optimizer": "muon"}})
    assert p.pretrain.optimizer == p.emotion.optimizer == "muon" and p.finetune.optimizer == "adamw"
    assert isinstance(make_optimizer(tiny_model(), p.pretrain, "cpu"), Optimizers)
