"""Pruning, torchao style: ``prune_(model, StructuredPruneConfig(heads=0.25, ffn=0.5), scores=...)``.

Structured pruning removes whole attention heads and feed-forward neurons and *physically shrinks* the
Linear layers around them, so the model gets smaller and faster (Michel et al. 2019, "Are Sixteen Heads
Really Better than One?"; the head and neuron removal of Hugging Face's ``prune_heads`` and NNI's
dependency-aware pruners). It works on every model built from :class:`~tansuo.blocks.MultiHeadAttention`
self-attention and :class:`~tansuo.blocks.FeedForward` whose class declares what may go in ``prunable``
(``frozenset({"heads", "ffn"})`` for BERT and ViT). Importance comes from weight magnitude
or from gradient x activation ("taylor": the first-order change of the loss when a head's or neuron's output
is gated to zero, summed over a few batches, :func:`taylor_scores`). Units are ranked globally after
normalising scores within each layer, and every layer keeps at least one head and one neuron.

Unstructured pruning (:class:`UnstructuredPruneConfig`) zeroes the globally smallest weights of the Linear
layers. Dense kernels do the same work on zeros, so it shrinks a *compressed* file, not latency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tansuo.blocks import FeedForward, MultiHeadAttention
from tansuo.compress.registry import apply_technique, register_technique
from tansuo.errors import CompressionError

Scores = dict[str, torch.Tensor]  # module name -> one score per head (attention) or neuron (feed-forward)


@dataclass(frozen=True)
class StructuredPruneConfig:
    """Fractions of all attention heads and of all feed-forward neurons to remove (each in [0, 1))."""

    heads: float = 0.0
    ffn: float = 0.0

    def __post_init__(self) -> None:
        for field in ("heads", "ffn"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise CompressionError(
                    f"pruning ratio {field}={value} is outside [0, 1): 1 would remove every "
                    f"{'head' if field == 'heads' else 'neuron'}; give a fraction, e.g. heads=0.25,ffn=0.5"
                )
        if self.heads == 0 and self.ffn == 0:
            raise CompressionError("structured pruning needs heads > 0 or ffn > 0, e.g. heads=0.25,ffn=0.5")


@dataclass(frozen=True)
class UnstructuredPruneConfig:
    """Fraction of the Linear weights (global magnitude ranking) set to zero, in (0, 1)."""

    sparsity: float

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise CompressionError(
                f"unstructured sparsity {self.sparsity} must lie in (0, 1), e.g. unstructured=0.8"
            )


def prunable(
    model: nn.Module,
    parts: Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> tuple[dict[str, MultiHeadAttention], dict[str, FeedForward]]:
    """The self-attention and feed-forward modules structured pruning can shrink, by name.

    What may be removed is the model class's declaration ``prunable`` (``"heads"``: attention heads of its
    :class:`MultiHeadAttention` modules, ``"ffn"``: hidden neurons of its :class:`FeedForward` modules); only
    the declared kinds of module are returned, those ``filter_fn(module, name)`` accepts (default: all).
    Raises :class:`CompressionError` when the class declares nothing, or not every one of ``parts`` (what
    is asked to be removed; default: what it declares), or has no module of a kind asked for.
    """
    declared = frozenset(getattr(type(model), "prunable", frozenset()))
    wanted = declared if parts is None else frozenset(parts)
    family = getattr(model, "family", type(model).__name__)
    if not declared:
        raise CompressionError(
            f"structured pruning supports the model families that declare what it may remove "
            f"({_declaring()}: attention heads and feed-forward neurons); this model is {family!r}, which "
            "declares nothing (`prunable` is empty). Use quantization or distillation for it"
        )
    if wanted - declared:
        missing = " and ".join(_PART_NAMES.get(p, p) for p in sorted(wanted - declared))
        raise CompressionError(
            f"structured pruning cannot remove {missing} from a {family!r} model: the family declares "
            f"prunable {sorted(declared)} only (families that allow it: {_declaring(wanted - declared)}). "
            "Set that ratio to 0, or use quantization or distillation"
        )
    accept = filter_fn or (lambda module, name: True)
    attention: dict[str, MultiHeadAttention] = {}
    ffn: dict[str, FeedForward] = {}
    for name, module in model.named_modules():
        if "heads" in declared and isinstance(module, MultiHeadAttention) and accept(module, name):
            attention[name] = module
        elif "ffn" in declared and isinstance(module, FeedForward) and accept(module, name):
            ffn[name] = module
    for part, found in (("heads", attention), ("ffn", ffn)):
        if part in wanted and not found:
            raise CompressionError(
                f"structured pruning of {_PART_NAMES[part]} found no "
                f"{'MultiHeadAttention' if part == 'heads' else 'FeedForward'} module in this {family!r} "
                "model" + (" that filter_fn accepts" if filter_fn is not None else "")
            )
    return attention, ffn


_PART_NAMES = {"heads": "attention heads", "ffn": "feed-forward neurons"}


def _declaring(parts: Iterable[str] = ()) -> str:
    """The registered families whose classes declare every one of ``parts`` prunable (any, when empty)."""
    from tansuo.models import get_model_entry, list_models

    need = frozenset(parts)
    families = set()
    for name in list_models():
        entry = get_model_entry(name)
        if entry.prunable and need <= entry.prunable:
            families.add(entry.family)
    names = sorted(families)
    if not names:
        return "none is registered"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def magnitude_scores(model: nn.Module) -> Scores:
    """Importance from weights alone: the L2 norm of everything a head or neuron reads and writes."""
    attention, ffn = prunable(model)
    scores: Scores = {}
    for name, attn in attention.items():
        H, D = attn.num_heads, attn.head_dim
        q = attn.q_proj.weight.detach().view(H, D, -1).pow(2).sum((1, 2))
        k, v = (w.view(H, D, -1).pow(2).sum((1, 2)) for w in attn.kv_proj.weight.detach().chunk(2, dim=0))
        o = attn.out_proj.weight.detach().view(-1, H, D).pow(2).sum((0, 2))
        scores[name] = (q + k + v + o).sqrt().float().cpu()
    for name, mlp in ffn.items():
        w_in = mlp.in_proj.weight.detach().pow(2).sum(1)
        w_out = mlp.out_proj.weight.detach().pow(2).sum(0)
        scores[name] = (w_in + w_out).sqrt().float().cpu()
    return scores


def taylor_scores(
    model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> Scores:
    """Importance as |dL/dg| for a gate g = 1 on each head's and neuron's output (gradient x activation),
    accumulated over ``batches``; ``loss_fn(model, batch)`` returns the loss. Parameters get no gradients
    and the model's weights are not changed."""
    attention, ffn = prunable(model)
    device = next(model.parameters()).device
    gates: dict[str, torch.Tensor] = {}
    handles = []

    def gate_hook(name: str, width: int, repeat: int) -> Callable:
        gate = torch.ones(width, device=device, requires_grad=True)
        gates[name] = gate

        def hook(module: nn.Module, args: tuple) -> tuple:
            (x,) = args
            return (x * gate.repeat_interleave(repeat).to(x.dtype),)

        return hook

    for name, attn in attention.items():
        hook = gate_hook(name, attn.num_heads, attn.head_dim)
        handles.append(attn.out_proj.register_forward_pre_hook(hook))
    for name, mlp in ffn.items():
        handles.append(mlp.out_proj.register_forward_pre_hook(gate_hook(name, mlp.out_proj.in_features, 1)))
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    scores = {name: torch.zeros(g.numel()) for name, g in gates.items()}
    try:
        model.eval()  # no dropout: the scores measure the model, not the noise
        for p in model.parameters():
            p.requires_grad_(False)
        n = 0
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(gates.values()))
            for name, g in zip(gates, grads, strict=True):
                scores[name] += g.detach().abs().float().cpu()
            n += 1
        if n == 0:
            raise CompressionError("taylor importance needs at least one batch of training data")
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def gradual_schedule(final: float, stages: int) -> list[float]:
    """The fraction pruned after each of ``stages`` pruning events, rising as Zhu & Gupta's cubic schedule
    (2017, "To prune, or not to prune"): fast at first, when there is slack, slower towards the end, and
    exactly ``final`` at the last event. ``stages=1`` is one cut."""
    if stages < 1:
        raise CompressionError(f"a pruning schedule needs at least one stage, got {stages}")
    return [final * (1.0 - (1.0 - k / stages) ** 3) if k < stages else final for k in range(1, stages + 1)]


def stage_steps(total: int, stages: int, prune_share: float = 0.5) -> list[int]:
    """Fine-tuning steps after each pruning event: the first ``stages - 1`` events are spread evenly over
    ``prune_share`` of ``total``, the last one gets the rest to recover. Each stage gets at least one step
    (so there are at most ``total`` stages); the counts add up to ``total``."""
    stages = max(1, min(stages, total))
    if stages == 1:
        return [total]
    each = max(1, int(total * prune_share) // (stages - 1))
    head = [each] * (stages - 1)
    return [*head, total - sum(head)]


def units(model: nn.Module) -> dict[str, int]:
    """How many attention heads and feed-forward neurons the model's prunable modules hold in all."""
    attention, ffn = prunable(model)
    return {
        "heads": sum(a.num_heads for a in attention.values()),
        "ffn": sum(m.out_proj.in_features for m in ffn.values()),
    }


def stage_config(original: dict[str, int], current: dict[str, int], heads: float, ffn: float) -> Any:
    """The :class:`StructuredPruneConfig` that takes a model with ``current`` units (:func:`units`) to the
    fractions ``heads`` and ``ffn`` of its ``original`` units removed (the same count a single cut at those
    fractions removes); None when there is nothing left to remove."""
    ratios = {}
    for part, target in (("heads", heads), ("ffn", ffn)):
        keep = original[part] - int(round(target * original[part]))
        ratios[part] = max(0, current[part] - keep) / current[part] if current[part] else 0.0
    if ratios["heads"] == 0 and ratios["ffn"] == 0:
        return None
    return StructuredPruneConfig(**ratios)


def _keep_global(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Indices (sorted) each module keeps when ``ratio`` of all units go, lowest normalised score first, at
    least one per module."""
    if ratio == 0:
        return {name: torch.arange(s.numel()) for name, s in scores.items()}
    normed = {name: s / s.norm().clamp(min=1e-12) for name, s in scores.items()}
    flat = torch.cat([s for s in normed.values()])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(normed.values())])
    index = torch.cat([torch.arange(s.numel()) for s in normed.values()])
    n_remove = int(round(ratio * flat.numel()))
    removed = [set() for _ in normed]
    sizes = [s.numel() for s in normed.values()]
    for i in torch.argsort(flat, stable=True).tolist():
        if n_remove == 0:
            break
        o = int(owner[i])
        if len(removed[o]) + 1 >= sizes[o]:
            continue  # the last unit of a module stays
        removed[o].add(int(index[i]))
        n_remove -= 1
    return {
        name: torch.tensor([j for j in range(size) if j not in gone], dtype=torch.long)
        for (name, size, gone) in zip(normed, sizes, removed, strict=True)
    }


def _rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    return new


def _columns(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(cols), linear.out_features, bias=linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, cols])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def shrink_attention(attn: MultiHeadAttention, heads: torch.Tensor) -> None:
    """Keep only ``heads`` (indices) of a self-attention module, in place."""
    if attn.num_kv_heads != attn.num_heads:
        raise CompressionError(
            "head pruning of grouped-query attention is not supported (a key/value head serves several "
            "query heads); prune the feed-forward neurons only (heads=0)"
        )
    D = attn.head_dim
    rows = (heads[:, None] * D + torch.arange(D)).flatten().to(attn.q_proj.weight.device)
    inner = attn.num_heads * D
    attn.q_proj = _rows(attn.q_proj, rows)
    attn.kv_proj = _rows(attn.kv_proj, torch.cat([rows, rows + inner]))
    attn.out_proj = _columns(attn.out_proj, rows)
    attn.num_heads = attn.num_kv_heads = len(heads)


def shrink_ffn(mlp: FeedForward, neurons: torch.Tensor) -> None:
    """Keep only ``neurons`` (indices) of a feed-forward module's hidden layer, in place."""
    neurons = neurons.to(mlp.in_proj.weight.device)
    mlp.in_proj = _rows(mlp.in_proj, neurons)
    mlp.out_proj = _columns(mlp.out_proj, neurons)


def prune_(
    model: nn.Module,
    config: Any,
    scores: Scores | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place with the technique registered for ``type(config)``, append its record to
    ``model.compression`` and return that record (:func:`~tansuo.compress.restore_structure` replays it when
    a bundle loads).

    :class:`StructuredPruneConfig` removes ``config.heads`` of all heads and ``config.ffn`` of all
    feed-forward neurons (of the modules ``filter_fn(module, name)`` accepts), ranked by ``scores`` (default
    :func:`magnitude_scores`), shrinking the layers. :class:`UnstructuredPruneConfig` zeroes
    ``config.sparsity`` of the (accepted) Linear weights by global magnitude (shapes unchanged).
    """
    kwargs = {} if scores is None else {"scores": scores}
    return apply_technique(model, config, filter_fn=filter_fn, step="prune", **kwargs)


def prune_structured(
    model: nn.Module,
    config: StructuredPruneConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    scores: Scores | None = None,
) -> dict[str, Any]:
    """The :class:`StructuredPruneConfig` technique; returns the record (units kept per module)."""
    parts = {p for p in ("heads", "ffn") if getattr(config, p)}
    attention, ffn = prunable(model, parts, filter_fn)
    scores = scores if scores is not None else magnitude_scores(model)
    missing = [n for n in (*attention, *ffn) if n not in scores]
    if missing:
        raise CompressionError(f"importance scores are missing for {missing[:3]}; compute them on this model")
    keep_heads = _keep_global({n: scores[n] for n in attention}, config.heads)
    keep_ffn = _keep_global({n: scores[n] for n in ffn}, config.ffn)
    for name, attn in attention.items():
        if len(keep_heads[name]) < attn.num_heads:
            shrink_attention(attn, keep_heads[name])
    for name, mlp in ffn.items():
        if len(keep_ffn[name]) < mlp.out_proj.in_features:
            shrink_ffn(mlp, keep_ffn[name])
    return {
        "step": "prune",
        "kind": "structured",
        "heads": config.heads,
        "ffn": config.ffn,
        "attention": {n: a.num_heads for n, a in attention.items()},
        "feed_forward": {n: m.out_proj.in_features for n, m in ffn.items()},
    }


def _linear_weights(
    model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> dict[str, torch.Tensor]:
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and id(m.weight) not in shared
        and (filter_fn is None or filter_fn(m, name))
    }


def prune_unstructured(
    model: nn.Module,
    config: UnstructuredPruneConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    scores: Scores | None = None,
) -> dict[str, Any]:
    """The :class:`UnstructuredPruneConfig` technique (global magnitude ranking; ``scores`` are not used)."""
    weights = _linear_weights(model, filter_fn)
    if not weights:
        raise CompressionError("unstructured pruning found no Linear layer to prune (check filter_fn)")
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    k = int(round(config.sparsity * flat.numel()))
    threshold = torch.kthvalue(flat, max(1, k)).values.item() if k else -1.0
    with torch.no_grad():
        for w in weights.values():
            w.mul_((w.abs() > threshold).to(w.dtype))
    return {"step": "prune", "kind": "unstructured", "sparsity": config.sparsity}


def keep_zeros(model: nn.Module) -> list[Any]:
    """During fine-tuning after unstructured pruning, zero the gradient of every zero Linear weight, so AdamW
    (fresh state, decoupled decay) leaves them at zero. Returns hook handles (call ``.remove()``)."""
    handles = []
    for w in _linear_weights(model).values():
        mask = (w.detach() != 0).to(w.dtype)
        handles.append(w.register_hook(lambda g, mask=mask: g * mask))
    return handles


def sparsity(model: nn.Module) -> float:
    """Fraction of the Linear weights (untied) that are exactly zero."""
    weights = _linear_weights(model)
    total = sum(w.numel() for w in weights.values())
    return sum(int((w == 0).sum()) for w in weights.values()) / max(1, total)


def restore_pruned(model: nn.Module, record: dict[str, Any]) -> None:
    """Shrink a freshly built model to the shapes a structured-pruning record gives, so its state dict
    loads (the kept units' weights come from the state dict)."""
    if record.get("kind") != "structured":
        return
    for name, n in record["attention"].items():
        attn = model.get_submodule(name)
        if n < attn.num_heads:
            shrink_attention(attn, torch.arange(n))
    for name, n in record["feed_forward"].items():
        mlp = model.get_submodule(name)
        if n < mlp.out_proj.in_features:
            shrink_ffn(mlp, torch.arange(n))


register_technique(StructuredPruneConfig, step="prune", apply=prune_structured, restore=restore_pruned)
register_technique(UnstructuredPruneConfig, step="prune", apply=prune_unstructured, restore=restore_pruned)
