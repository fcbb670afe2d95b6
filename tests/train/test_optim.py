import json
from pathlib import Path

import pytest
import torch

from tansuo.train.optim import lr_at, param_groups
from tests.helpers import Interrupted, image_recipe, interrupt_after, make_trainer


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


def test_inverse_sqrt_warms_up_peaks_decays_as_one_over_root_step_and_stops_at_the_floor() -> None:
    kw = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "total_steps": 10**6, "schedule": "inverse_sqrt"}
    warm = [lr_at(s, **kw) for s in range(100)]
    assert warm == pytest.approx([1e-3 * (s + 1) / 101 for s in range(100)])  # linear, as cosine's
    assert lr_at(100, **kw) == pytest.approx(1e-3)  # the peak, at the end of the warm-up
    assert lr_at(400, **kw) == pytest.approx(5e-4)  # lr * sqrt(100 / 400)
    assert lr_at(2500, **kw) == pytest.approx(2e-4)
    assert lr_at(10_000, **kw) == pytest.approx(1e-4)  # sqrt(100 / 10000) = 0.1: exactly the floor
    assert lr_at(40_000, **kw) == 1e-4 and lr_at(10**6, **kw) == 1e-4  # floored, never below
    decay = [lr_at(s, **kw) for s in range(100, 20_000, 37)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    # a pure function of the step: how long the run is does not change its past
    assert [lr_at(s, **{**kw, "total_steps": 500}) for s in range(0, 600, 7)] == [
        lr_at(s, **kw) for s in range(0, 600, 7)
    ]
    no_warmup = {**kw, "warmup_steps": 0, "min_lr": 0.0}
    assert lr_at(0, **no_warmup) == lr_at(1, **no_warmup) == 1e-3 and lr_at(4, **no_warmup) == 5e-4
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(500, **{**kw, "schedule": "linear"})


def test_inverse_sqrt_run_resumes_with_the_same_learning_rates_and_weights(
    image_npz: Path, tmp_path: Path
) -> None:
    def raw(out: Path) -> dict:
        train = {"max_steps": 12, "eval_every": 6, "checkpoint_every": 3, "log_every": 1, "warmup_steps": 4}
        return image_recipe(image_npz, out, schedule="inverse_sqrt", min_lr=5e-4, **train)

    def lrs(run: Path) -> dict[int, float]:  # the last logged lr of each step (a resumed run logs 7, 8 again)
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: e["lr"] for e in events if e["event"] == "train"}

    full = make_trainer(raw(tmp_path / "a"))
    full.fit()
    interrupted = make_trainer(raw(tmp_path / "b"))
    interrupt_after(interrupted, 8)  # inside step 9: the checkpoint of step 6 is the last
    with pytest.raises(Interrupted):
        interrupted.fit()
    torch.manual_seed(999)
    resumed = make_trainer(raw(tmp_path / "b"))
    resumed.fit(resume=True)
    expected = lrs(tmp_path / "a")
    assert sorted(expected) == list(range(1, 13)) and lrs(tmp_path / "b") == expected
    assert expected[5] == pytest.approx(3e-3) and expected[12] == pytest.approx(3e-3 * (4 / 11) ** 0.5)
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


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


def test_lr_scales_multiply_the_rate_of_the_parameters_under_a_prefix(
    image_npz: Path, tmp_path: Path
) -> None:
    from tansuo.errors import RecipeError
    from tansuo.models import create_model

    model = create_model("bert_test", num_layers=2)
    plain = param_groups(model, 0.1)
    assert [len(g["params"]) for g in plain] == [
        sum(p.dim() >= 2 for p in model.parameters()),
        sum(p.dim() < 2 for p in model.parameters()),
    ]  # decayed first: the order checkpoints index the optimizer state by
    groups = param_groups(model, 0.1, layer_decay=0.5, lr_scales={"head": 20.0})
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 20.0 and scale[id(model.head.bias)] == 20.0
    assert scale[id(model.stack.layers[1].mlp.in_proj.bias)] == 0.5  # the rest keeps its layer decay
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(RecipeError, match="no trained parameter's name starts with classifier"):
        param_groups(model, 0.1, lr_scales={"classifier": 2.0})
    # in a run: the head's group steps at lr * factor
    raw = image_recipe(image_npz, tmp_path / "run", max_steps=2, lr=1e-3, lr_scales={"head": 10.0})
    trainer = make_trainer(raw)
    trainer.fit()
    rates = {g["lr"] for g in trainer.optimizer.param_groups}
    head = next(
        g["lr"]
        for g in trainer.optimizer.param_groups
        if any(p is trainer.model.head.weight for p in g["params"])
    )
    assert head == pytest.approx(10 * min(rates)) and len(rates) == 2


def test_trainable_patterns_freeze_the_rest(image_npz: Path, tmp_path: Path) -> None:
    from tansuo.errors import RecipeError

    trainer = make_trainer(
        image_recipe(image_npz, tmp_path / "run", max_steps=2, trainable=["*.bias", "head.*"])
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert "head.weight" in changed and any(n.endswith(".bias") and "head" not in n for n in changed)
    assert all(n.endswith(".bias") or n.startswith("head.") for n in changed), changed
    with pytest.raises(RecipeError, match=r"train.trainable: \*.gain matches no parameter"):
        make_trainer(image_recipe(image_npz, tmp_path / "b", trainable=["*.bias", "*.gain"]))
    with pytest.raises(RecipeError, match="does not combine with train.lora"):
        make_trainer(image_recipe(image_npz, tmp_path / "c", trainable=["*.bias"], lora={"r": 2}))


def test_sgd_with_momentum_steps_as_torch_and_resumes_bit_for_bit(image_npz: Path, tmp_path: Path) -> None:
    from tansuo.train.optim import build_optimizer

    torch.manual_seed(0)
    model, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer(model, 0.1, 0.0, (0.9, 0.999), torch.device("cpu"), kind="sgd", momentum=0.8)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.8)
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o in ((model, ours), (reference, theirs)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(model.weight, torch.nn.Linear(4, 3).weight)

    def raw(out: Path) -> dict:
        train = {"max_steps": 8, "eval_every": 4, "checkpoint_every": 3, "optimizer": "sgd", "lr": 0.05}
        return image_recipe(image_npz, out, **train)

    full = make_trainer(raw(tmp_path / "a"))
    assert isinstance(full.optimizer, torch.optim.SGD)
    full.fit()
    interrupted = make_trainer(raw(tmp_path / "b"))
    interrupt_after(interrupted, 5)  # inside step 6: the checkpoint of step 3 (with momentum) is the last
    with pytest.raises(Interrupted):
        interrupted.fit()
    resumed = make_trainer(raw(tmp_path / "b"))
    resumed.fit(resume=True)
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
