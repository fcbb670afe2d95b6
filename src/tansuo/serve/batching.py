"""Micro-batching: requests that arrive close together run as one model call, on one worker thread.

Each request submits a list of items and awaits their results. The worker takes the oldest waiting request,
then (under concurrent load: the last batch held several requests, or more are waiting) keeps taking
requests for up to ``max_wait_ms`` while the batch holds fewer than ``max_batch`` items
(and, when a ``fits`` rule is given, while the next request fits with the others), runs the batch function on
all items at once and hands each request back exactly its own slice of the results, in order. A request
larger than ``max_batch`` runs alone. If a batch fails, each of its requests is run again alone, so one
request's bad input cannot fail another's. Requests whose caller stopped waiting (a timeout) are skipped.

The model is only ever touched from the worker thread, so the event loop stays free to accept requests
while a batch runs.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tansuo.errors import TansuoError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    items: list[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)


def _resolve(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():  # the caller gave up (timeout) or went away
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(settle)


class BusyError(RuntimeError):
    """The queue of waiting requests is full; the client should retry later."""


class _Worker(abc.ABC):
    """What both batchers share: a queue of waiting requests (bounded) and one worker thread that alone
    touches the model. Subclasses implement ``_work``."""

    def __init__(self, max_queue: int, name: str) -> None:
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._started = False

    @abc.abstractmethod
    def _work(self) -> None:
        """The worker thread's loop; returns when it takes None from the queue."""

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Lets the worker finish what it runs, then ends it; waiting requests are dropped."""
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout)

    def _enqueue(self, items: list[Any]) -> _Job:
        """Queues a request of ``items``; its future gets the results. Raises :class:`BusyError` if full."""
        loop = asyncio.get_running_loop()
        job = _Job(list(items), loop.create_future(), loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise BusyError(f"{self._queue.maxsize} requests are already waiting; retry shortly") from None
        return job


class Batcher(_Worker):
    """Runs ``fn(items) -> results`` (one result per item, same order) on batches of concurrent requests.

    Args:
        fn: The batch function; called only from the worker thread.
        max_batch: Most items in one call (1 turns batching off: every request runs alone).
        max_wait_ms: How long the worker waits for more requests once one is waiting.
        fits: Optional rule ``fits(items_so_far, next_items) -> bool`` for whether a request may join a batch
            (generation uses it to keep a batch within the model's context).
        on_batch: Called with the number of items of every batch run (metrics).
        max_queue: Most requests waiting; more are refused with :class:`BusyError`.
        name: Names the worker thread.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], list[Any]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        fits: Callable[[list[Any], list[Any]], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
        max_queue: int = 4096,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.fits = fits
        self.on_batch = on_batch
        self._carry: _Job | None = None  # a request that did not fit the last batch: it starts the next
        self._last_jobs = 0  # requests in the last batch
        super().__init__(max_queue, name)

    async def submit(self, items: list[Any]) -> list[Any]:
        """Queues ``items`` and waits for their results (raises what the batch function raised for them)."""
        if not items:
            return []
        return await self._enqueue(items).future

    # ------------------------------------------------------------------ worker
    def _next(self, timeout: float | None) -> _Job | None | bool:
        """The next live job; None means stop; False means none arrived within ``timeout``."""
        while True:
            if self._carry is not None:
                job, self._carry = self._carry, None
            else:
                try:
                    job = self._queue.get(timeout=None if timeout is None else max(timeout, 0.0))
                except queue.Empty:
                    return False
            if job is None or not job.future.done():
                return job

    def _work(self) -> None:
        while True:
            first = self._next(None)
            if first is None or first is False:
                return
            jobs, items = [first], list(first.items)
            # Wait for more only under concurrent load (the last batch held several requests, or more are
            # queued): a lone client never pays max_wait, a busy server still fills its batches.
            concurrent = self._last_jobs > 1 or self._carry is not None or not self._queue.empty()
            deadline = time.perf_counter() + (self.max_wait if concurrent else 0.0)
            stop = False
            while len(items) < self.max_batch:
                nxt = self._next(deadline - time.perf_counter())
                if nxt is False:
                    break
                if nxt is None:
                    stop = True
                    break
                if len(items) + len(nxt.items) > self.max_batch or (
                    self.fits is not None and not self.fits(items, nxt.items)
                ):
                    self._carry = nxt
                    break
                jobs.append(nxt)
                items += nxt.items
            self._last_jobs = len(jobs)
            self._run(jobs, items)
            if stop:
                return

    def _run(self, jobs: list[_Job], items: list[Any]) -> None:
        try:
            results = self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function gave {len(results)} results for {len(items)} items")
        except Exception as error:
            if len(jobs) > 1:  # find whose input failed: run each request alone
                for job in jobs:
                    self._run([job], list(job.items))
                return
            if not isinstance(error, TansuoError):
                log.exception("batch of %d items failed", len(items))
            _resolve(jobs[0], error=error)
            return
        if self.on_batch is not None:
            self.on_batch(len(items))
        start = 0
        for job in jobs:
            _resolve(job, results[start : start + len(job.items)])
            start += len(job.items)


class ContinuousBatcher(_Worker):
    """Continuous batching for generation: the worker keeps a :class:`~tansuo.models.generation.DecodeEngine`
    stepping; between two steps it admits waiting requests into free rows (each prompt prefilled in one
    pass), and a request is answered as soon as its own tokens are done, whatever the others still decode.

    Same interface as :class:`Batcher` (``submit``, ``start``, ``stop``); items are
    :class:`~tansuo.models.generation.GenerationJob` and each result is the job itself (``output`` holds
    its new tokens, ``finish_reason`` why it ended). A request whose caller stopped waiting (a timeout, a
    client gone) has its jobs stopped before their next token.

    Args:
        engine: The decoder; touched only from the worker thread.
        on_step: Called with the rows decoded in each step (metrics: batch size, one token per row).
        on_admit: Called when a request's prompt has been prefilled (and its first token made).
        max_queue: Most requests waiting; more are refused with :class:`BusyError`.
        name: Names the worker thread.
    """

    def __init__(
        self,
        engine: Any,
        *,
        on_step: Callable[[int], None] | None = None,
        on_admit: Callable[[], None] | None = None,
        max_queue: int = 4096,
        name: str = "tansuo-decode",
    ) -> None:
        self.engine = engine
        self.on_step, self.on_admit = on_step, on_admit
        self._waiting: list[tuple[_Job, Any]] = []  # admitted requests' jobs not yet in a row
        self._owner: dict[int, _Job] = {}  # id(job) -> its request, while it decodes
        self._left: dict[int, int] = {}  # id(request) -> its jobs not yet finished
        super().__init__(max_queue, name)

    async def submit(self, items: list[Any]) -> list[Any]:
        """Queues the jobs and waits until every one has finished; returns them."""
        if not items:
            return []
        job = self._enqueue(items)
        try:
            return await job.future
        except asyncio.CancelledError:  # the caller timed out or went away: stop decoding for it
            for item in job.items:
                item.stop()
            raise

    # ------------------------------------------------------------------ worker
    def _take(self, block: bool) -> bool:
        """Moves arrived requests into the waiting list; False once told to stop."""
        while True:
            try:
                request = self._queue.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            block = False
            self._left[id(request)] = len(request.items)
            self._waiting += [(request, item) for item in request.items]

    def _work(self) -> None:
        engine = self.engine
        while True:
            if not self._take(block=not engine.active and not self._waiting):
                return
            try:
                while self._waiting and engine.free:
                    request, item = self._waiting.pop(0)
                    if request.future.done():  # gave up while waiting: never decoded
                        item.finish_reason = "stop"
                        self._finish(request, item)
                        continue
                    self._admit(request, item)
                if engine.active:
                    rows = engine.active
                    finished = engine.step()
                    if self.on_step is not None:
                        self.on_step(rows)
                    for item in finished:
                        self._finish(self._owner.pop(id(item)), item)
            except Exception as error:  # a failed step fails the requests decoding in it, not the server
                log.exception("decoding step failed")
                for item in engine.cancel_all():
                    self._fail(self._owner.pop(id(item)), error)

    def _admit(self, request: _Job, item: Any) -> None:
        try:
            going = self.engine.admit(item)
        except ValueError as error:  # this request cannot run (its prompt does not fit)
            self._fail(request, error)
            return
        except Exception as error:  # its prefill failed: fail it now, not at its timeout; the others go on
            log.exception("admitting a request failed")
            self._fail(request, error)
            return
        if self.on_admit is not None:
            self.on_admit()
        if going:
            self._owner[id(item)] = request
        else:
            self._finish(request, item)

    def _finish(self, request: _Job, item: Any) -> None:
        left = self._left.get(id(request))
        if left is None:  # already failed
            return
        if left == 1:
            del self._left[id(request)]
            _resolve(request, list(request.items))
        else:
            self._left[id(request)] = left - 1

    def _fail(self, request: _Job, error: BaseException) -> None:
        if self._left.pop(id(request), None) is None:
            return
        for item in request.items:
            item.stop()  # its other jobs end at their next step
        _resolve(request, error=error)
