"""The model: every architecture option builds and runs, attention is causal, shapes and counts add up,
and impossible combinations are rejected at params validation with the key named."""

import pytest
import torch

from persona_lm.errors import ParamsError
from persona_lm.model import GPT, GPTConfig
from persona_lm.params import parse_params

FAMILIES = {
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned"),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, tie_embeddings=False),
    "mqa": dict(n_kv_head=1, bias=True),
}


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, n_emotions=5)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    """Changing a future token leaves every earlier position's logits unchanged."""
    model = tiny(**FAMILIES[family])
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_and_emotion_head(family):
    model = tiny(**FAMILIES[family])
    x = torch.randint(0, 97, (3, 10))
    logits, emo = model(x, emotion_index=torch.tensor([9, 4, 0]))
    assert logits.shape == (3, 10, 97) and emo.shape == (3, 5)
    h = model.hidden(x)
    assert torch.allclose(emo[1], model.emotion_head(h[1, 4]), atol=1e-6)


def test_param_counts_add_up_and_tying():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    c = tied.param_counts()
    assert c["total"] == sum(p.numel() for p in tied.parameters())
    assert c["total"] == sum(v for k, v in c.items() if k != "total")
    assert c["lm_head"] == 0 and untied.param_counts()["lm_head"] == 97 * 32
    assert tied.lm_head.weight is tied.wte.weight


def test_persona_embedding_starts_neutral_and_changes_output():
    model = tiny(n_personas=3)
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        base, _ = model(x)
        same, _ = model(x, persona=torch.tensor([2]))
        assert torch.equal(base, same)
        model.persona.weight[2].normal_()
        other, _ = model(x, persona=torch.tensor([2]))
    assert not torch.allclose(base, other)


def test_too_long_sequence_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("model, message", [
    ({"n_embd": 130, "n_head": 4}, "params.yaml: model.n_embd: must be divisible by n_head"),
    ({"n_head": 4, "n_kv_head": 3}, "params.yaml: model.n_kv_head: must divide n_head"),
    ({"n_embd": 12, "n_head": 4, "pos": "rope"}, "params.yaml: model.pos: rope needs an even head size"),
    ({"norm": "batchnorm"}, "params.yaml: model.norm: must be one of"),
    ({"n_layer": 0}, "params.yaml: model.n_layer: must be >= 1"),
])
def test_impossible_architectures_fail_at_params(model, message):
    with pytest.raises(ParamsError) as e:
        parse_params({"model": model})
    assert str(e.value).startswith(message)


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = tiny(**FAMILIES["llama"]).train()
        model.grad_checkpointing = ckpt
        logits, _ = model(x)
        logits.sum().backward()
        grads.append(model.wte.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
