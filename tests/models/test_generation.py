"""Batched decoding: left-padded prompts decode to the same tokens as each prompt alone."""

from __future__ import annotations

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.generation import DecodeEngine, GenerationJob, batch_fits, generate_batch

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


def _llama_like() -> torch.nn.Module:
    torch.manual_seed(1)
    model = create_model(
        "gpt_test",
        positions="rotary",
        norm="rmsnorm",
        mlp="swiglu",
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=48,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _alone(model: torch.nn.Module, job: dict) -> list[int]:
    return generate_batch(model, [GenerationJob(**job)], CPU)[0]


@pytest.mark.parametrize("kind", ["learned", "llama"])
def test_continuous_batching_decodes_each_request_as_alone(kind: str) -> None:
    """Requests join while others decode, leave when done, and rows are compacted as they leave; every
    request still gets exactly its solo tokens (greedy and seeded sampling)."""
    model = _model("learned") if kind == "learned" else _llama_like()
    specs = [
        dict(ids=[3, 1, 4], max_new_tokens=9, temperature=0.0),
        dict(ids=[1, 5, 9, 2, 6, 5, 3], max_new_tokens=3, temperature=1.0, seed=7),
        dict(ids=[2], max_new_tokens=12, temperature=0.0),
        dict(ids=[7, 7, 7, 7], max_new_tokens=5, temperature=0.9, top_k=10, seed=3),
        dict(ids=[8, 1, 8, 1, 8, 1, 8, 1, 8, 1], max_new_tokens=6, temperature=0.0),
    ]
    expected = [_alone(model, s) for s in specs]
    engine = DecodeEngine(model, CPU, slots=3, capacity=8)  # grows past 8; 3 rows for 5 requests
    jobs = [GenerationJob(**s) for s in specs]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(jobs))}
    for i, job in enumerate(jobs):
        job.on_token = streamed[i].append
    waiting, finished, steps = list(jobs), [], 0
    while waiting or engine.active:
        if waiting and engine.free and steps % 2 == 0:  # join every other step, while rows are free
            job = waiting.pop(0)
            if not engine.admit(job):
                finished.append(job)
        finished += engine.step()
        steps += 1
        assert engine.active <= 3
    assert sorted(map(id, finished)) == sorted(map(id, jobs))
    for i, job in enumerate(jobs):
        assert job.output == expected[i], f"request {i}"
        assert streamed[i] == expected[i]
        assert job.finish_reason == "length"


def test_stop_tokens_and_stop_end_a_request_early() -> None:
    model = _model("learned")
    greedy = _alone(model, dict(ids=[3, 1, 4], max_new_tokens=10, temperature=0.0))
    stop = greedy[4]
    first = greedy.index(stop)
    engine = DecodeEngine(model, CPU, slots=2)
    job = GenerationJob(ids=[3, 1, 4], max_new_tokens=10, temperature=0.0, stop_tokens=frozenset({stop}))
    other = GenerationJob(ids=[3, 1, 4], max_new_tokens=10, temperature=0.0)
    other.on_token = lambda t: other.stop() if len(other.output) == 2 else None
    assert engine.admit(job) and engine.admit(other)
    while engine.active:
        engine.step()
    assert job.output == greedy[:first] and job.finish_reason == "stop"  # the stop token is not output
    assert other.output == greedy[:2] and other.finish_reason == "stop"
    # the static batch ends rows the same way
    again = GenerationJob(ids=[3, 1, 4], max_new_tokens=10, temperature=0.0, stop_tokens=frozenset({stop}))
    assert generate_batch(model, [again], CPU) == [greedy[:first]]


def test_engine_refuses_what_cannot_fit() -> None:
    engine = DecodeEngine(_model("learned"), CPU, slots=1)
    with pytest.raises(ValueError, match="exceed the model's context of 32"):
        engine.admit(GenerationJob(ids=[1] * 30, max_new_tokens=5))
    assert engine.admit(GenerationJob(ids=[1], max_new_tokens=4, temperature=0.0))
    with pytest.raises(RuntimeError, match="no free row"):
        engine.admit(GenerationJob(ids=[1], max_new_tokens=4))
