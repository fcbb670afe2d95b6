"""Batched decoding: left-padded prompts decode to the same tokens as each prompt alone."""

from __future__ import annotations

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.generation import GenerationJob, batch_fits, generate_batch

CPU = torch.device("cpu")


def _model(positions: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("gpt_test", positions=positions, max_seq_len=32).eval()
    with torch.no_grad():  # spread the logits, so greedy decoding has no near-ties
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_padding_does_not_change_a_rows_logits(positions: str) -> None:
    model = _model(positions)
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    with torch.no_grad():
        padded = model(batch, pad=torch.tensor([4, 0]))
        torch.testing.assert_close(padded[0, 4:], model(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[1], model(long)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_batch_decodes_like_each_prompt_alone(positions: str) -> None:
    model = _model(positions)
    prompts = [[3], [1, 2, 3, 4, 5, 6], [7, 7], [9, 1, 4, 2]]
    lengths = [10, 4, 7, 10]
    streamed: list[list[int]] = [[] for _ in prompts]
    jobs = [
        GenerationJob(ids=p, max_new_tokens=n, temperature=0.0, on_token=streamed[i].append)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    together = generate_batch(model, jobs, CPU)
    for prompt, n, got, stream in zip(prompts, lengths, together, streamed, strict=True):
        alone = model.generate(torch.tensor([prompt]), n, temperature=0.0)[0, len(prompt) :].tolist()
        assert got == alone and stream == alone


def test_sampling_follows_each_requests_seed() -> None:
    model = _model("rotary")
    job = dict(ids=[1, 2], max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=11)
    alone = generate_batch(model, [GenerationJob(**job)], CPU)[0]
    g = torch.Generator().manual_seed(11)
    reference = model.generate(torch.tensor([[1, 2]]), 8, temperature=1.0, top_k=20, top_p=0.9, generator=g)
    assert alone == reference[0, 2:].tolist()
    other = GenerationJob(ids=[4, 4, 4, 4, 4], max_new_tokens=3, temperature=1.0, seed=5)
    assert generate_batch(model, [other, GenerationJob(**job)], CPU)[1] == alone


def test_batches_must_fit_the_context() -> None:
    model = _model("learned")  # max_seq_len 32
    fits = [GenerationJob(ids=[1] * 22, max_new_tokens=2), GenerationJob(ids=[1], max_new_tokens=12)]
    assert batch_fits(fits[:1], 32) and batch_fits(fits[1:], 32) and not batch_fits(fits, 32)
    with pytest.raises(ValueError, match="context"):
        generate_batch(model, fits, CPU)
