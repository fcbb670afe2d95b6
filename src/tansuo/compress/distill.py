"""Knowledge distillation: a student learns from a teacher's soft predictions, with the one trainer.

Loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; DistilBERT, Sanh et al. 2019)::

    a * CE(student, labels) + (1 - a) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

plus, optionally, ``b * MSE(P h_student, h_teacher)``: the last hidden states matched through a learned
projection ``P`` (TinyBERT, Jiao et al. 2020), which lets a narrower student learn from a wider teacher.
:class:`DistillTask` wraps the teacher's task: batches, evaluation and bundles are the task's own, only the
loss changes; the teacher runs in eval mode without gradients. A student of the teacher's family and width
starts from the teacher's weights, one layer out of every ``L_teacher / L_student`` (DistilBERT's
initialisation, :func:`init_from_teacher`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.blocks import TransformerStack
from tansuo.compress.registry import register_step
from tansuo.errors import CompressionError
from tansuo.tasks.base import Batch, Task

log = logging.getLogger(__name__)


class DistillationLoss(nn.Module):
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, averaged over rows.

    Args:
        alpha: Weight of the cross-entropy with the true labels, in [0, 1].
        temperature: T > 0; softens both distributions (T^2 keeps the gradient scale of the soft term).
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise CompressionError(f"distillation alpha must lie in [0, 1], got {alpha}")
        if not temperature > 0:
            raise CompressionError(f"distillation temperature must be positive, got {temperature}")
        self.alpha, self.temperature = alpha, temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(N, K)`` of both, targets ``(N,)`` (-100 = no label: those rows count in the soft term
        only)."""
        T = self.temperature
        s, t = student_logits.float(), teacher_logits.float()
        log_s, log_t = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
        soft = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)  # sum over K, mean over N
        loss = (1.0 - self.alpha) * T * T * soft
        if self.alpha > 0:
            loss = loss + self.alpha * F.cross_entropy(s, targets)
        return loss


class HiddenStateLoss(nn.Module):
    """``MSE(proj(h_student), h_teacher)`` over real positions; ``proj`` is learned (identity-initialised when
    the widths match)."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)
        if student_dim == teacher_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(teacher_dim))
                self.proj.bias.zero_()

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states ``(B, T, Cs)`` and ``(B, T, Ct)``; ``mask`` ``(B, T)`` true for real tokens."""
        err = (self.proj(student.float()) - teacher.float()).pow(2).mean(-1)  # (B, T)
        if mask is None:
            return err.mean()
        m = mask.to(err.dtype)
        return (err * m).sum() / m.sum().clamp(min=1.0)


def has_stack(model: nn.Module) -> bool:
    """Whether ``model`` has a Transformer stack whose hidden states distillation can match."""
    return any(isinstance(m, TransformerStack) for m in model.modules())


def _stack(model: nn.Module) -> TransformerStack:
    for module in model.modules():
        if isinstance(module, TransformerStack):
            return module
    raise CompressionError(
        f"hidden-state matching needs a Transformer stack; {type(model).__name__} has none (set hidden=0)"
    )


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    width = getattr(config, "embed_dim", None)
    if width is None:
        raise CompressionError(f"cannot tell the hidden width of {type(model).__name__}; set hidden=0")
    return int(width)


class DistillTask:
    """The teacher's task with a distillation loss; everything else is delegated to ``task``.

    Args:
        task: The teacher bundle's task (batches, evaluation, bundle assets).
        teacher: The teacher model; frozen and put in eval mode here.
        student: The model being trained (needed to capture its hidden states).
        alpha, temperature: See :class:`DistillationLoss`.
        hidden: Weight of the hidden-state term (0: off).
        layers: Which hidden states are matched: ``"last"``, the stack's output, or ``"all"``, every student
            layer's output with the teacher layer it starts from (:func:`teacher_layers`; the same layer
            when the depths match, as after pruning), each through its own projection, averaged.
    """

    def __init__(
        self,
        task: Task,
        teacher: nn.Module,
        student: nn.Module,
        *,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden: float = 0.0,
        layers: str = "last",
    ) -> None:
        if layers not in ("last", "all"):
            raise CompressionError(f"hidden-state layers must be 'last' or 'all', got {layers!r}")
        self.task, self.teacher = task, teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.kd = DistillationLoss(alpha, temperature)
        self.hidden_weight = hidden
        self.hidden: nn.ModuleList | None = None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: list[Any] = []
        if hidden > 0:
            s_stack, t_stack = _stack(student), _stack(teacher)
            if layers == "last":
                pairs = [(s_stack, t_stack)]
            else:
                order = teacher_layers(len(t_stack.layers), len(s_stack.layers))
                pairs = [(s_stack.layers[i], t_stack.layers[j]) for i, j in enumerate(order)]
            width_s, width_t = _width(student), _width(teacher)
            self.hidden = nn.ModuleList(HiddenStateLoss(width_s, width_t) for _ in pairs)
            for k, (s_module, t_module) in enumerate(pairs):
                self._handles.append(s_module.register_forward_hook(self._capture(("student", k))))
                self._handles.append(t_module.register_forward_hook(self._capture(("teacher", k))))

    def _capture(self, key: tuple[str, int]):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._captured[key] = output

        return hook

    def close(self) -> None:
        """Remove the hooks this task put on the student and the teacher (the teacher may teach again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    @property
    def extra(self) -> nn.Module | None:
        """Modules trained beside the student (the hidden-state projections), not part of its bundle."""
        return self.hidden

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = next(iter(batch.values())).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        if self.hidden is not None and next(self.hidden.parameters()).device != device:
            self.hidden.to(device)
        student_logits, targets = self.task.logits(model, batch)
        with torch.no_grad():
            teacher_logits, _ = self.task.logits(self.teacher, batch)
        loss = self.kd(student_logits, teacher_logits, targets)
        if self.hidden is not None:
            mask = batch.get("attention_mask")
            terms = []
            for k, match in enumerate(self.hidden):
                h_s, h_t = self._captured.pop(("student", k)), self._captured.pop(("teacher", k))
                m = None if mask is None else mask.bool()
                if h_s.dim() == 2:  # (B, C) features: no positions
                    h_s, h_t, m = h_s[:, None], h_t[:, None], None
                terms.append(match(h_s, h_t, m))
            loss = loss + self.hidden_weight * torch.stack(terms).mean()
        return loss


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def teacher_layers(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layer each student layer starts from: evenly spaced, ending with the last one
    (6 -> 3: layers 1, 3, 5)."""
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, int]:
    """Copy the teacher's weights into a student of the same family and width: every tensor outside the
    layers, and layer ``i`` of the student from layer :func:`teacher_layers` ``[i]`` of the teacher, stack by
    stack (an encoder-decoder's ``encoder.layers`` and ``decoder.layers`` are mapped each on its own depth).
    Returns counts of copied and skipped (shape mismatch) tensors."""
    t_state = teacher.state_dict()

    def depths(keys: Any) -> dict[str, int]:  # layers per stack, a stack named by what precedes "layers."
        out: dict[str, int] = {}
        for key in keys:
            if m := _LAYER.search(key):
                stack = key[: m.start()]
                out[stack] = max(out.get(stack, 0), int(m.group(2)) + 1)
        return out

    t_depth, s_depth = depths(t_state), depths(student.state_dict())
    new, copied, skipped = {}, 0, 0
    for key, value in student.state_dict().items():
        source = key
        if (m := _LAYER.search(key)) and key[: m.start()] in t_depth:
            stack = key[: m.start()]
            j = teacher_layers(t_depth[stack], s_depth[stack])[int(m.group(2))]
            source = f"{stack}{m.group(1)}layers.{j}.{key[m.end() :]}"
        if source in t_state and t_state[source].shape == value.shape:
            new[key] = t_state[source]
            copied += 1
        else:
            new[key] = value
            skipped += 1
    student.load_state_dict(new, strict=True)
    log.info("student initialised from the teacher: %d tensors copied, %d kept fresh", copied, skipped)
    return {"copied": copied, "skipped": skipped}


# a distilled model is a new model trained from scratch or from teacher layers: a "distill" record (as
# bundles may carry) describes how it was made and has no structure to rebuild when the bundle loads
register_step("distill", restore=None)
