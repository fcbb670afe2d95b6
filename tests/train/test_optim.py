import pytest
import torch

from tansuo.train.optim import lr_at, param_groups


def test_weight_decay_on_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3


def test_schedule_warmup_then_cosine_to_min() -> None:
    kw = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "total_steps": 2000, "schedule": "cosine"}
    lrs = [lr_at(s, **kw) for s in range(2000)]
    assert lrs[0] < lrs[50] < lrs[99] < 1e-3
    assert lrs[100] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:], strict=False))
    assert lr_at(2000, **kw) == pytest.approx(1e-4)
    assert lr_at(1050, **kw) == pytest.approx(5.5e-4)
    assert lr_at(500, **{**kw, "schedule": "constant"}) == 1e-3


def test_layer_decay_scales_lr_by_depth() -> None:
    from tansuo.models import create_model
    from tansuo.train.optim import layer_depth

    model = create_model("bert_test", num_layers=2)
    assert layer_depth("tok_emb.weight", 2) == 0 and layer_depth("stack.layers.1.attn.q_proj.weight", 2) == 2
    assert layer_depth("head.weight", 2) == 3 and layer_depth("0.stack.layers.0.mlp.in_proj.bias", 2) == 1
    groups = param_groups(model, 0.1, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.tok_emb.weight)] == 0.125  # 0.5 ** 3
    assert scale[id(model.stack.layers[0].attn.q_proj.weight)] == 0.25
    assert scale[id(model.stack.layers[1].mlp.in_proj.bias)] == 0.5
    assert scale[id(model.head.weight)] == 1.0
    assert all((g["weight_decay"] == 0.1) == (g["params"][0].dim() >= 2) for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["lr_scale"] == 1.0 for g in param_groups(model, 0.1))
