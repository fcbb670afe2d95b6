"""Choosing the next token from a decoder's logits: greedy, temperature, top-k and nucleus (top-p) sampling.
One function shared by ``GPT.generate`` and the batched decoders of ``generation.py``."""

import torch

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily


def sample_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Picks one token id per row of ``logits`` (B, V); returns ``(B, 1)``.

    ``temperature`` 0 is greedy (so is one below 1e-5, as in vLLM: dividing by it would overflow the logits
    to infinities); otherwise the logits are divided by it, cut to the ``top_k`` likeliest tokens and then to
    the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2019), and one
    token is drawn.
    """
    if 0 <= temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # the probability of all likelier tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the likeliest stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
