"""Decoding several generation requests as one batch (the server's ``/v1/generate``).

Prompts of different lengths are padded on the left, so every row's next token sits in the last column; the
padding is masked out of attention and each row's positions start at its first real token
(``GPT.forward(..., pad=...)``), so a request decodes to the same tokens as it would alone. Each row samples
with its own settings and random generator, and hands each new token to its request as soon as it exists
(streaming). Rows that asked for fewer tokens stop receiving them; the batch runs until the longest is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.models.gpt import sample_logits


@dataclass
class GenerationJob:
    """One request: prompt token ids (at least one) and its sampling settings.

    ``on_token(token_id)`` is called from the decoding thread with each new token, in order.
    """

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None
    on_token: Callable[[int], None] | None = None

    @property
    def length(self) -> int:
        """Positions this request needs in the cache: its prompt and its new tokens."""
        return len(self.ids) + self.max_new_tokens


def batch_fits(jobs: list[GenerationJob], max_seq_len: int) -> bool:
    """Whether these requests can decode together: left padding to the longest prompt, plus the most new
    tokens any of them asks for, must fit the model's context."""
    return max(len(j.ids) for j in jobs) + max(j.max_new_tokens for j in jobs) <= max_seq_len


@torch.no_grad()
def generate_batch(model: nn.Module, jobs: list[GenerationJob], device: torch.device) -> list[list[int]]:
    """Decodes every job; returns each job's new token ids.

    Raises:
        ValueError: If the jobs do not fit the model's context together (see :func:`batch_fits`).
    """
    if not jobs:
        return []
    if any(not j.ids for j in jobs):
        raise ValueError("every prompt needs at least one token")
    L = model.config.max_seq_len
    if not batch_fits(jobs, L):
        raise ValueError(f"these prompts and max_new_tokens do not fit the model's context of {L} tokens")
    model.eval()
    width = max(len(j.ids) for j in jobs)
    steps = max(j.max_new_tokens for j in jobs)
    idx = torch.zeros(len(jobs), width, dtype=torch.long)
    for row, job in enumerate(jobs):
        idx[row, width - len(job.ids) :] = torch.tensor(job.ids)
    pad = torch.tensor([width - len(j.ids) for j in jobs], device=device)
    generators = [
        None if j.seed is None else torch.Generator(device=device).manual_seed(j.seed) for j in jobs
    ]
    cache = model.init_cache(len(jobs), max_seq_len=width + steps)
    logits = model.forward_head(model.forward_features(idx.to(device), cache, pad)[:, -1])  # (B, V)
    out: list[list[int]] = [[] for _ in jobs]
    for step in range(steps):
        tokens = torch.cat(
            [
                sample_logits(logits[row : row + 1], j.temperature, j.top_k, generators[row], j.top_p)
                for row, j in enumerate(jobs)
            ]
        )  # (B, 1)
        for row, (job, token) in enumerate(zip(jobs, tokens.flatten().tolist(), strict=True)):
            if step < job.max_new_tokens:
                out[row].append(token)
                if job.on_token is not None:
                    job.on_token(token)
        if step == steps - 1:
            break
        logits = model.forward_head(model.forward_features(tokens, cache, pad)[:, -1])
    return out
