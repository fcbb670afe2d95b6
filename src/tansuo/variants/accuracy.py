"""Accuracy-aware int8, the way Intel Neural Compressor tunes: when the whole-model int8 variant loses more
quality on the validation split than the step allows, the Linear layers most hurt by int8 stay in fp32, one
at a time, until the model is within the limit.

Sensitivity of a layer is measured by quantizing it alone and comparing the model's logits on calibration
batches with fp32's (the signal-to-noise ratio in dB; the lower, the more sensitive). The search then adds
layers to the fp32 set in that order and evaluates each variant on the validation split, stopping at the
first within the limit: the fastest such variant, since every further fp32 layer costs speed.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tansuo.compress import Int8DynamicConfig, quantize_
from tansuo.tasks.base import Task
from tansuo.train.trainer import metric_mode

log = logging.getLogger(__name__)


def drop(reference: float, value: float, maximize: bool) -> float:
    """Quality lost from ``reference`` to ``value``: points (x100) for metrics that go up (accuracy), the
    metric's own units for those that go down (a loss)."""
    return 100.0 * (reference - value) if maximize else value - reference


def rank_layers(names: list[str], snr_alone: Callable[[str], float]) -> list[tuple[str, float]]:
    """Each layer with the SNR (dB) of the model's logits when it alone is int8, most sensitive first."""
    scored = [(name, snr_alone(name)) for name in names]
    return sorted(scored, key=lambda kv: kv[1])


@dataclass
class FallbackStep:
    fp32_layers: list[str]
    quality: float
    drop: float
    seconds: float


@dataclass
class Fallback:
    """The search's outcome: ``model`` is the first variant within the limit, or None when none was."""

    model: nn.Module | None
    fp32_layers: list[str]
    steps: list[FallbackStep] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "fp32_layers": list(self.fp32_layers),
            "within_limit": self.model is not None,
            "steps": [
                {"fp32": s.fp32_layers[-1], "quality": s.quality, "drop": s.drop, "seconds": s.seconds}
                for s in self.steps
            ],
        }


def fallback_search(
    order: list[str],
    build: Callable[[list[str]], nn.Module],
    quality: Callable[[nn.Module], float],
    reference: float,
    max_drop: float,
    *,
    maximize: bool = True,
    max_layers: int = 8,
) -> Fallback:
    """Keep ``order``'s layers in fp32 one more at a time (``build(fp32_layers)`` makes the int8 variant),
    stopping at the first variant whose ``quality`` is within ``max_drop`` of ``reference``; at most
    ``max_layers`` layers. Never returns a model outside the limit (``model`` is None then)."""
    kept: list[str] = []
    steps: list[FallbackStep] = []
    for name in order[:max_layers]:
        kept.append(name)
        started = time.perf_counter()
        model = build(list(kept))
        q = quality(model)
        d = drop(reference, q, maximize)
        steps.append(FallbackStep(list(kept), q, d, time.perf_counter() - started))
        log.info("int8 with %d layer(s) in fp32 (+%s): quality %.4f, drop %.3f", len(kept), name, q, d)
        if d <= max_drop + 1e-9:
            return Fallback(model, kept, steps)
    return Fallback(None, kept, steps)


def bisect_scale(within: Callable[[float], bool], candidates: int) -> list[tuple[float, bool]]:
    """The ratio search of accuracy-aware pruning: ``within(scale)`` builds and measures the variant at
    ``scale`` times the largest ratio and says whether it stays within the limit. Tries 1 first (stopping
    there when it is within), then bisects between the largest scale within (0 at first) and the smallest
    outside; ``candidates`` tries in all. Returns every (scale, within) tried, in order."""
    lo, hi, scale = 0.0, 1.0, 1.0
    tried: list[tuple[float, bool]] = []
    for _ in range(candidates):
        ok = within(scale)
        tried.append((scale, ok))
        if ok and scale == 1.0:
            break
        lo, hi = (scale, hi) if ok else (lo, scale)
        scale = (lo + hi) / 2
    return tried


class Judge:
    """The quality of int8 variants of ``model`` against it, on the task's validation split."""

    def __init__(self, model: nn.Module, task: Task, split: str = "val") -> None:
        self.model, self.task, self.split = model, task, split
        self.maximize = metric_mode(task.default_metric) == "max"
        self._reference: float | None = None

    def quality(self, model: nn.Module) -> float:
        with torch.inference_mode():
            metrics = self.task.evaluate(model, self.split, 64, torch.device("cpu"))
        return float(metrics[self.task.default_metric]) / self.task.quality_scale

    @property
    def reference(self) -> float:
        if self._reference is None:
            self._reference = self.quality(self.model)
        return self._reference

    def drop_of(self, model: nn.Module) -> float:
        return drop(self.reference, self.quality(model), self.maximize)

    def _int8(self, config: Int8DynamicConfig, quantized: set[str], absmax: Any = None) -> nn.Module:
        m = copy.deepcopy(self.model)
        quantize_(m, config, filter_fn=lambda _, name: name in quantized, input_absmax=absmax)
        return m

    def fallback(
        self,
        qmodel: nn.Module,
        step: Any,
        snr_of: Callable[[nn.Module], float],
        input_absmax: dict[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """``qmodel`` (the whole-model torch int8 variant) if within ``step.max_drop``; else the first variant
        with the most sensitive layers in fp32 that is, or (none within) the last one tried, its record
        saying so. The record's ``accuracy_aware`` entry tells what each step cost and bought.
        ``input_absmax``: the calibration a smoothed ``qmodel`` was built with."""
        record = qmodel.compression[-1]
        whole = self.quality(qmodel)
        info: dict[str, Any] = {
            "metric": self.task.default_metric,
            "split": self.split,
            "max_drop": step.max_drop,
            "fp32": self.reference,
            "whole_model": whole,
            "whole_model_drop": drop(self.reference, whole, self.maximize),
        }
        if info["whole_model_drop"] <= step.max_drop + 1e-9:
            record["accuracy_aware"] = {**info, "fp32_layers": [], "within_limit": True, "steps": []}
            return qmodel
        started = time.perf_counter()
        config = Int8DynamicConfig(record["reduce_range"], record["per_sample"], record.get("smooth"))
        names = list(record["modules"])
        absmax = input_absmax if config.smooth is not None else None
        ranked = rank_layers(names, lambda name: snr_of(self._int8(config, {name}, absmax)))
        order = [name for name, _ in ranked]
        built: dict[tuple[str, ...], nn.Module] = {}

        def build(fp32: list[str]) -> nn.Module:
            built[tuple(fp32)] = m = self._int8(config, set(names) - set(fp32), absmax)
            return m

        result = fallback_search(
            order,
            build,
            self.quality,
            self.reference,
            step.max_drop,
            maximize=self.maximize,
            max_layers=step.max_fp32_layers,
        )
        chosen = result.model if result.model is not None else built[tuple(result.fp32_layers)]
        info.update(result.record())
        info["sensitivity_db"] = dict(ranked[: 2 * step.max_fp32_layers])
        info["search_seconds"] = time.perf_counter() - started
        if result.model is None:
            log.warning(
                "int8 stays %.3f over the limit with %d layers in fp32; raise max_fp32_layers or max_drop",
                result.steps[-1].drop - step.max_drop,
                len(result.fp32_layers),
            )
        chosen.compression[-1]["accuracy_aware"] = info
        return chosen

    def drop_if_outside(self, candidates: dict[str, nn.Module], name: str, max_drop: float) -> None:
        """Remove ``candidates[name]`` when it loses more than ``max_drop`` (another candidate remains)."""
        d = self.drop_of(candidates[name])
        if d > max_drop + 1e-9:
            log.info("int8 on %s drops %.3f on %s (limit %g): not kept", name, d, self.split, max_drop)
            del candidates[name]
