"""Training on several processes: the process group, DDP or FSDP2, and the run's state gathered to rank 0
(``launch.py`` starts the processes). The trainer stays one loop; everything that differs between one process
and many is here.

How a run is split (the design the tests pin):

* Every rank builds the same task and model from the same seed (rank 0 first, so it alone prepares the data
  files; the others reuse them).
* Micro-batch ``a`` of optimizer step ``s`` on rank ``r`` of ``W`` is the task's micro-batch number
  ``(s * grad_accum + a) * W + r``: the ranks take interleaved slices of the one stream the task defines as a
  pure function of ``(seed, index)``. So ``W`` ranks x ``batch_size`` x ``grad_accum`` see exactly the
  micro-batches one process sees with ``grad_accum * W``, and a resumed run needs no sampler state.
  The global batch is ``batch_size * W * grad_accum``.
* Gradients are averaged across ranks by DDP (``parallel: ddp``) or reduce-scattered by FSDP2's
  ``fully_shard`` (``parallel: fsdp``: parameters, gradients and optimizer state sharded; each
  ``TransformerStack`` layer is its own unit, the rest is the root). Both wrap one small module whose forward
  is the task's loss, so a task may call any of its model's methods (``forward_features``, ``mlm_logits``)
  and distillation's projections train beside the model.
* Rank 0 alone writes metrics.jsonl, checkpoints and bundles, evaluates (with FSDP on a full copy of the
  model it keeps) and shows the progress bar; the others wait for its verdict (continue or stop early).
* Checkpoints keep the one-process format (``checkpoint.py``: safetensors + JSON, nothing pickled): rank 0's
  full model and optimizer state (FSDP shards gathered with ``DTensor.full_tensor``) plus every rank's RNG
  state, so a checkpoint from any world size loads in any other. Resuming at the same world size is bit for
  bit; at another world size with the same global batch it continues on the same data, not bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tansuo.errors import RecipeError

log = logging.getLogger(__name__)

PARALLEL_MODES = ("auto", "ddp", "fsdp")


# ----------------------------------------------------------------------------------------------- the group


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 outside a launched run)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """How many processes the launcher started in all (1 outside a launched run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run of several processes, else ``device``."""
    if device.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[None]:
    """Join the process group of a launched run (``WORLD_SIZE`` > 1) for the duration of the block: gloo on
    CPUs; NCCL for CUDA tensors with gloo beside it for the CPU tensors of checkpoints. Outside a launched
    run, or when a group already exists (the caller owns it), it does nothing.

    Args:
        device: The recipe's device (``rank_device`` of it is this rank's).
        timeout_s: How long a rank waits in a collective (for a slow peer, rank 0's evaluation) before the
            run fails.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        yield
        return
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.debug("rank %d of %d joined the %s group", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield
        dist.barrier()  # leave together: no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do (it prepares the data files they then reuse)."""
    if world_size() == 1:
        yield
        return
    if rank() != 0:
        dist.barrier()
    yield
    if rank() == 0:
        dist.barrier()


# ----------------------------------------------------------------------------------------------- training


class _LossModule(nn.Module):
    """The one module DDP and FSDP wrap: its forward is the task's loss on a batch. ``trained`` (the model,
    and distillation's extra modules) is registered, so every parameter the loss reaches is synchronised
    whichever of the model's methods the task calls."""

    def __init__(self, trained: nn.Module, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.trained = trained
        self._loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(batch)


def sharded_grad_scaler(device_type: str, enabled: bool) -> torch.amp.GradScaler:
    """FSDP's gradient scaler (every rank's overflow flags all-reduced before the step), fit for fused and
    foreach AdamW: torch 2.13's flags overflow in a (1,) tensor where those take GradScaler's 0-d one
    ("output with shape [] doesn't match the broadcast shape [1]"), so it is reshaped after unscaling."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    class Scaler(ShardedGradScaler):
        def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
            super().unscale_(optimizer)
            if self._enabled:
                state = self._per_optimizer_states[id(optimizer)]
                found = state["found_inf_per_device"]
                state["found_inf_per_device"] = {d: t.reshape(()) for d, t in found.items()}

    return Scaler(device_type, enabled=enabled)


class Parallel:
    """What the trainer does differently on several processes: how the loss module is wrapped, which
    micro-batches a rank takes, reductions of logged figures, and state gathered to and spread from rank 0.
    With one process every method is the identity, so the trainer has no branches of its own.

    Args:
        mode: ``auto`` (DDP when there are several processes), ``ddp`` or ``fsdp``.
        device: This rank's device.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in PARALLEL_MODES:
            raise RecipeError(f"invalid recipe:\n  train.parallel: must be one of {list(PARALLEL_MODES)}")
        self.world, self.rank, self.device = world_size(), rank(), device
        if mode == "fsdp" and self.world == 1:
            raise RecipeError(
                "invalid recipe:\n  train.parallel: fsdp shards the model over several processes, but this "
                "run has one; launch it with --nproc-per-node N (N > 1), or set train.parallel: auto"
            )
        self.mode = "none" if self.world == 1 else ("ddp" if mode == "auto" else mode)
        self.is_main = self.rank == 0
        self._wrapped: nn.Module | None = None
        self._full_copy: nn.Module | None = None  # FSDP: rank 0's unsharded model for evaluation and bundles

    # ---------------------------------------------------------------- wrapping
    def prepare(
        self,
        trained: nn.Module,
        model: nn.Module,
        loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """Wrap ``trained`` (which holds ``model``) for this mode and return the loss of a micro-batch.

        Call before the optimizer is built: FSDP replaces the parameters by sharded ones.

        Raises:
            RecipeError: FSDP on a model without trainable floating-point parameters.
        """
        module = _LossModule(trained, loss)
        if self.mode == "none":
            return module
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # a task may leave some parameters out of its loss (a pooler an MLM loss never reaches)
            self._wrapped = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
            return self._wrapped
        self._wrapped = self._shard(module, model)
        return self._wrapped

    def _shard(self, module: _LossModule, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from tansuo.blocks.layers import TransformerStack

        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable or not all(p.is_floating_point() for p in module.parameters()):
            raise RecipeError(
                "invalid recipe:\n  train.parallel: fsdp needs a model whose parameters are all floating "
                f"point with some of them trainable ({type(model).__name__} is not); use train.parallel: ddp"
            )
        # the same weights on every rank before each keeps its shard (they are, from one seed: made sure)
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=0)
        if self.is_main:
            self._full_copy = copy.deepcopy(model)
        mesh = init_device_mesh(self.device.type, (self.world,))
        units = 0
        for stack in (m for m in module.modules() if isinstance(m, TransformerStack)):
            for layer in stack.layers:
                fully_shard(layer, mesh=mesh)
                units += 1
        fully_shard(module, mesh=mesh)
        log.info("FSDP: %d layer units and the root, sharded over %d ranks", units, self.world)
        return module

    def sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """Within grad accumulation, reduce gradients only on the ``last`` micro-batch."""
        if self.mode == "ddp" and not last:
            assert self._wrapped is not None
            return self._wrapped.no_sync()
        if self.mode == "fsdp":
            assert self._wrapped is not None
            self._wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def batches(self, task: Any, batch_size: int, step: int, grad_accum: int) -> Iterator[Any]:
        """This rank's training micro-batches from optimizer step ``step`` on: micro-batch number
        ``(step * grad_accum + a) * world + rank`` of the task's stream (see the module docstring)."""
        stream = task.train_batches(batch_size, start=step * grad_accum * self.world)
        return itertools.islice(stream, self.rank, None, self.world)

    # ---------------------------------------------------------------- figures and decisions
    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (after its evaluation: stop early or not). The others wait here
        while rank 0 evaluates and writes."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.broadcast(t, src=0)
        return bool(t.item())

    # ---------------------------------------------------------------- state
    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """fp16's gradient scaler: under FSDP the sharded one, whose overflow check is agreed on by every rank
        (each sees only its shard of the gradients; a rank skipping a step alone would desynchronise them)."""
        if self.mode == "fsdp":
            return sharded_grad_scaler(self.device.type, enabled)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def full_model(self, model: nn.Module) -> nn.Module:
        """A model with all the weights, for rank 0 to evaluate and bundle; every rank must call this (with
        FSDP it gathers the shards). With DDP or one process it is ``model`` itself."""
        if self.mode != "fsdp":
            return model
        full = self.gather(model.state_dict())
        if self._full_copy is None:
            return model
        self._full_copy.load_state_dict(full)
        return self._full_copy

    def gather(self, state: Any) -> Any:
        """``state`` with every sharded tensor made whole on rank 0 (a collective under FSDP; other ranks get
        empty placeholders). Plain tensors are returned as they are."""
        from torch.distributed.tensor import DTensor

        def whole(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, DTensor):
                return t
            full = t.full_tensor()
            return full if self.is_main else full.new_empty(0)

        return _map_tensors(state, whole)

    def rng_states(self) -> list[dict[str, torch.Tensor]] | None:
        """Every rank's RNG state (CPU and this rank's CUDA device), on every rank; None with one process."""
        if self.world == 1:
            return None
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for key, value in mine.items():
            parts = [torch.empty_like(value) for _ in range(self.world)]
            dist.all_gather(parts, value)
            for r, part in enumerate(parts):
                out[r][key] = part
        return out

    def set_rng(self, saved: list[dict[str, torch.Tensor]] | None, seed: int) -> bool:
        """Restore this rank's RNG from a checkpoint's per-rank states; returns False (and seeds afresh) when
        the checkpoint has none for this rank (another world size)."""
        if self.world == 1:
            return True
        if saved is not None and len(saved) == self.world:
            torch.set_rng_state(saved[self.rank]["cpu"])
            if "cuda" in saved[self.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved[self.rank]["cuda"], self.device)
            return True
        self.seed_rank(seed)
        return False

    def seed_rank(self, seed: int) -> None:
        """Give ranks other than 0 their own random stream (dropout), derived from the run's seed; rank 0
        keeps the stream a one-process run has."""
        if self.rank:
            torch.manual_seed(seed * 1_000_003 + self.rank * 7_919 + 104_729)

    def spread(self, state: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's checkpoint ``state`` on every rank: the JSON skeleton and tensor shapes go first, then
        each tensor is broadcast (no rank but 0 reads the file, so nodes need no shared disk)."""
        if self.world == 1:
            assert state is not None
            return state
        from tansuo.train.checkpoint import flatten_state, unflatten_state

        tensors: dict[str, torch.Tensor] = {}
        header: list[Any] = [None]
        if self.is_main:
            skeleton = flatten_state(state, "s", tensors)
            header = [(skeleton, [(k, tuple(t.shape), str(t.dtype)) for k, t in tensors.items()])]
        dist.broadcast_object_list(header, src=0)  # JSON values and shapes only
        skeleton, shapes = header[0]
        for name, shape, dtype in shapes:
            t = tensors[name] if self.is_main else torch.empty(shape, dtype=getattr(torch, dtype[6:]))
            dist.broadcast(t, src=0)
            tensors[name] = t
        return unflatten_state(skeleton, tensors)

    def load_model(self, module: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Load a full (one-process) state dict into ``module``, sharding it under FSDP."""
        module.load_state_dict(self._localize(module.state_dict(), full))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
        """Load a full (one-process) optimizer state, each moment tensor sharded like its parameter."""
        if self.mode == "fsdp":
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {}
            for index, values in full["state"].items():
                p = params[int(index)]
                state[index] = {
                    k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and k != "step" and v.shape == p.shape
                    else v
                    for k, v in values.items()
                }
            full = {**full, "state": state}
        optimizer.load_state_dict(full)

    def _localize(self, local: dict[str, Any], full: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.mode != "fsdp":
            return full
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = dict(full)
        for name, current in local.items():
            if isinstance(current, DTensor) and name in full:
                value = full[name].to(current.device)
                out[name] = distribute_tensor(
                    value, current.device_mesh, current.placements, src_data_rank=None
                )
        return out


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [_map_tensors(v, fn) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj
