"""A study's results as one JSON-able mapping: every trial, every measured variant, the front, the pick.

Everything comes from the study's storage (trial records are user attributes), so ``tansuo report`` works on
any machine that reaches the storage; only copying the recommended bundle to ``STUDY/best`` needs the folder
the trial ran in.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tansuo.atomic import atomic_write_dir
from tansuo.explore.pareto import pareto_front, recommend, value
from tansuo.explore.schema import METRICS, ExploreSpec

log = logging.getLogger(__name__)


def collect(study: optuna.Study, spec: ExploreSpec, storage: str) -> dict[str, Any]:
    """Gather trials and variants; the Pareto front of the feasible variants; the recommendation."""
    objectives = spec.explore.objectives
    trials: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    threads: set[int] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        record = t.user_attrs.get("record") or {}
        duration = None
        if t.datetime_start and t.datetime_complete:
            duration = (t.datetime_complete - t.datetime_start).total_seconds()
        trials.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": dict(t.params),
                "reason": t.user_attrs.get("fail_reason"),
                "interrupted": bool(t.user_attrs.get("interrupted")),
                "retry_of": t.user_attrs.get("retry_of"),
                "seconds": duration,
                "host": t.user_attrs.get("host"),
                "candidate": (record.get("settings") or {}).get("candidate") or t.params.get("candidate"),
                "settings": record.get("settings"),
                "train_seconds": record.get("train_seconds"),
                "scaling": record.get("scaling"),  # N, D, FLOPs, MFU: what tansuo plan fits
                "curves": record.get("curves", {}),
                "representative": t.user_attrs.get("representative"),
            }
        )
        if t.state != TrialState.COMPLETE:
            continue
        for v in record.get("variants", []):
            row = {
                "id": f"{t.number}/{v['name']}",
                "trial": t.number,
                "candidate": record["settings"]["candidate"],
                "family": record.get("family"),
                "model": record["settings"]["model"],
                "overrides": record["settings"]["overrides"],
                "train": record["settings"]["train"],
                "variant": v["name"],
                "steps": v.get("steps", []),
                "status": v["status"],
                "reason": v.get("reason"),
                "path": v.get("path"),
                "host": t.user_attrs.get("host"),
            }
            if v["status"] == "ok":
                f = v["figures"]
                threads.add(int(f.get("threads", 0)))
                row.update(
                    figures=f,
                    values={
                        **{name: value(f, name) for name in METRICS if METRICS[name].key in f},
                        **({"epsilon": f["epsilon"]} if "epsilon" in f else {}),  # shown, not judged
                    },
                    feasible=v["feasible"],
                    violations=v["violations"],
                )
            rows.append(row)
    measured = [r for r in rows if r["status"] == "ok"]
    ok = [r for r in measured if r["feasible"]]
    directions = spec.directions
    front = pareto_front([[r["values"][o] for o in objectives] for r in ok], directions)
    for r in measured:
        r["pareto"] = False
    for i in front:
        ok[i]["pareto"] = True
    picked = recommend([r["figures"] for r in ok], objectives, spec.explore.recommend.max_drop, spec.quality)
    recommended, why = None, None
    if picked is not None:
        recommended, why = ok[picked[0]]["id"], picked[1]
    elif measured:
        why = f"no measured model meets the constraints ({', '.join(map(str, spec.constraints))})"
    else:
        why = "no trial finished with a measured model"
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "fail", "running")}
    first = measured[0]["figures"] if measured else {}
    return {
        "study": study.study_name,
        "storage": storage,
        "task": spec.base.get("task"),
        "metric": first.get("metric", "quality"),
        "split": first.get("split"),
        "objectives": objectives,
        "directions": directions,
        "quality_direction": spec.quality,
        "constraints": [str(c) for c in spec.constraints],
        "sampler": spec.sampler,
        "max_drop": spec.explore.recommend.max_drop,
        "measure": {**spec.explore.measure.model_dump(), "threads_recorded": sorted(threads)},
        "counts": counts,
        "trials": trials,
        "variants": rows,
        "pareto": [ok[i]["id"] for i in front],
        "recommended": recommended,
        "why": why,
    }


def copy_best(results: dict[str, Any], study_dir: Path) -> Path | None:
    """Copy the recommended bundle to ``STUDY/best`` (atomically); None when there is none or it lives on
    another machine (the results name its host and path)."""
    rid = results.get("recommended")
    if rid is None:
        return None
    row = next(r for r in results["variants"] if r["id"] == rid)
    src = Path(row["path"])
    if not (src / "config.json").is_file():
        log.warning(
            "the recommended bundle %s is not on this machine (trial ran on %s)", src, row.get("host")
        )
        return None
    dst = Path(study_dir) / "best"

    def build(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)

    atomic_write_dir(dst, build)
    return dst


def finish_study(
    study: optuna.Study, spec: ExploreSpec, storage: str, *, copy: bool = True
) -> tuple[dict[str, Any], dict[str, Path], Path | None]:
    """Collect a study's results, write report.html / report.md / results.json and copy the recommended
    bundle to ``best/`` (``copy``); returns the results, the report paths and the copy (None without one)."""
    from tansuo.explore.report import write_report

    results = collect(study, spec, storage)
    paths = write_report(results, spec.study_dir)
    best = copy_best(results, spec.study_dir) if copy else None
    return results, paths, best
