import pytest
import torch

from tansuo.data.masking import mask_tokens

MASK, VOCAB = 4, 1000


def _batch(n: int = 400, t: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    special[:, 100:] = True  # padding
    return ids, special


def test_bert_masking_statistics() -> None:
    ids, special = _batch()
    corrupted, labels = mask_tokens(
        ids,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_mask=special,
        generator=torch.Generator().manual_seed(1),
    )
    chosen = labels != -100
    eligible = (~special).sum().item()
    assert chosen.sum().item() / eligible == pytest.approx(0.15, abs=0.005)
    assert not (chosen & special).any()  # padding and special tokens are never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    n = chosen.sum().item()
    masked = (corrupted[chosen] == MASK).sum().item() / n
    kept = (corrupted[chosen] == ids[chosen]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.01)  # kept, plus random draws of the same id
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)  # replaced by a random token
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # nothing else changes


def test_masking_is_reproducible_and_checks_arguments() -> None:
    ids, special = _batch(4, 16)
    a, b = (
        mask_tokens(
            ids,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            special_mask=special,
            generator=torch.Generator().manual_seed(5),
        )
        for _ in range(2)
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(
            ids,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            special_mask=special,
            generator=torch.Generator(),
            probability=1.5,
        )
    with pytest.raises(ValueError, match="special_mask"):
        mask_tokens(
            ids,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            special_mask=special[:, :3],
            generator=torch.Generator(),
        )
