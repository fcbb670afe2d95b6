"""Learned, sinusoidal and rotary positions."""

import math

import pytest
import torch

from tansuo.blocks import LearnedPositions, RotaryEmbedding, SinusoidalPositions


def test_rotary_preserves_norms():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, 32)
    x = torch.randn(2, 3, 5, 8)
    rotated = rotary.rotate(x, offset=7)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)
    assert not torch.allclose(rotated, x)


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, 64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> torch.Tensor:
        return (rotary.rotate(q, m) * rotary.rotate(k, n)).sum()

    torch.testing.assert_close(score(3, 1), score(40, 38), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotary.rotate(q, 0), q)  # position 0: no rotation


def test_rotary_needs_even_head_dim_and_known_positions():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        RotaryEmbedding(8, 16).rotate(torch.zeros(1, 1, 4, 8), offset=13)


def test_sinusoidal_positions_are_not_parameters():
    positions = SinusoidalPositions(16, 6)
    assert list(positions.parameters()) == []
    assert positions.state_dict() == {}
    table = positions(16)
    assert table.shape == (16, 6)
    pos, i = 5, 1  # dimensions 2i and 2i + 1
    angle = pos / 10000 ** (2 * i / 6)
    torch.testing.assert_close(table[pos, 2 * i], torch.tensor(math.sin(angle)))
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.tensor(math.cos(angle)))
    assert torch.equal(positions(2, offset=5), table[5:7])


def test_learned_positions_offset_tensor_and_range():
    positions = LearnedPositions(8, 4)
    assert torch.equal(positions(3, offset=2), positions.weight[2:5])
    assert torch.equal(positions(torch.tensor([[0, 7]])), positions.weight[torch.tensor([[0, 7]])])
    with pytest.raises(ValueError, match="max_seq_len"):
        positions(5, offset=4)
