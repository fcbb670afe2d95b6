"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), torchao style, in place.

``lora_(model, LoRAConfig(r=8, alpha=16, targets=["q_proj", "kv_proj"]))`` swaps every targeted
``nn.Linear`` for a :class:`LoRALinear`, which keeps the frozen weight and bias under their own names and adds
two small matrices::

    y = x W^T + b + dropout(x) A^T B^T * alpha / r        A: (r, in), B: (out, r)

A starts Kaiming-uniform and B at zero (as PEFT does), so the adapted model starts equal to the base model.
The transform is a registered technique (step ``"lora"``, :mod:`tansuo.compress.registry`): its record in
``model.compression`` names each adapted module with its rank and alpha, so a bundle written with adapters
loads back with them. :func:`merge_lora_` folds every adapter into its weight (``W + alpha / r * B A``) and
gives plain Linear layers back (the record is dropped); :meth:`LoRALinear.merge_` / ``unmerge_`` do it in
place on one layer and undo it. :func:`freeze_base_` leaves only the adapters (and ``modules_to_save``)
trainable.

Targets are suffixes of module names (``"q_proj"`` matches ``stack.layers.0.attn.q_proj``; a dotted suffix
such as ``"attn.out_proj"`` tells the attention's output from the MLP's) or ``"all-linear"``: every Linear
layer but the output head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.compress.registry import apply_technique, register_technique
from tansuo.errors import TansuoError

ALL_LINEAR = "all-linear"
#: names of output heads, which "all-linear" leaves alone (as PEFT leaves the output embedding)
HEAD_NAMES = ("lm_head", "head", "decoder")


class LoRAError(TansuoError):
    """LoRA cannot be applied, merged or loaded as asked (no such layer, another model's adapter)."""


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get adapters, and of what rank.

    Args:
        r: Rank of each adapter.
        alpha: Scale numerator: the adapter's output is multiplied by ``alpha / r``.
        dropout: Dropout on the adapter's input (training only).
        targets: Suffixes of module names, or ``"all-linear"`` (every Linear but the output head).
        modules_to_save: Suffixes of modules trained in full beside the adapters (a fresh classifier head).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ALL_LINEAR
    modules_to_save: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.r < 1:
            raise LoRAError(f"LoRA rank r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            object.__setattr__(self, "targets", (self.targets,))
        if not self.targets:
            raise LoRAError(f"LoRA targets is empty; name Linear layers (say ['q_proj']) or '{ALL_LINEAR}'")
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))


class LoRALinear(nn.Module):
    """A frozen Linear layer plus a low-rank update; ``weight`` and ``bias`` keep the Linear's names (and
    tensors), so a base model's state dict loads into it with the adapter added.

    Args:
        linear: The layer to adapt (its parameters are reused, not copied).
        r: Rank.
        alpha: The update is scaled by ``alpha / r``.
        dropout: Dropout on the update's input.
    """

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.r, self.alpha, self.scale = r, float(alpha), float(alpha) / r
        like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``alpha / r * B A``, ``(out, in)``: what the adapter adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` to ``(..., out)``."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + update * self.scale

    @torch.no_grad()
    def merge_(self) -> None:
        """Add the update into ``weight`` in place (one matmul a call); :meth:`unmerge_` undoes it."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Take the update out of ``weight`` again (equal to the base weight up to rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A plain Linear with ``W + alpha / r * B A`` (and the bias), on the same device and dtype."""
        w = self.weight.detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w if self.merged else w + self.delta_weight().to(w.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.merged:
            raise LoRAError("a merged LoRALinear's weight holds the update: unmerge_() it before saving")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, r={self.r}, alpha={self.alpha}"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | LoRALinear)


def linear_names(model: nn.Module) -> list[str]:
    """The names of the Linear layers (adapted or not) of ``model``, in module order."""
    return [name for name, m in model.named_modules() if _is_linear(m)]


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _tied(model: nn.Module) -> set[str]:
    """Linear layers whose weight another module shares (a tied output head)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and len(owners.get(id(m.weight), [])) > 1
    }


def resolve_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """The names of the Linear layers ``targets`` select (suffixes, or ``"all-linear"``).

    Raises:
        LoRAError: A target matches no Linear layer (the message lists the ones there are), or matches a
            layer whose weight is tied to another module's.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tied = _tied(model)
    if targets == ALL_LINEAR:
        chosen = [n for n in names if n.rpartition(".")[2] not in HEAD_NAMES and n not in tied]
        if not chosen:
            raise LoRAError(f"'{ALL_LINEAR}' found no Linear layer but the head in {type(model).__name__}")
        return chosen
    chosen = []
    for target in targets:
        found = [n for n in names if _matches(n, target)]
        if not found:
            leaves = sorted({n.rpartition(".")[2] for n in names})
            raise LoRAError(
                f"LoRA target {target!r} matches no Linear layer; this {type(model).__name__} has "
                f"{', '.join(leaves)} (as suffixes of {names[0]} ...), or use '{ALL_LINEAR}'"
            )
        bad = [n for n in found if n in tied]
        if bad:
            raise LoRAError(
                f"LoRA target {target!r} matches {bad[0]}, whose weight is tied to the token embeddings; "
                "an adapter there would change both (leave the tied head out)"
            )
        chosen.extend(n for n in found if n not in chosen)
    return [n for n in names if n in chosen]  # module order


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_adapters_(model: nn.Module, ranks: dict[str, tuple[int, float]], dropout: float = 0.0) -> None:
    """Swap each named Linear for a :class:`LoRALinear` of its ``(rank, alpha)``; already adapted layers are
    refused."""
    for name, (r, alpha) in ranks.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise LoRAError(f"{name} has a LoRA adapter already; merge it first (merge_lora_)")
        if not isinstance(module, nn.Linear):
            raise LoRAError(f"{name} is a {type(module).__name__}, not a Linear layer LoRA can adapt")
        _set_submodule(model, name, LoRALinear(module, int(r), float(alpha), dropout))


def apply_lora(
    model: nn.Module, config: LoRAConfig, *, filter_fn: Any = None, base: dict | None = None
) -> dict[str, Any]:
    """The :class:`LoRAConfig` technique: add adapters in place; returns the record. ``base`` (what the
    model was imported from: a bundle's ``origin``) is kept in the record, so that the adapter can be
    written with the Hugging Face architecture's names (:mod:`tansuo.adapters.peft`)."""
    names = resolve_targets(model, config.targets)
    if filter_fn is not None:
        names = [n for n in names if filter_fn(model.get_submodule(n), n)]
    for suffix in config.modules_to_save:
        if not any(_matches(n, suffix) for n, _ in model.named_modules()):
            raise LoRAError(f"modules_to_save names {suffix!r}, which is no module of {type(model).__name__}")
    add_adapters_(model, {n: (config.r, config.alpha) for n in names}, config.dropout)
    record: dict[str, Any] = {
        "r": config.r,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "modules": {n: [config.r, config.alpha] for n in names},
        "modules_to_save": list(config.modules_to_save),
    }
    if base is not None:
        record["base"] = base
    return record


def restore_lora(model: nn.Module, record: dict[str, Any]) -> None:
    """Replay a ``lora`` record on a freshly built model: empty adapters of the recorded ranks, so that the
    bundle's weights (adapters included) load strictly."""
    ranks = {name: (int(r), float(alpha)) for name, (r, alpha) in record.get("modules", {}).items()}
    add_adapters_(model, ranks, float(record.get("dropout", 0.0)))


register_technique(LoRAConfig, step="lora", apply=apply_lora, restore=restore_lora)


def lora_(model: nn.Module, config: LoRAConfig, *, base: dict | None = None) -> list[str]:
    """Add LoRA adapters to ``model`` in place (recorded in ``model.compression``, so bundles keep them);
    returns the adapted module names. See :func:`freeze_base_` to train only them."""
    record = apply_technique(model, config, base=base)
    return list(record["modules"])


def lora_record(model: nn.Module) -> dict[str, Any] | None:
    """The model's ``lora`` record (what :func:`lora_` appended), or None."""
    return next((r for r in getattr(model, "compression", None) or [] if r.get("step") == "lora"), None)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze_base_(model: nn.Module, modules_to_save: Sequence[str] = ()) -> int:
    """Leave only the adapters' ``lora_A`` / ``lora_B`` (and every parameter of the modules whose names end
    in one of ``modules_to_save``) trainable; returns the number of trainable parameters.

    Raises:
        LoRAError: The model has no adapters.
    """
    if not lora_layers(model):
        raise LoRAError("the model has no LoRA adapters to train; apply lora_ first")
    saved = {n for n, _ in model.named_modules() if any(_matches(n, s) for s in modules_to_save)}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        in_saved = any(owner == s or owner.startswith(s + ".") for s in saved)
        p.requires_grad_(leaf in ("lora_A", "lora_B") or in_saved)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora_(model: nn.Module) -> list[str]:
    """Fold every adapter into its weight (``W + alpha / r * B A``) and put plain Linear layers back; the
    ``lora`` record leaves ``model.compression``. Returns the merged module names."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.merged_linear())
    if getattr(model, "compression", None):
        model.compression = [r for r in model.compression if r.get("step") != "lora"]
    return list(layers)
