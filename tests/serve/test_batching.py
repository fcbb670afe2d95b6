"""Micro-batching: concurrent requests share model calls, and each gets exactly its own answers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tansuo.errors import DataError
from tansuo.serve.batching import Batcher, BusyError


class Recorder:
    """A batch function that doubles numbers, records every batch, and fails on negative numbers."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.entered = threading.Event()  # set once the worker is inside the first call

    async def wait_entered(self) -> None:
        await asyncio.to_thread(self.entered.wait, 5)
        await asyncio.sleep(0)

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise DataError(f"negative input in {items}")
        return [2 * i for i in items]


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, max_batch=8, max_wait_ms=50)
    batcher.start()

    async def main():
        first = asyncio.ensure_future(batcher.submit([100]))  # runs alone, held at the gate
        await fn.wait_entered()
        rest = [
            asyncio.ensure_future(batcher.submit([10 * r + i for i in range(r % 3 + 1)])) for r in range(6)
        ]
        await asyncio.sleep(0)  # every request above is queued
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = _run(main())
    batcher.stop()
    assert first == [200]
    for r, answer in enumerate(rest):
        assert answer == [2 * (10 * r + i) for i in range(r % 3 + 1)]
    assert fn.batches[0] == [100]
    assert all(len(b) <= 8 for b in fn.batches)
    assert len(fn.batches) < 7  # the six waiting requests shared model calls
    assert sorted(x for b in fn.batches[1:] for x in b) == sorted(
        10 * r + i for r in range(6) for i in range(r % 3 + 1)
    )


def test_batching_off_runs_every_request_alone() -> None:
    fn = Recorder()
    batcher = Batcher(fn, max_batch=1, max_wait_ms=20)
    batcher.start()

    async def main():
        return await asyncio.gather(*(batcher.submit([i]) for i in range(5)))

    assert _run(main()) == [[2 * i] for i in range(5)]
    batcher.stop()
    assert all(len(b) == 1 for b in fn.batches)


def test_a_bad_request_fails_alone() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, max_batch=16, max_wait_ms=50)
    batcher.start()

    async def main():
        blocker = asyncio.ensure_future(batcher.submit([0]))
        await fn.wait_entered()
        good = asyncio.ensure_future(batcher.submit([1, 2]))
        bad = asyncio.ensure_future(batcher.submit([3, -1]))
        other = asyncio.ensure_future(batcher.submit([4]))
        await asyncio.sleep(0)  # every request above is queued
        gate.set()
        await blocker
        return await good, await asyncio.gather(bad, return_exceptions=True), await other

    good, (bad,), other = _run(main())
    batcher.stop()
    assert good == [2, 4] and other == [8]
    assert isinstance(bad, DataError) and "negative" in str(bad)
    assert [1, 2, 3, -1, 4] in fn.batches  # tried together first, then each alone


def test_fits_rule_and_oversized_requests() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    # at most 10 in total of the numbers in one batch
    batcher = Batcher(fn, max_batch=4, max_wait_ms=50, fits=lambda items, more: sum(items) + sum(more) <= 10)
    batcher.start()

    async def main():
        blocker = asyncio.ensure_future(batcher.submit([0]))
        await fn.wait_entered()
        jobs = [asyncio.ensure_future(batcher.submit(x)) for x in ([4], [5], [3], [1, 1, 1, 1, 1, 1])]
        await asyncio.sleep(0)  # every request above is queued
        gate.set()
        await blocker
        return await asyncio.gather(*jobs)

    answers = _run(main())
    batcher.stop()
    assert answers == [[8], [10], [6], [2] * 6]
    assert all(sum(b) <= 10 for b in fn.batches if len(b) <= 4)
    assert [1] * 6 in fn.batches  # larger than max_batch: runs alone


def test_a_full_queue_refuses_and_timed_out_requests_are_skipped() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, max_batch=1, max_wait_ms=0, max_queue=2)
    batcher.start()

    async def main():
        blocker = asyncio.ensure_future(batcher.submit([1]))
        await fn.wait_entered()  # the worker holds [1] at the gate; the queue is empty again
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit([2]), 0.01)
        queued = asyncio.ensure_future(batcher.submit([3]))
        await asyncio.sleep(0)
        with pytest.raises(BusyError):
            await batcher.submit([4])
        gate.set()
        return await blocker, await queued

    assert _run(main()) == ([2], [6])
    batcher.stop()
    assert [2] not in fn.batches  # its caller had given up


def test_a_request_whose_prefill_fails_fails_at_once_and_alone() -> None:
    """A NaN temperature makes sampling raise while the request is admitted: it fails right away (not at
    its timeout) and a request decoding beside it still finishes."""
    import torch

    from tansuo.models import create_model
    from tansuo.models.generation import DecodeEngine, GenerationJob
    from tansuo.serve.batching import ContinuousBatcher

    torch.manual_seed(0)
    model = create_model("gpt_test", vocab_size=16).eval()
    batcher = ContinuousBatcher(DecodeEngine(model, torch.device("cpu"), slots=2))
    batcher.start()

    async def both():
        good = GenerationJob(ids=[1, 2], max_new_tokens=6, temperature=0.0)
        bad = GenerationJob(ids=[3], max_new_tokens=6, temperature=float("nan"))
        return await asyncio.gather(batcher.submit([good]), batcher.submit([bad]), return_exceptions=True)

    try:
        done, failed = _run(asyncio.wait_for(both(), timeout=60))  # before the fix: never answered
        assert isinstance(failed, RuntimeError) and len(done[0].output) == 6
    finally:
        batcher.stop()


def test_a_tiny_temperature_decodes_greedily() -> None:
    import torch

    from tansuo.models.sampling import sample_logits

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    assert sample_logits(logits, 6.4e-69).flatten().tolist() == [1, 0]
    assert sample_logits(logits, 0.0).flatten().tolist() == [1, 0]
