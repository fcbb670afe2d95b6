"""DP-SGD (train/privacy.py): per-example gradients, the accountant, private runs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tansuo.errors import RecipeError, TansuoError
from tansuo.models import create_model
from tansuo.train.checkpoint import load_checkpoint
from tansuo.train.privacy import per_example_gradients
from tests.helpers import Interrupted, classify_recipe, image_recipe, make_trainer


def _backward_one_by_one(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    n = len(next(iter(batch.values())))
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(n):
        model.zero_grad()
        loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                out.setdefault(name, []).append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def _image_loss(model, b):
    return F.cross_entropy(model(b["x"]), b["y"])


def _text_loss(model, b):
    mask, types = b["attention_mask"].bool(), b["token_type_ids"]
    return F.cross_entropy(model(b["input_ids"], attention_mask=mask, token_type_ids=types), b["y"])


def _lm_loss(model, b):
    return F.cross_entropy(model(b["t"][:, :-1]).flatten(0, 1), b["t"][:, 1:].flatten())


def _cases():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 6:] = 0  # one padded text
    types = torch.zeros_like(ids)
    text = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "y": ids[:, 0] % 3}
    return [
        ("vit_test", {"num_classes": 4, "image_size": 8, "in_channels": 1}, _image_loss,
         {"x": torch.randn(4, 1, 8, 8, generator=g), "y": torch.tensor([0, 1, 2, 3])}),
        ("resnet_test", {"num_classes": 4, "norm": "group", "norm_groups": 4}, _image_loss,
         {"x": torch.randn(4, 1, 8, 8, generator=g), "y": torch.tensor([0, 1, 2, 3])}),
        ("bert_test", {"vocab_size": 50, "num_classes": 3}, _text_loss, text),
        ("gpt_test", {"vocab_size": 50}, _lm_loss, {"t": torch.randint(0, 50, (4, 9), generator=g)}),
        ("gpt_test", {"vocab_size": 50, "norm": "rmsnorm", "positions": "rotary", "mlp": "swiglu"}, _lm_loss,
         {"t": torch.randint(0, 50, (4, 9), generator=g)}),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "overrides", "loss_fn", "batch"), _cases())
def test_per_example_gradients_equal_one_backward_per_example(name, overrides, loss_fn, batch):
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()  # no dropout: the two ways must see the same network
    grads, losses = per_example_gradients(model, loss_fn, batch)
    expected = _backward_one_by_one(model, loss_fn, batch)
    assert set(grads) == set(expected)
    for k, g in grads.items():
        torch.testing.assert_close(g, expected[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    want = torch.stack([loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(4)])
    torch.testing.assert_close(losses, want.detach())


def test_only_trainable_parameters_get_per_example_gradients():
    model = create_model("vit_test", num_classes=4, image_size=8, in_channels=1).eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    batch = {"x": torch.randn(3, 1, 8, 8), "y": torch.tensor([0, 1, 2])}
    grads, _ = per_example_gradients(model, _image_loss, batch)
    assert set(grads) == {"head.weight", "head.bias"}


def _private(npz: Path, out: Path, **train: object) -> dict:
    # a large noise multiplier: Opacus' RDP calibration and epsilon take a fraction of a second (seconds when
    # the noise is small)
    privacy = {"target_epsilon": 1.0, "delta": 1e-3, "max_grad_norm": 1.0, "accountant": "rdp"}
    return image_recipe(npz, out, privacy=privacy, grad_clip=0.0, **{"threads": 1, **train})


def test_accountant_matches_opacus_for_the_same_noise_rate_and_steps(image_npz, tmp_path):
    from opacus.accountants import RDPAccountant

    trainer = make_trainer(_private(image_npz, tmp_path / "run", max_steps=6, eval_every=6))
    dp = trainer.private
    assert dp is not None
    # Poisson batches: a pure function of the step, of size batch_size on average
    assert torch.equal(dp.sample(3), dp.sample(3)) and not torch.equal(dp.sample(3), dp.sample(4))
    sizes = [len(dp.sample(s)) for s in range(200)]
    assert abs(sum(sizes) / 200 - 16) < 1.5 and len(set(sizes)) > 3
    sample = dp.sample
    dp.sample = lambda step: torch.zeros(0, dtype=torch.long) if step == 2 else sample(step)  # an empty batch
    trainer.fit()
    reference = RDPAccountant()
    for _ in range(6):
        reference.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    assert dp.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-12)
    assert dp.sample_rate == pytest.approx(16 / 128)  # batch 16 of 128 training images (80% of 160)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_spends_the_target_over_the_planned_steps(accountant):
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=200, accountant=accountant
    )
    acc = create_accountant(accountant)
    for _ in range(200):
        acc.step(noise_multiplier=sigma, sample_rate=0.05)
    assert 2.9 <= acc.get_epsilon(delta=1e-5) <= 3.0


def test_private_run_logs_epsilon_within_target_and_bundles_it(image_npz, tmp_path):
    trainer = make_trainer(_private(image_npz, tmp_path / "run", max_steps=10, log_every=2, eval_every=5))
    result = trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [e["epsilon"] for e in events if e["event"] == "train"]
    assert len(eps) == 5 and eps == sorted(eps) and 0 < eps[0] < eps[-1] <= 1.0
    assert eps[-1] > 0.98  # the noise was calibrated to spend (nearly) all of it over the 10 steps
    privacy = json.loads((tmp_path / "run" / "bundle" / "metrics.json").read_text())["privacy"]
    assert privacy["steps"] == result["step"] and privacy["epsilon"] <= 1.0
    assert privacy["delta"] == 1e-3 and privacy["noise_multiplier"] > 0
    # the served card (/v1/model) carries the bundle's metrics, so its guarantee
    from fastapi.testclient import TestClient

    from tansuo.bundle import load_bundle
    from tansuo.serve.app import ServeConfig, Server, create_app

    server = Server(load_bundle(tmp_path / "run" / "bundle"), ServeConfig(), torch.device("cpu"))
    with TestClient(create_app(server)) as client:
        card = client.get("/v1/model").json()
    assert card["metrics"]["privacy"]["epsilon"] == privacy["epsilon"]


def test_private_run_resumes_bit_for_bit_with_the_accountant(image_npz, tmp_path):
    whole = make_trainer(_private(image_npz, tmp_path / "whole", max_steps=8, eval_every=4))
    whole.fit()
    half = make_trainer(_private(image_npz, tmp_path / "half", max_steps=8, eval_every=4))
    accumulate = half.private.accumulate

    def stop_at_step_6(step, *args):  # killed two steps after the checkpoint at step 4
        if step == 6:
            raise Interrupted
        return accumulate(step, *args)

    half.private.accumulate = stop_at_step_6
    with pytest.raises(Interrupted):
        half.fit()
    saved = load_checkpoint(tmp_path / "half" / "checkpoint.safetensors")["privacy"]
    assert saved["history"][0][2] == 4
    resumed = make_trainer(_private(image_npz, tmp_path / "half", max_steps=8, eval_every=4))
    resumed.fit(resume=True)
    assert resumed.private.accountant.history == whole.private.accountant.history
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_private_classify_trains(sentiment_tsv, tmp_path):
    privacy = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp"}
    raw = classify_recipe(sentiment_tsv, tmp_path / "run", max_steps=4, privacy=privacy, eval_every=4)
    result = make_trainer(raw).fit()
    assert 0 < result["privacy"]["epsilon"] <= 1.0


def test_refuses_batchnorm_models(image_npz, tmp_path):
    raw = _private(image_npz, tmp_path / "run")
    raw["model"] = {"name": "resnet_test"}
    with pytest.raises(RecipeError, match=r"resnet_test \(ResNet\).*BatchNorm.*model.overrides.norm=group"):
        make_trainer(raw)


def test_a_group_norm_resnet_trains_privately(image_npz, tmp_path):
    raw = _private(image_npz, tmp_path / "run", max_steps=3, eval_every=3)
    raw["model"] = {"name": "resnet_test", "overrides": {"norm": "group", "norm_groups": 4}}
    result = make_trainer(raw).fit()
    assert 0 < result["privacy"]["epsilon"] <= 1.0


def test_refuses_tasks_without_examples(text_file, tmp_path):
    from tests.helpers import lm_recipe

    raw = lm_recipe(text_file, tmp_path / "run", privacy={"target_epsilon": 3.0})
    with pytest.raises(RecipeError, match="'lm' task cannot address single examples"):
        make_trainer(raw)


@pytest.mark.parametrize(
    ("field", "value"),
    [("grad_accum", 2), ("precision", "fp16"), ("compile", True), ("activation_checkpointing", True)],
)
def test_refuses_combinations(image_npz, tmp_path, field, value):
    with pytest.raises(RecipeError, match=f"train.privacy does not combine with train.{field}"):
        make_trainer(_private(image_npz, tmp_path / "run", **{field: value}))


def test_refuses_mixup(image_npz, tmp_path):
    raw = _private(image_npz, tmp_path / "run", max_steps=2)
    raw["data"]["mixup"] = 0.5
    with pytest.raises(TansuoError, match="data.mixup"):
        make_trainer(raw).fit()


def test_resume_refuses_a_non_private_checkpoint(image_npz, tmp_path):
    make_trainer(image_recipe(image_npz, tmp_path / "run", max_steps=2)).fit()
    with pytest.raises(TansuoError, match="without train.privacy"):
        make_trainer(_private(image_npz, tmp_path / "run", max_steps=4)).fit(resume=True)
