"""The ``tansuo compress`` prune step: structured or unstructured pruning, in one cut or gradually over the
fine-tuning with the unpruned model teaching, and with ``max_drop`` the search for the largest ratio within
the limit. The techniques themselves (``prune_``, the schedule's pure parts, importance scores) are
:mod:`tansuo.compress.prune`; training and bundle helpers are :mod:`tansuo.variants.runners`'.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tansuo.bundle import Bundle, load_bundle, save_bundle
from tansuo.compress import (
    DistillTask,
    UnstructuredPruneConfig,
    gradual_schedule,
    magnitude_scores,
    prune_,
    stage_config,
    stage_steps,
    taylor_scores,
    units,
)
from tansuo.compress.distill import has_stack
from tansuo.compress.prune import keep_zeros, prunable, sparsity
from tansuo.device import resolve_device
from tansuo.train.trainer import make_plan
from tansuo.variants import accuracy
from tansuo.variants.runners import bundle_recipe, bundle_seed, fit, train_config
from tansuo.variants.steps import PruneStep

log = logging.getLogger(__name__)


def _prune_parts(step: PruneStep) -> set[str]:
    return {part for part in ("heads", "ffn") if getattr(step, part)}


class _Continued:
    """``task`` with its training batches continuing ``start`` micro-batches in: a stage of gradual pruning
    sees the data the previous stages did not (the order stays a pure function of seed and step)."""

    def __init__(self, task: Any, start: int) -> None:
        self.task, self.start = task, start

    def train_batches(self, batch_size: int, start: int = 0) -> Any:
        return self.task.train_batches(batch_size, start=start + self.start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def _scores(model: nn.Module, task: Any, step: PruneStep, start: int = 0) -> dict[str, torch.Tensor]:
    if step.importance == "magnitude":
        return magnitude_scores(model)
    device = resolve_device("auto")
    model.to(device)
    batches = (
        {k: v.to(device) for k, v in b.items()}
        for _, b in zip(range(step.score_batches), task.train_batches(32, start=start), strict=False)
    )
    return taylor_scores(model, batches, task.loss)


def _cut(
    model: nn.Module, task: Any, step: PruneStep, original: dict[str, int], fraction: float, start: int
) -> None:
    """Prune ``model`` (in place) to ``fraction`` of the step's final ratios of the ``original`` units, with
    importance measured now (on training batches from ``start``); nothing when no unit is due to go yet."""
    if step.unstructured is not None:
        prune_(model, UnstructuredPruneConfig(step.unstructured * fraction))
        return
    config = stage_config(original, units(model), step.heads * fraction, step.ffn * fraction)
    if config is not None:
        prune_(model, config, scores=_scores(model, task, step, start))


def _budget(bundle: Bundle, step: PruneStep, out: Path) -> int:
    """The fine-tuning budget in optimizer steps (``finetune_epochs`` resolved with the train settings)."""
    if not step.finetune_epochs:
        return step.finetune_steps
    cfg = train_config(bundle, out, {**step.train, "epochs": step.finetune_epochs, "max_steps": None}, None)
    return make_plan(cfg, bundle.task).total_steps


def prune_once(bundle: Bundle, step: PruneStep, out: Path) -> Path:
    """Prune ``bundle``'s model to the step's ratios and fine-tune it (with the unpruned model as the
    teacher when ``step.distill``): in one cut, or gradually (``step.stages`` cuts on the cubic schedule,
    each followed by its share of the budget, the last by half of it). Writes the bundle at ``out``; its
    record holds the final ratios and, for a gradual run, the schedule."""
    model, task = copy.deepcopy(bundle.model), bundle.task
    start = len(getattr(model, "compression", []))
    original: dict[str, int] = {}
    if step.unstructured is None:
        check_prune(bundle, model, step)  # refuse before any work
        original = units(model)
    total = _budget(bundle, step, out) if step.finetunes else 0
    plan = stage_steps(total, step.stages) if total and step.schedule == "gradual" else [total]
    fractions = gradual_schedule(1.0, len(plan))  # of the step's ratios; exactly 1 at the last cut
    teacher = copy.deepcopy(bundle.model).eval() if total and step.distill else None
    train_dir = out.with_name(out.name + "-train")
    done = 0
    for k, (fraction, steps) in enumerate(zip(fractions, plan, strict=True)):
        _cut(model, task, step, original, fraction, done)
        record = _merge_records(model, start, step, plan, fractions[k])
        log.info("prune stage %d/%d: %s, then %d steps", k + 1, len(plan), _kept(record), steps)
        if not steps:
            break
        last = k == len(plan) - 1
        overrides = step.train if last else {"eval_every": steps, **step.train}  # a stage: its end goes on
        cfg = train_config(bundle, _stage_dir(train_dir, k, plan), overrides, steps)
        stage_task: Any = _Continued(task, done * cfg.grad_accum)
        handles = keep_zeros(model) if step.unstructured is not None else []
        extra = None
        if teacher is not None:  # the unpruned model teaches the pruned one what it lost
            stage_task = DistillTask(
                stage_task,
                teacher,
                model,
                alpha=step.alpha,
                temperature=step.temperature,
                hidden=step.hidden if has_stack(model) else 0.0,  # a CNN has no layer-wise states
                layers=step.hidden_layers,
            )
            extra = stage_task.extra
        try:
            best = fit(stage_task, model, cfg, bundle_seed(bundle), extra=extra)
        finally:
            for h in handles:
                h.remove()
            if teacher is not None:
                stage_task.close()
        (Path(cfg.out_dir) / "checkpoint.safetensors").unlink(missing_ok=True)  # compress does not resume
        done += steps
        model = load_bundle(best, device="cpu").model  # the stage's best goes on
    if step.unstructured is not None:
        model.compression[-1]["measured_sparsity"] = sparsity(model)
    save_bundle(out, model.cpu(), task, _metrics_of(out, train_dir, plan, bundle), bundle_recipe(bundle))
    return out


def _metrics_of(out: Path, train_dir: Path, plan: list[int], bundle: Bundle) -> dict[str, Any]:
    """The metrics the fine-tuned bundle carries (the last stage's best), or the input's without training."""
    if not plan[-1]:
        return bundle.metrics
    last = _stage_dir(train_dir, len(plan) - 1, plan)
    return json.loads((last / "bundle" / "metrics.json").read_text(encoding="utf-8"))


def _stage_dir(train_dir: Path, k: int, plan: list[int]) -> Path:
    return train_dir / f"stage-{k + 1}" if len(plan) > 1 else train_dir


def _merge_records(
    model: nn.Module, start: int, step: PruneStep, plan: list[int], fraction: float
) -> dict[str, Any]:
    """Fold the records this step appended into one: the shapes of the last cut (what a bundle replays),
    the ratios of the original units reached so far (``fraction`` of the step's), and the schedule."""
    records = model.compression[start:]
    if not records:  # no unit was due to go yet (a small model, an early cut)
        return {}
    merged = dict(records[-1])
    fractions = gradual_schedule(1.0, len(plan))
    if step.unstructured is not None:
        merged["sparsity"] = step.unstructured * fraction
    else:
        merged.update(heads=step.heads * fraction, ffn=step.ffn * fraction, importance=step.importance)
    if len(plan) > 1:
        merged["schedule"] = {
            "kind": "gradual",
            "fractions": [round(f, 6) for f in fractions],
            "steps": list(plan),
        }
    model.compression[start:] = [merged]
    return merged


def _kept(record: dict[str, Any]) -> str:
    if not record:
        return "nothing removed yet"
    if record.get("kind") != "structured":
        return f"sparsity {record.get('sparsity', 0):.3f}"
    return f"{sum(record['attention'].values())} heads, {sum(record['feed_forward'].values())} neurons kept"


def run_prune(bundle: Bundle, step: PruneStep, out: Path) -> Path:
    """A prune step: :func:`prune_once`, or with ``max_drop`` the ratio search (:func:`search_ratio`)."""
    if step.max_drop is None:
        return prune_once(bundle, step, out)
    return search_ratio(bundle, step, out)


def search_ratio(bundle: Bundle, step: PruneStep, out: Path) -> Path:
    """The largest pruning ratio within ``step.max_drop`` on the validation split: the step's ratios first,
    then scaled by bisection between the largest within and the smallest outside, each candidate pruned,
    fine-tuned and measured (``step.search_candidates`` in all). Writes the largest within at ``out``, or,
    when none is, the smallest tried with its record saying so; the record lists every candidate."""
    judge = accuracy.Judge(bundle.model, bundle.task)
    reference = judge.reference
    search_dir = out.with_name(out.name + "-search")
    tried: list[dict[str, Any]] = []
    paths: dict[float, Path] = {}

    def attempt(scale: float) -> bool:
        started = time.perf_counter()
        candidate = step.scaled(scale)
        paths[scale] = path = prune_once(bundle, candidate, search_dir / f"{len(tried) + 1}-x{scale:g}")
        quality = judge.quality(load_bundle(path, device="cpu").model.eval())
        lost = accuracy.drop(reference, quality, judge.maximize)
        within = lost <= step.max_drop + 1e-9
        log.info("pruning x%g: %.4f, drop %.3f (limit %g)", scale, quality, lost, step.max_drop)
        tried.append(
            {
                "scale": scale,
                "heads": candidate.heads,
                "ffn": candidate.ffn,
                "unstructured": candidate.unstructured,
                "quality": quality,
                "drop": lost,
                "within_limit": within,
                "seconds": time.perf_counter() - started,
            }
        )
        return within

    accuracy.bisect_scale(attempt, step.search_candidates)
    within = [t for t in tried if t["within_limit"]]
    chosen = max(within, key=lambda t: t["scale"]) if within else min(tried, key=lambda t: t["scale"])
    if not within:
        log.warning(
            "no pruning ratio tried stays within %g on %s (smallest: x%g, drop %.3f); raise max_drop, the "
            "fine-tuning budget or search_candidates",
            step.max_drop,
            judge.split,
            chosen["scale"],
            chosen["drop"],
        )
    b = load_bundle(paths[chosen["scale"]], device="cpu")
    b.model.compression[-1]["ratio_search"] = {
        "metric": judge.task.default_metric,
        "split": judge.split,
        "max_drop": step.max_drop,
        "reference": reference,
        "chosen_scale": chosen["scale"],
        "within_limit": chosen["within_limit"],
        "candidates": tried,
    }
    save_bundle(out, b.model, b.task, b.metrics, bundle_recipe(bundle))
    return out


def check_prune(bundle: Bundle, model: nn.Module, step: PruneStep) -> nn.Module:
    """Structured pruning needs a model whose class declares the parts asked for (``prunable``)."""
    if step.unstructured is None:
        prunable(model, _prune_parts(step))
    return model
