"""The contract every registered model keeps (timm-style tests over the whole registry)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from tansuo.models import create_model, list_models, model_info

LARGE = 5_000_000  # above this many parameters only building is checked, to keep the suite fast


def _build(name: str):
    torch.manual_seed(0)
    return create_model(name)


def _inputs(model) -> tuple:
    """``example_input`` as positional arguments (an encoder-decoder takes source and target)."""
    x = model.example_input()
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite(name):
    model = _build(name)
    info = model_info(name)
    assert model.num_params() == info["num_params"]
    assert model.family == info["family"]
    assert dataclasses.asdict(model.config) == info["config"]
    if model.num_params() > LARGE:
        return
    x = model.example_input(batch_size=2)
    args = x if isinstance(x, tuple) else (x,)
    out = model(*args)
    if model.family == "gpt":
        assert out.shape == (*x.shape, model.config.vocab_size)
    elif model.family == "seq2seq":  # next-token logits of the target
        assert out.shape == (*args[1].shape, model.config.vocab_size)
    elif hasattr(getattr(model, "head", None), "points"):  # a detector: per point a box, centre-ness, classes
        assert out.shape == (2, len(model.head.points), 4 + 1 + model.config.num_classes)
    elif hasattr(model, "next_item_scores"):  # a recommender: every item's score at each position
        assert out.shape == (*x.shape, model.config.num_items + 1)
        assert model.next_item_scores(x).shape == (2, model.config.num_items + 1)
    elif out.dim() == 4:  # a segmenter: class scores per pixel
        assert out.shape == (2, model.config.num_classes, *x.shape[-2:])
    else:
        assert out.shape == (2, model.config.num_classes)
    assert torch.isfinite(out).all()
    model.eval()
    torch.testing.assert_close(
        model.forward_head(model.forward_features(*args)), model(*args), atol=0, rtol=0
    )


@pytest.mark.parametrize("name", list_models("*_test"))
def test_every_parameter_gets_a_gradient(name):
    model = _build(name)
    x = _inputs(model)
    loss = model(*x).float().pow(2).mean()
    if model.family == "bert":  # the MLM head is a second head, outside forward()
        loss = loss + model.mlm_logits(model.forward_features(*x)).float().pow(2).mean()
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a frozen backbone: none
    assert trainable
    for param_name, param in trainable:
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", list_models())
def test_safetensors_round_trip_rebuilds_the_same_model(name, tmp_path):
    model = _build(name)
    model(*_inputs(model))  # a training step's forward updates BatchNorm statistics
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    rebuilt = create_model(model.model_name, **dataclasses.asdict(model.config))
    rebuilt.load_state_dict(load_file(path))
    model.eval()
    rebuilt.eval()
    x = _inputs(model)
    assert torch.equal(model(*x), rebuilt(*x))
