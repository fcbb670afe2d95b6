"""Masked-language-model corruption (Devlin et al. 2019, BERT, section 3.1).

Of the tokens that may be chosen (not padding or special tokens), each is chosen with probability
``probability`` (15%); a chosen token is replaced by ``[MASK]`` 80% of the time, by a random token 10% of the
time and kept 10% of the time. Labels hold the original id at chosen positions and ``ignore_index`` elsewhere,
so ``F.cross_entropy(logits, labels, ignore_index=-100)`` scores only the chosen positions.
"""

from __future__ import annotations

import torch


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_mask: torch.Tensor,
    generator: torch.Generator,
    probability: float = 0.15,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch for MLM training.

    Args:
        input_ids: Token ids ``(B, T)``.
        mask_token_id: Id of ``[MASK]``.
        vocab_size: Random replacements are drawn from ``[0, vocab_size)``.
        special_mask: ``(B, T)`` bool, True where a token must never be chosen (padding, [CLS], [SEP]).
        generator: Source of randomness, so a batch's corruption is reproducible.
        probability: Share of eligible tokens chosen.
        ignore_index: Label of positions that are not scored.

    Returns:
        ``(corrupted_ids, labels)``, both ``(B, T)`` int64.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if special_mask.shape != input_ids.shape:
        raise ValueError(
            f"special_mask {tuple(special_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    draw = torch.rand(input_ids.shape, generator=generator)  # (B, T): who is chosen
    chosen = (draw < probability) & ~special_mask
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, ignore_index))
    action = torch.rand(input_ids.shape, generator=generator)  # (B, T): what happens to the chosen
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    corrupted = input_ids.clone()
    corrupted[chosen & (action < 0.8)] = mask_token_id
    replace = chosen & (action >= 0.8) & (action < 0.9)
    corrupted[replace] = random_ids[replace]
    return corrupted, labels
