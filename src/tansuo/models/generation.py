"""Decoding several generation requests as one batch: what the server's generation routes run.

Two ways, both giving a request the same tokens as it would get alone (greedy, or sampled with its own seed):

- :func:`generate_batch` (static batching): the requests start together and the batch runs until the
  longest is done. Prompts of different lengths are padded on the left, so every row's next token sits in
  the last column; the padding is masked out of attention and each row's positions start at its first real
  token (``GPT.forward(..., pad=...)``).
- :class:`DecodeEngine` (continuous batching, as vLLM and TGI do): each request has a row of a
  :class:`~tansuo.blocks.SlotKVCache` at its own length. A request joins between two steps (its prompt
  prefilled in one pass into a free row), and leaves as soon as it is done, so a new request never waits for
  a long one to finish and a finished row stops costing compute.

Each row samples with its own settings and random generator and hands each new token to its request as
soon as it exists (streaming). A request ends at its token budget (``finish_reason`` "length"), at one of its
stop tokens (a chat model's end of turn; not part of the output; "stop"), or when :meth:`GenerationJob.stop`
is called from another thread (a stop string seen, the client gone; "stop").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tansuo.models.sampling import sample_logits


@dataclass
class GenerationJob:
    """One request: prompt token ids (at least one) and its sampling settings.

    ``on_token(token_id)`` is called from the decoding thread with each new token, in order; ``output``
    holds them. After decoding, ``finish_reason`` is "length" or "stop".
    """

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None
    on_token: Callable[[int], None] | None = None
    stop_tokens: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)  # the new tokens so far
    finish_reason: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def length(self) -> int:
        """Positions this request needs in the cache: its prompt and its new tokens."""
        return len(self.ids) + self.max_new_tokens

    def stop(self) -> None:
        """Asks the decoder to end this request before its next token (safe from any thread)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def batch_fits(jobs: list[GenerationJob], max_seq_len: int) -> bool:
    """Whether these requests can decode together in :func:`generate_batch`: left padding to the longest
    prompt, plus the most new tokens any of them asks for, must fit the model's context."""
    return max(len(j.ids) for j in jobs) + max(j.max_new_tokens for j in jobs) <= max_seq_len


def _generator(job: GenerationJob, device: torch.device) -> torch.Generator | None:
    return None if job.seed is None else torch.Generator(device=device).manual_seed(job.seed)


def _sample(logits: torch.Tensor, job: GenerationJob, generator: torch.Generator | None) -> int:
    return int(sample_logits(logits, job.temperature, job.top_k, generator, job.top_p))


def _accept(job: GenerationJob, token: int) -> bool:
    """Hands ``token`` to ``job`` unless it ends it; returns whether the job goes on."""
    if job.stopped or token in job.stop_tokens:
        job.finish_reason = "stop"
        return False
    job.output.append(token)
    if job.on_token is not None:
        job.on_token(token)
    if job.stopped:  # on_token saw a stop string
        job.finish_reason = "stop"
        return False
    if len(job.output) >= job.max_new_tokens:
        job.finish_reason = "length"
        return False
    return True


@torch.no_grad()
def generate_batch(model: nn.Module, jobs: list[GenerationJob], device: torch.device) -> list[list[int]]:
    """Decodes every job as one static batch; returns each job's new token ids.

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
    generators = [_generator(j, device) for j in jobs]
    for job in jobs:
        job.output, job.finish_reason = [], None
    cache = model.init_cache(len(jobs), max_seq_len=width + steps)
    logits = model.forward_head(model.forward_features(idx.to(device), cache, pad)[:, -1])  # (B, V)
    live = [True] * len(jobs)
    for _ in range(steps):
        tokens = [_sample(logits[r : r + 1], j, generators[r]) if live[r] else 0 for r, j in enumerate(jobs)]
        for r, job in enumerate(jobs):
            if live[r]:
                live[r] = _accept(job, tokens[r])
        if not any(live):
            break
        step_tokens = torch.tensor(tokens, device=device)[:, None]  # (B, 1); finished rows feed a dummy
        logits = model.forward_head(model.forward_features(step_tokens, cache, pad)[:, -1])
    return [job.output for job in jobs]


@dataclass
class _Row:
    job: GenerationJob
    generator: torch.Generator | None
    last: int = 0


class DecodeEngine:
    """Continuous batching over a GPT: up to ``slots`` requests decode together, each joining and leaving
    between steps. Not thread-safe: one thread (the server's worker) calls :meth:`admit` and :meth:`step`.

    Args:
        model: A decoder with ``init_slot_cache``, ``forward_features`` and ``forward_head`` (``GPT``).
        device: Where it runs.
        slots: Most requests decoding at once (rows of the cache).
        capacity: Positions each row holds at first; the cache grows (doubling, up to the model's context)
            when a longer request joins.
    """

    def __init__(self, model: nn.Module, device: torch.device, slots: int = 16, capacity: int = 256) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model, self.device, self.slots = model, device, slots
        self.max_seq_len: int = model.config.max_seq_len
        self._capacity = min(capacity, self.max_seq_len)
        self._cache: list | None = None
        self.rows: list[_Row] = []  # row i of the cache is self.rows[i]

    @property
    def active(self) -> int:
        """Requests decoding now."""
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    def check(self, job: GenerationJob) -> None:
        """Raises ValueError if ``job`` can never run here (no prompt, or more than the context)."""
        if not job.ids:
            raise ValueError("every prompt needs at least one token")
        if job.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
        if job.length > self.max_seq_len:
            raise ValueError(
                f"{len(job.ids)} prompt tokens + {job.max_new_tokens} new ones exceed the model's context of "
                f"{self.max_seq_len} tokens"
            )

    @torch.no_grad()
    def admit(self, job: GenerationJob) -> bool:
        """Prefills ``job``'s prompt into a free row in one pass and samples its first token; returns
        whether it goes on decoding (False: it finished at once). Needs a free row (``free > 0``)."""
        self.check(job)
        if not self.free:
            raise RuntimeError("no free row: admit a request after one has finished")
        self.model.eval()
        cache = self._cache_for(job.length)
        r = len(self.rows)
        prompt = torch.tensor([job.ids], dtype=torch.long, device=self.device)
        views = [layer.row(r) for layer in cache]
        logits = self.model.forward_head(self.model.forward_features(prompt, views)[:, -1])  # (1, V)
        for layer in cache:
            layer.set(r, len(job.ids))
        job.output, job.finish_reason = [], None
        row = _Row(job, _generator(job, self.device))
        row.last = _sample(logits, job, row.generator)
        if not _accept(job, row.last):
            return False
        self.rows.append(row)
        return True

    @torch.no_grad()
    def step(self) -> list[GenerationJob]:
        """One new token for every active request; returns the requests that finished (and left)."""
        if not self.rows:
            return []
        assert self._cache is not None
        n = len(self.rows)
        for layer in self._cache:
            layer.rows = n
        tokens = torch.tensor([[row.last] for row in self.rows], device=self.device)  # (n, 1)
        logits = self.model.forward_head(self.model.forward_features(tokens, self._cache)[:, -1])  # (n, V)
        finished = []
        for i, row in enumerate(self.rows):
            row.last = _sample(logits[i : i + 1], row.job, row.generator)
            if not _accept(row.job, row.last):
                finished.append(i)
        jobs = [self.rows[i].job for i in finished]
        for i in reversed(finished):  # the last row moves into the freed one: rows stay [0, n)
            last = len(self.rows) - 1
            if i != last:
                for layer in self._cache:
                    layer.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        return jobs

    def cancel_all(self) -> list[GenerationJob]:
        """Drops every active request (after a failed step); returns them."""
        jobs = [row.job for row in self.rows]
        self.rows.clear()
        return jobs

    def _cache_for(self, length: int) -> list:
        capacity = self._capacity
        while capacity < length:
            capacity = min(2 * capacity, self.max_seq_len)
        self._capacity = capacity
        if self._cache is None:
            self._cache = self.model.init_slot_cache(self.slots, capacity, device=self.device)
        for layer in self._cache:
            layer.rows = len(self.rows)
            layer.grow(capacity)
        return self._cache
