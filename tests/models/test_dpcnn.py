"""The DP-SGD CNN (models/dpcnn.py): the published shape, Opacus' hooks, a private run."""

from pathlib import Path

import pytest
import torch

from tansuo.models import create_model
from tansuo.train.privacy import hooked_gradients, hooks_apply, per_example_gradients
from tests.helpers import image_recipe, make_trainer


def test_the_mnist_preset_has_the_published_shape() -> None:
    model = create_model("dpcnn_mnist")
    assert model.num_params() == 26_010  # Opacus' MNIST example's network
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 3
    relu = create_model("dpcnn_mnist", activation="relu", norm="group")
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in relu.modules()) == 2
    with pytest.raises(ValueError, match="norm_groups \\(3\\) must divide width \\(16\\)"):
        create_model("dpcnn_mnist", norm="group", norm_groups=3)
    with pytest.raises(ValueError, match="too small"):
        create_model("dpcnn_mnist", image_size=8)


def test_its_per_example_gradients_come_from_opacus_hooks() -> None:
    model = create_model("dpcnn_test", num_classes=4, norm="group").train()
    assert hooks_apply(model)
    batch = {"x": torch.randn(5, 1, 16, 16), "y": torch.tensor([0, 1, 2, 3, 0])}

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"])

    grads, _ = hooked_gradients(model, loss, batch)
    expected, _ = per_example_gradients(model, loss, batch)
    for k, g in grads.items():
        torch.testing.assert_close(g, expected[k], atol=1e-5, rtol=1e-4, msg=k)


def test_trains_privately_with_sgd(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    images = rng.uniform(0, 1, size=(200, 16, 16))
    images[labels == 1, 4:8, :] += 3  # a bright band for class 1
    np.savez(tmp_path / "bands.npz", images=images, labels=labels)
    privacy = {"target_epsilon": 8.0, "delta": 1e-3, "max_grad_norm": 1.0, "accountant": "rdp"}
    raw = image_recipe(tmp_path / "bands.npz", tmp_path / "run", max_steps=30, eval_every=30, batch_size=40)
    raw["train"].update(optimizer="sgd", lr=0.5, grad_clip=0.0, privacy=privacy, threads=1)
    raw["data"].update(max_shift=0, mean=[0.5], std=[1.0])
    raw["model"] = {"name": "dpcnn_test"}
    result = make_trainer(raw).fit()
    assert 0 < result["privacy"]["epsilon"] <= 8.0
    assert result["test"]["accuracy"] >= 0.9
