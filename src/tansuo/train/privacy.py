"""Differentially private training (``train.privacy``): DP-SGD on Opacus' optimizer and accountants.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") makes each step private: the batch is
a Poisson sample of the training split, every example's gradient is clipped to ``max_grad_norm``, Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to their sum, which is divided by
the expected batch size. The noise multiplier is calibrated before training (Opacus' ``get_noise_multiplier``)
so that the run's planned steps at sampling rate ``q = batch_size / examples`` spend ``target_epsilon`` at
``delta``; the accountant (PRV, Gopi et al. 2021, or RDP, Mironov 2017) counts each step as it is taken, and
``epsilon()`` is what has been spent so far (logged with the loss, written into each bundle's metrics.json).

How it fits the project's loop:

- **Poisson sampling as a pure function of the step.** Batches are a pure function of ``(seed, step)`` in
  this project (resume needs no sampler state). Step ``n`` draws one Bernoulli(q) mask over the training
  split from a generator seeded by ``(seed, n)``: every example is in or out of every step independently,
  which is the sampling the accountant's amplification assumes, and the batch's size varies (expected
  ``batch_size``) as in Opacus' ``DPDataLoader``. What the analysis also assumes is that the adversary does
  not know the sampling randomness: keep the recipe's seed private for a release (its default is public).
- **Per-example gradients: Opacus' hooks where they apply, torch.func where they do not.** When every
  module that holds a trainable parameter has an Opacus grad sampler (Linear, LayerNorm, RMSNorm,
  Embedding, GroupNorm, convolutions, and the project's :class:`~tansuo.adapters.lora.LoRALinear`,
  registered here), Opacus' hooks (``GradSampleHooks``) compute them from one ordinary batched forward and
  backward: the frozen part of a model (a LoRA-tuned encoder, a frozen backbone under a linear probe) costs
  what it costs without privacy. Otherwise ``vmap`` of ``grad`` of the task's own loss on a batch of one
  differentiates the whole forward per example, whatever its layers: the hooks cannot give some of the
  project's blocks theirs (``LearnedPositions`` returns its table without a batch dimension, added to every
  example by broadcasting; ViT's class token is a bare parameter of the model). Attention runs on SDPA's
  math kernel under ``vmap`` (the CPU flash kernel has no batching rule). Both ways give the same gradients
  (tested); the hooks rely on the :data:`~tansuo.tasks.base.EXAMPLES` contract that a task's loss is the
  mean of its examples' losses. Examples are taken in chunks of at most ``2**27`` per-example gradient
  values (512 MB), each chunk clipped into Opacus' running sum. With ``grad_sample_mode: ghost``
  (``dp_ghost.py``) no per-example gradient is built: each example's norm comes from Opacus' ghost norms and
  a second backward of the examples' losses, weighted by their clipping factors, gives each chunk's clipped
  sum (chunks of ``GHOST_CHUNK`` examples; 1.55x the hooks' speed for MiniLM's whole body on SST-2 here).
- **Clipping, noise, accounting: Opacus.** ``DPOptimizer`` clips and noises the per-example gradients put in
  ``p.grad_sample``; its step hook steps the accountant. The noise comes from torch's global generator,
  which the checkpoint keeps, so a resumed run is the run it would have been; the accountant's history
  (noise multiplier, sampling rate, steps) is checkpointed as JSON.

Refused, each with a :class:`~tansuo.errors.RecipeError` saying why: tasks that cannot address single
examples (no :data:`~tansuo.tasks.base.EXAMPLES` ability: lm, mlm, translate and recommend cut or pack their
data into windows, so an example is not a record); tasks that compute something from the training examples
outside training (``task.training_statistics``: image inputs normalised with the training split's mean and
std instead of public ``data.mean`` / ``data.std``, a tokenizer trained on the training texts), which the
accountant's epsilon would not cover; models with layers that mix the examples of a batch
(BatchNorm: the ResNet unless built with ``norm: group``; Opacus' ``ModuleValidator`` judges); several
processes; and in the recipe (``recipe.py``) grad_accum, fp16, compile and activation checkpointing. EMA is
allowed (an average of private weights is post-processing, as private as they are).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from tansuo.errors import RecipeError, TansuoError
from tansuo.recipe import PrivacySettings
from tansuo.tasks.base import EXAMPLES, Batch, Task, batch_seed
from tansuo.train.dp_ghost import ghost_clipped_sums
from tansuo.train.optim import under

log = logging.getLogger(__name__)

#: per-example gradient values held at once (chunks of examples keep under it)
GRADIENT_BUDGET = 2**27
#: examples per chunk under ghost clipping, which holds activations for a second backward, not gradients
GHOST_CHUNK = 256
#: texts per chunk at most: a Poisson batch of texts is sorted by length and each chunk padded to its own
#: longest, so a few long texts do not make every text cost as much as they do
TEXT_CHUNK = 64


class _Bound:
    """``model`` called with the parameters and buffers in ``state`` (``torch.func.functional_call``); other
    attributes (``model.config``) are the model's."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._model, self._state = model, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._model, self._state, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def per_example_gradients(
    model: nn.Module, loss_fn: Any, batch: Batch
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradient of ``loss_fn(model, example)`` for every example of ``batch`` on its own, for the
    trainable parameters: ``({name: (B, *shape)}, losses (B,))``.

    ``loss_fn(model, batch)`` is a task's mean loss; it is called on each example as a batch of one.
    Dropout draws differently for each example (``randomness="different"``).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(model.named_buffers())

    def one(trainable: dict[str, torch.Tensor], example: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        single = {k: v.unsqueeze(0) for k, v in example.items()}  # a batch of one
        loss = loss_fn(_Bound(model, {**fixed, **trainable}), single)
        return loss, loss.detach()

    run = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0), randomness="different")
    with sdpa_kernel(SDPBackend.MATH):
        return run(params, batch)


def _lora_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler for :class:`~tansuo.adapters.lora.LoRALinear` (adapter without dropout): with
    input ``x`` and output gradient ``g`` of each example, ``y = x W^T + s x A^T B^T`` gives
    ``dA = s (g B)^T x`` and ``dB = s g^T (x A^T)``, summed over the example's positions."""
    x = activations[0].to(backprops.dtype)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.lora_A.requires_grad:
        gb = torch.einsum("n...o,or->n...r", backprops, layer.lora_B)
        out[layer.lora_A] = torch.einsum("n...r,n...i->nri", gb, x) * layer.scale
    if layer.lora_B.requires_grad:
        xa = torch.einsum("n...i,ri->n...r", x, layer.lora_A)
        out[layer.lora_B] = torch.einsum("n...o,n...r->nor", backprops, xa) * layer.scale
    return out


def hooks_apply(model: nn.Module) -> bool:
    """Whether Opacus' hooks can give every trainable parameter of ``model`` its per-example gradient: each
    module holding one directly has a grad sampler (LoRA adapters only without dropout, whose mask the
    sampler cannot replay)."""
    from opacus.grad_sample import GradSampleModule, register_grad_sampler

    from tansuo.adapters.lora import LoRALinear

    if LoRALinear not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(LoRALinear)(_lora_grad_sample)
    for m in model.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        if type(m) not in GradSampleModule.GRAD_SAMPLERS:
            return False
        if isinstance(m, LoRALinear) and not isinstance(m.dropout, nn.Identity):
            return False
    return True


def hooked_gradients(
    model: nn.Module,
    loss_fn: Any,
    batch: Batch,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What :func:`per_example_gradients` gives, from one batched forward (under ``autocast()``) and
    backward with Opacus' hooks (only where :func:`hooks_apply`): ``({name: (B, *shape)}, the batch's summed
    loss)``. ``loss_fn`` must be the mean of the examples' losses (the hooks scale by the batch size).
    ``p.grad`` is written too (the DPOptimizer replaces it)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        with autocast():
            loss = loss_fn(model, batch)
        with warnings.catch_warnings():  # a first trained layer's input needs no gradient: as it should be
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            loss.backward()
    finally:
        hooks.remove_hooks()
    n = len(next(iter(batch.values())))
    grads = {  # a parameter the loss does not reach (an unused head) gets zeros, as under vmap
        name: torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
        if p.grad_sample is None
        else p.grad_sample
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return grads, loss.detach() * n


def check_private(task: Task, model: nn.Module, world_size: int) -> None:
    """Refuse what DP-SGD cannot train, naming the task or model and why.

    Raises:
        RecipeError: The task has no single examples, the model mixes examples, or several processes.
    """
    if EXAMPLES not in getattr(task, "abilities", frozenset()):
        raise RecipeError(
            f"train.privacy: the {task.name!r} task cannot address single examples (its data are cut or "
            "packed into windows), so DP-SGD has nothing to sample and clip per example; it works with the "
            "image and classify tasks"
        )
    leak = getattr(task, "training_statistics", None)
    if leak:
        raise RecipeError(
            f"train.privacy: the {task.name!r} task computes something from the training examples outside "
            f"DP-SGD, which its epsilon would not cover: {leak}"
        )
    if world_size > 1:
        raise RecipeError(
            "train.privacy trains on one process: the Poisson batch and its noise are drawn once per step; "
            "run it without --nproc-per-node / torchrun"
        )
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        name = getattr(model, "model_name", type(model).__name__)
        mixing = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        more = " ..." if len(mixing) > 4 else ""
        where = f" (BatchNorm in {', '.join(mixing[:4])}{more})" if mixing else ""
        reasons = sorted({str(e).split(". ")[0] for e in errors})
        raise RecipeError(
            f"train.privacy: model {name} ({type(model).__name__}) cannot be trained with differential "
            f"privacy{where}: {'; '.join(reasons)}. Opacus' ModuleValidator refuses it; use a model with "
            "LayerNorm or GroupNorm instead (the ViT, or the ResNet with --set model.overrides.norm=group)"
        )


class DPSGD:
    """DP-SGD for one run: the calibrated noise, the Poisson batches, per-example gradients, the accountant.

    Args:
        task: a task with the :data:`~tansuo.tasks.base.EXAMPLES` ability.
        model: the model being trained (checked by :func:`check_private`).
        settings: the recipe's ``train.privacy``.
        batch_size: the expected batch size (``train.batch_size``).
        total_steps: the steps the run plans; the noise is calibrated to spend the budget over them.
        seed: the run's seed (the Poisson masks are drawn from it and the step).
        world_size: processes in the run (more than one is refused).

    Raises:
        RecipeError: See :func:`check_private`; or the batch is not smaller than the training split.
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        settings: PrivacySettings,
        *,
        batch_size: int,
        total_steps: int,
        seed: int,
        world_size: int = 1,
    ) -> None:
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier

        check_private(task, model, world_size)
        self.task, self.model, self.settings, self.seed = task, model, settings, seed
        self.examples = task.split_size("train")  # type: ignore[attr-defined]
        if batch_size >= self.examples:
            raise RecipeError(
                f"train.privacy: train.batch_size ({batch_size}) must be smaller than the training split "
                f"({self.examples} examples): each step samples every example with probability "
                "batch_size / examples"
            )
        self.batch_size, self.total_steps = batch_size, total_steps
        self.sample_rate = batch_size / self.examples
        if settings.delta >= 1 / self.examples:
            log.warning(
                "train.privacy.delta %.3g is not below 1 / %d training examples: a mechanism that publishes "
                "one example at random meets it; use a smaller delta",
                settings.delta,
                self.examples,
            )
        self.noise_multiplier = get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=settings.delta,
            sample_rate=self.sample_rate,
            steps=total_steps,
            accountant=settings.accountant,
        )
        self.accountant = create_accountant(settings.accountant)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.chunk = max(1, GRADIENT_BUDGET // max(1, trainable))
        self.hooks = hooks_apply(model)
        self.ghost = settings.grad_sample_mode == "ghost"
        if self.ghost and not self.hooks:
            raise RecipeError(
                "train.privacy.grad_sample_mode ghost needs Opacus' hooks on every trained layer, and this "
                f"model ({type(model).__name__}) has trained parameters outside them; use "
                "grad_sample_mode auto"
            )
        if self.ghost:  # no per-example gradients held: chunks as large as the activations allow
            self.chunk = GHOST_CHUNK
        self._ghost: tuple[dict[str, int], list[float]] = ({}, [])  # set by wrap()
        how = {
            "ghost": "per-example gradient norms by ghost clipping (two backward passes)",
            "hooks": "per-example gradients from Opacus' hooks (one batched backward)",
            "vmap": "per-example gradients with torch.func.vmap",
        }
        log.info("DP-SGD: %s", how["ghost" if self.ghost else "hooks" if self.hooks else "vmap"])
        self._spent: tuple[int, float] | None = None  # (steps, epsilon) last computed
        log.info(
            "DP-SGD: noise multiplier %.4f for epsilon %g at delta %g over %d steps at sampling rate %.5f "
            "(%s accountant), per-example clipping (%s) to %g",
            self.noise_multiplier,
            settings.target_epsilon,
            settings.delta,
            total_steps,
            self.sample_rate,
            settings.accountant,
            f"groups {settings.group_norms}, the rest" if settings.group_norms else settings.clipping,
            settings.max_grad_norm,
        )

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Opacus' ``DPOptimizer`` around ``optimizer``: it clips and noises ``p.grad_sample`` before each
        step, and steps the accountant."""
        from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

        kwargs = dict(
            noise_multiplier=self.noise_multiplier, expected_batch_size=self.batch_size, loss_reduction="mean"
        )
        if self.settings.group_norms:
            from tansuo.train.dp_groups import GroupClippingOptimizer

            groups, norms = self._groups(optimizer)
            self.optimizer = GroupClippingOptimizer(optimizer, groups=groups, norms=norms, **kwargs)
        elif self.settings.clipping == "per_layer":  # the same total norm, split evenly over the tensors
            k = sum(1 for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
            norms = [self.settings.max_grad_norm / math.sqrt(k)] * k
            self.optimizer = DPPerLayerOptimizer(optimizer, max_grad_norm=norms, **kwargs)
        else:
            self.optimizer = DPOptimizer(optimizer, max_grad_norm=self.settings.max_grad_norm, **kwargs)
        if self.ghost:  # each trained parameter's clipping group and each group's norm
            names = {id(p): n for n, p in self.model.named_parameters()}
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            groups, norms = (
                self._groups(optimizer)
                if self.settings.group_norms
                else ([0] * len(params), [self.settings.max_grad_norm])
            )
            self._ghost = ({names[id(p)]: g for p, g in zip(params, groups, strict=True)}, norms)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.sample_rate))
        return self.optimizer

    def _groups(self, optimizer: torch.optim.Optimizer) -> tuple[list[int], list[float]]:
        """Each trained parameter's group index (in the optimizer's order) and each group's norm: one group
        per ``group_norms`` prefix, then the rest at ``max_grad_norm`` (if any parameter is left)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        prefixes = list(self.settings.group_norms)

        def group(name: str) -> int:
            hits = [i for i, k in enumerate(prefixes) if under(name, k)]
            return hits[0] if hits else len(prefixes)

        index = [group(names[id(p)]) for p in params]
        empty = [k for i, k in enumerate(prefixes) if i not in index]
        if empty:
            trained = sorted({names[id(p)].split(".")[0] for p in params})
            raise RecipeError(
                f"train.privacy.group_norms: no trained parameter's name starts with {', '.join(empty)}; "
                f"the trained parameters are under {', '.join(trained)}"
            )
        norms = [self.settings.group_norms[k] for k in prefixes]
        if len(prefixes) in index:
            norms.append(self.settings.max_grad_norm)
        return index, norms

    def sample(self, step: int) -> torch.Tensor:
        """Indices of the training examples in step ``step``'s batch: each one with probability ``q``."""
        g = torch.Generator().manual_seed(batch_seed(self.seed, step, salt=41))
        return (torch.rand(self.examples, generator=g) < self.sample_rate).nonzero().squeeze(1)

    def accumulate(
        self,
        step: int,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> tuple[float, int]:
        """Sample step ``step``'s batch and put every example's gradient into ``p.grad_sample`` (chunks
        before the last are clipped into the optimizer's sum already; the forward runs under
        ``autocast()``); returns the batch's mean loss and its ``task.count``. An empty batch (probability
        ``(1 - q) ** examples``) gives zero gradients, a loss of 0 and 0 units: the step still adds noise,
        as the accountant counts it."""
        indices = self.sample(step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if len(indices) == 0:
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            return 0.0, 0
        batch = self.task.examples("train", indices, step)  # type: ignore[attr-defined]
        units = self.task.count(batch)
        names = {id(p): n for n, p in self.model.named_parameters()}
        total = 0.0
        if "attention_mask" in batch:  # padded texts: by length, in chunks each padded to its own longest
            order = batch["attention_mask"].sum(1).argsort(stable=True)
            chunks = indices[order].split(min(self.chunk, TEXT_CHUNK))
            pieces = (self.task.examples("train", part, step) for part in chunks)  # type: ignore[attr-defined]
        else:
            chunks = indices.split(self.chunk)
            parts = {k: v.split(self.chunk) for k, v in batch.items()}
            pieces = ({k: part[i] for k, part in parts.items()} for i in range(len(chunks)))
        for i, piece in enumerate(pieces):
            piece = {k: v.to(device, non_blocking=True) for k, v in piece.items()}
            if self.ghost:  # clipped sums straight into the optimizer's (dp_ghost.py)
                sums, summed = ghost_clipped_sums(self.model, self.task.loss, piece, *self._ghost, autocast)
                total += float(summed)
                for p in params:
                    s = sums[names[id(p)]]
                    p.summed_grad = s if getattr(p, "summed_grad", None) is None else p.summed_grad + s
                continue
            if self.hooks:
                grads, summed = hooked_gradients(self.model, self.task.loss, piece, autocast)
            else:
                with autocast():
                    grads, losses = per_example_gradients(self.model, self.task.loss, piece)
                summed = losses.float().sum()
            total += float(summed)
            for p in params:
                p.grad_sample = grads[names[id(p)]]
            if i < len(chunks) - 1:
                self.optimizer.clip_and_accumulate()  # the next chunk's grad_sample replaces this one's
        if self.ghost:  # all summed already: the optimizer's own clipping of what is left adds nothing
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        return total / len(indices), units

    def epsilon(self) -> float:
        """Epsilon spent so far at the recipe's delta (0 before the first step)."""
        steps = sum(n for _, _, n in self.accountant.history)
        if steps == 0:
            return 0.0
        if self._spent is None or self._spent[0] != steps:
            self._spent = (steps, float(self.accountant.get_epsilon(delta=self.settings.delta)))
        return self._spent[1]

    def report(self) -> dict[str, Any]:
        """What a bundle's metrics.json records: the guarantee of the weights at this step."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.settings.delta,
            "target_epsilon": self.settings.target_epsilon,
            "accountant": self.settings.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.settings.max_grad_norm,
            "steps": sum(n for _, _, n in self.accountant.history),
            "examples": self.examples,
        }

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history and the calibration, for the checkpoint (JSON values only)."""
        return {
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "accountant": self.settings.accountant,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the accountant of a checkpoint made with the same privacy settings.

        Raises:
            TansuoError: The checkpoint was calibrated differently (another target, batch, data or plan).
        """
        same = (
            state.get("accountant") == self.settings.accountant
            and math.isclose(state.get("noise_multiplier", -1.0), self.noise_multiplier, rel_tol=1e-9)
            and math.isclose(state.get("sample_rate", -1.0), self.sample_rate, rel_tol=1e-12)
        )
        if not same:
            raise TansuoError(
                "the checkpoint's DP-SGD was calibrated differently (noise multiplier "
                f"{state.get('noise_multiplier')}, sampling rate {state.get('sample_rate')}, accountant "
                f"{state.get('accountant')}; this run: {self.noise_multiplier}, {self.sample_rate}, "
                f"{self.settings.accountant}); resume with the recipe it was started with"
            )
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._spent = None
