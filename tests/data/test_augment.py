"""Image augmentation policies and mixing: pure functions of (images, seed), consistent shapes and targets."""

import random

import pytest
import torch

from tansuo.data import auto_augment, mix_batch


def _images(channels: int = 1) -> torch.Tensor:
    return torch.rand(16, channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 16.0


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_policies_are_pure_functions_of_the_seed(policy: str, channels: int) -> None:
    x = _images(channels)
    torch.manual_seed(1)
    random.seed(1)
    a = auto_augment(x, policy, 16.0, seed=7)
    after = torch.rand(())
    torch.manual_seed(2)  # other global state: the same result, and the global stream is untouched
    random.seed(2)
    b = auto_augment(x, policy, 16.0, seed=7)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(()), after)
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not torch.equal(auto_augment(x, policy, 16.0, seed=8), a)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 16.0 + 1e-4  # back in source units


def test_grey_images_go_through_every_operation() -> None:
    # RandAugment's colour operations need three channels: the grey path must survive all of them
    x = _images(1)
    for seed in range(40):
        out = auto_augment(x, "randaugment", 16.0, seed=seed)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_policies_refuse_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="grey .* or RGB .* not 2 channels"):
        auto_augment(torch.rand(2, 2, 8, 8), "randaugment", 1.0, seed=0)
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        auto_augment(torch.rand(2, 1, 8, 8), "autoaugment", 1.0, seed=0)


@pytest.mark.parametrize(("mixup", "cutmix"), [(1.0, 0.0), (0.0, 1.0)])
def test_mixing_targets_are_probabilities_matching_the_images(mixup: float, cutmix: float) -> None:
    # each image is a constant equal to its label: the mixed image's mean is then the targets' mean label
    labels = torch.arange(8) % 4
    x = labels.float()[:, None, None, None].expand(8, 1, 8, 8).clone()
    mixed, target = mix_batch(x, labels, 4, mixup=mixup, cutmix=cutmix, seed=3)
    assert mixed.shape == x.shape and target.shape == (8, 4)
    torch.testing.assert_close(target.sum(-1), torch.ones(8))
    assert (target >= 0).all()
    torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), target @ torch.arange(4.0), atol=1e-5, rtol=0)
    assert (target.max(-1).values < 1).any()  # something was mixed
    again = mix_batch(x, labels, 4, mixup=mixup, cutmix=cutmix, seed=3)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], target)


def test_an_unmixed_batch_gets_one_hot_targets() -> None:
    x, labels = _images(), torch.arange(16) % 4
    out, target = mix_batch(x, labels, 4, mixup=0.0, cutmix=0.0, seed=0)
    assert out is x
    assert torch.equal(target, torch.nn.functional.one_hot(labels, 4).float())
    with pytest.raises(ValueError, match="sum to at most 1"):
        mix_batch(x, labels, 4, mixup=0.6, cutmix=0.6, seed=0)
