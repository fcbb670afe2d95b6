"""One trial: train a candidate as the sampled settings say, compress it into every variant, measure each.

The trial's folder (``STUDY/trials/NNNN``)::

    train/                  the training run (metrics.jsonl, bundle/; the checkpoint is removed at the end)
    variants/NAME/NN-step   each compression variant's bundles, written by tansuo.variants.run_steps
    trial.json              what the trial recorded (also in the study's storage)

Compression goes through ``tansuo compress``'s own step runners and every variant is measured in a fresh
process by :func:`tansuo.measure.run.measure_in_subprocess`, as ``tansuo compress`` measures.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tansuo.atomic import atomic_write_json, atomic_write_text
from tansuo.errors import RecipeError, TansuoError, TrainingDiverged
from tansuo.explore.pareto import feasible, recommend, value, violations
from tansuo.explore.schema import ExploreSpec, Range

log = logging.getLogger(__name__)


class TrialFailed(Exception):
    """A trial that could not produce any measured model; ``str(e)`` is the reason recorded."""


def suggest(trial: Any, spec: ExploreSpec) -> dict[str, Any]:
    """Sample a trial's settings: the candidate, its model fields and the train fields.

    Returns ``{"candidate", "model", "overrides", "train"}``; the Optuna parameters are ``candidate``,
    ``<candidate>.<field>`` and ``train.<field>``.
    """
    name = trial.suggest_categorical("candidate", list(spec.candidates))
    c = spec.candidates[name]
    overrides = dict(c.overrides)
    for field, p in c.space.items():
        overrides[field] = _suggest(trial, f"{name}.{field}", p)
    train = dict(c.train)
    train.update({field: _suggest(trial, f"train.{field}", p) for field, p in spec.explore.train.items()})
    return {"candidate": name, "model": c.model, "overrides": overrides, "train": train}


def _suggest(trial: Any, name: str, p: Any) -> Any:
    if isinstance(p, list):
        return trial.suggest_categorical(name, p)
    if isinstance(p, Range):
        if p.is_int:
            return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        return trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)
    return p  # a fixed value


def trial_recipe(spec: ExploreSpec, settings: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The raw training recipe of a trial: the base recipe with the candidate and the sampled settings."""
    raw = copy.deepcopy(spec.base)
    model = dict(raw.get("model") or {})
    if model.get("name") != settings["model"]:
        model.pop("init_from", None)  # the base model's weights belong to the base model
    model.update(name=settings["model"], overrides=dict(settings["overrides"]))
    train = dict(raw.get("train") or {})
    if "epochs" in settings["train"]:
        train.pop("max_steps", None)
    if "max_steps" in settings["train"]:
        train.pop("epochs", None)
    train.update(settings["train"], out_dir=str(out_dir))
    raw.update(model=model, train=train)
    return raw


def _train(spec: ExploreSpec, raw: dict[str, Any]) -> tuple[Path, float]:
    """Train as ``tansuo train`` does; returns the best bundle and the training seconds."""
    from tansuo.recipe import validate_recipe
    from tansuo.train.setup import train_recipe

    if spec.explore.nproc_per_node > 1:
        return _train_launched(raw, spec.explore.nproc_per_node)

    # when each phase began: "built" once the task and model exist (the training seconds count from
    # there), "fit" once the trainer's fit starts (only its failures are the trial's to record)
    began: dict[str, float] = {}
    try:
        rec, data_cfg = validate_recipe(raw)
        done = train_recipe(
            rec,
            data_cfg,
            data_root=spec.study_dir / "data",
            on_built=lambda _: began.setdefault("built", time.perf_counter()),
            on_start=lambda _: began.setdefault("fit", time.perf_counter()),
        )
    except RecipeError as e:  # one line for the report's table: "invalid combination: model: ..."
        if "built" in began:
            raise
        reason = " ".join(str(e).removeprefix("invalid recipe:").split())
        raise TrialFailed(f"invalid combination: {reason}") from None
    except TrainingDiverged as e:
        raise TrialFailed(f"NaN loss: {e}") from None
    except (torch.OutOfMemoryError, MemoryError) as e:
        if "fit" not in began:
            raise
        raise TrialFailed(
            f"out of memory while training: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None
    except RuntimeError as e:  # the CPU allocator reports running out of memory as a RuntimeError
        if "fit" not in began or ("can't allocate memory" not in str(e) and "out of memory" not in str(e)):
            raise
        raise TrialFailed(f"out of memory while training: {str(e).splitlines()[0]}") from None
    seconds = time.perf_counter() - began["built"]
    done.trainer.checkpoint_path.unlink(missing_ok=True)  # the bundle is what the study keeps
    return done.bundle, seconds


def _train_launched(raw: dict[str, Any], nproc: int) -> tuple[Path, float]:
    """``tansuo train --nproc-per-node nproc`` on the trial's recipe (written to ``train/recipe.yaml``):
    the ranks are processes of torchrun's launcher; the training seconds include their start."""
    import yaml

    from tansuo.recipe import validate_recipe
    from tansuo.train.launch import LaunchConfig, WorkerFailed, launch

    try:
        validate_recipe(raw)
    except RecipeError as e:
        reason = " ".join(str(e).removeprefix("invalid recipe:").split())
        raise TrialFailed(f"invalid combination: {reason}") from None
    run_dir = Path(raw["train"]["out_dir"])
    recipe = run_dir / "recipe.yaml"
    atomic_write_text(recipe, yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    try:
        launch(LaunchConfig(nproc), ["train", str(recipe), "--quiet"])
    except WorkerFailed as e:  # its own error (a NaN loss, an invalid combination) is in the log above
        raise TrialFailed(f"training on {nproc} processes failed: {e}") from None
    seconds = time.perf_counter() - started
    (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # the bundle is what the study keeps
    return run_dir / "bundle", seconds


def curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """Training loss and validation metrics by step, from a run folder's metrics.jsonl."""
    out: dict[str, list[list[float]]] = {"train_loss": []}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "train":
            out["train_loss"].append([event["step"], event["loss"]])
        elif event.get("event") == "eval":
            for k, v in event.items():
                if k not in ("event", "step", "split") and isinstance(v, int | float):
                    out.setdefault(f"val_{k}", []).append([event["step"], v])
    return out


def run_trial(spec: ExploreSpec, settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Train, compress and measure one candidate; returns the trial's record (also written to trial.json).

    Raises :class:`TrialFailed` when training fails or no variant could be measured; a single variant that
    fails is recorded with its reason and the others go on.
    """
    from tansuo.measure import measure_in_subprocess, speed_in_rounds
    from tansuo.variants import run_steps

    m = spec.explore.measure
    raw = trial_recipe(spec, settings, folder / "train")
    bundle, train_seconds = _train(spec, raw)
    family = spec.families[settings["candidate"]]
    variants: list[dict[str, Any]] = []
    for v in spec.explore.variants:
        if v.families is not None and family not in v.families:
            continue
        entry: dict[str, Any] = {"name": v.name, "steps": [], "status": "ok"}
        started = time.perf_counter()
        try:
            path = bundle
            for _, step_path, done in run_steps(bundle, v.steps, folder / "variants" / v.name):
                path, entry["steps"] = step_path, done
        except (TansuoError, torch.OutOfMemoryError, ValueError, RuntimeError) as e:
            log.warning("trial %s, variant %s failed: %s", folder.name, v.name, e)
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
            variants.append(entry)
            continue
        entry["compress_seconds"] = time.perf_counter() - started
        entry["path"] = str(path)
        variants.append(entry)
    ok = [e for e in variants if e["status"] == "ok"]
    measure = {"reps": m.reps, "large_batch": m.large_batch, "seq_len": m.seq_len}
    for e in ok:
        try:
            e["figures"] = measure_in_subprocess(Path(e["path"]), threads=m.threads, **measure)
        except TansuoError as err:
            e.update(status="failed", reason=str(err))
    ok = [e for e in ok if e["status"] == "ok"]
    if m.rounds > 1:  # speed again in rounds of fresh processes: ratios within the trial
        paths = [Path(e["path"]) for e in ok]
        speed_in_rounds(paths, [e["figures"] for e in ok], rounds=m.rounds, threads=m.threads, **measure)
    if _audited(spec):
        _audit_variants(spec, ok)
    ok = [e for e in ok if e["status"] == "ok"]
    for e in ok:
        f = e["figures"]
        f["train_seconds"] = train_seconds + e["compress_seconds"]
        spent = _epsilon(Path(e["path"]))
        if spent is not None:  # DP-SGD's budget spent by this bundle's training (reports show it)
            f["epsilon"] = spent
        f.pop("bundle", None)
        e["violations"] = violations(f, spec.constraints)
        e["feasible"] = feasible(f, spec.constraints)
    record = {
        "settings": settings,
        "family": family,
        "train_seconds": train_seconds,
        "bundle": str(bundle),
        "variants": variants,
        "curves": curves(folder / "train"),
    }
    atomic_write_json(folder / "trial.json", record)
    if not ok:
        reasons = "; ".join(f"{e['name']}: {e.get('reason')}" for e in variants) or "no variant applies"
        raise TrialFailed(f"no variant could be measured ({reasons})")
    return record


def _audited(spec: ExploreSpec) -> bool:
    """Whether the study judges ``privacy``: only then is every variant audited (it takes a while)."""
    return "privacy" in spec.explore.objectives or any(c.metric == "privacy" for c in spec.constraints)


def _audit_variants(spec: ExploreSpec, variants: list[dict[str, Any]]) -> None:
    """``privacy`` of each measured variant: the membership-inference audit's highest AUC."""
    from tansuo.audit import audit_bundle

    a = spec.explore.audit
    for e in variants:
        try:
            result = audit_bundle(
                Path(e["path"]),
                examples=a.examples,
                reference_models=a.reference_models,
                seed=int(spec.base.get("seed", 0)),
            )
        except TansuoError as err:
            e.update(status="failed", reason=f"audit: {err}")
            continue
        e["figures"]["privacy_auc"] = result["privacy"]


def _epsilon(bundle: Path) -> float | None:
    path = bundle / "metrics.json"
    if not path.is_file():
        return None
    spent = (json.loads(path.read_text(encoding="utf-8")).get("privacy") or {}).get("epsilon")
    return float(spent) if spent is not None else None


def representative(spec: ExploreSpec, record: dict[str, Any]) -> dict[str, Any]:
    """The variant whose figures the trial reports to the sampler: the study's own recommendation rule
    applied to this trial's feasible variants, or to the least infeasible ones when none is feasible."""
    ok = [e for e in record["variants"] if e["status"] == "ok"]
    pool = [e for e in ok if e["feasible"]]
    if not pool:
        least = min(sum(e["violations"]) for e in ok)
        pool = [e for e in ok if sum(e["violations"]) == least]
    figures = [e["figures"] for e in pool]
    picked = recommend(figures, spec.explore.objectives, spec.explore.recommend.max_drop, spec.quality)
    assert picked is not None
    return pool[picked[0]]


def objective_values(spec: ExploreSpec, variant: dict[str, Any]) -> list[float]:
    return [value(variant["figures"], o) for o in spec.explore.objectives]
