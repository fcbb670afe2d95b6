"""The study: Optuna storage, sampler, and the loop that asks for trials until the budget is spent.

Storage is SQLite in the study folder by default (``STUDY/optuna.db``); any SQLAlchemy URL works, and
``postgresql://`` lets workers on many machines share one study. The study is created once; ``--resume``
continues it (nothing else may be running it), ``--worker`` joins it (creating it if no one has yet).

A grid study enqueues every grid point when it is created; workers pop waiting trials atomically (the
storage's row update), so no grid point runs twice however many workers there are. A trial interrupted
(Ctrl-C, a kill, a worker whose heartbeat stopped) is recorded as failed with the reason ``interrupted`` and
its parameters are queued again, so the study still covers them; finished trials are never run again.

With several workers a trial budget may be overshot by up to one trial per extra worker (each checks the
count before it asks for a trial); a grid never is.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # the heartbeat study.optimize runs, for ask/tell
from optuna.trial import FrozenTrial, TrialState

from tansuo.atomic import atomic_write_json
from tansuo.errors import TansuoError
from tansuo.explore.schema import ExploreSpec
from tansuo.explore.trial import TrialFailed, objective_values, representative, run_trial, suggest

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
HEARTBEAT_S = 10
GRACE_S = 60
#: the parts of the explore section a resumed or joined study must share with the one that created it
SHARED = ("candidates", "train", "variants", "objectives", "sampler")


class StudyError(TansuoError):
    """The study cannot be created, resumed or joined as asked."""


def redact(url: str) -> str:
    """A storage URL without its password (for study.json and reports)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy parses: shown as given, minus nothing secret)
        return url.split("@")[-1]


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir) / 'optuna.db').resolve()}"


def _with_driver(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; with only psycopg2 installed (tansuo[postgres]),
    name that driver."""
    import importlib.util

    plain = url.startswith("postgresql://")
    if plain and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's SQL storage for ``url``, with a heartbeat that fails (and requeues) a dead worker's trial."""
    url = _with_driver(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # workers on one machine wait for the file lock
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in itertools.count():
        try:
            with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=lambda study, trial: requeue(
                        study, trial, "worker stopped"
                    ),
                )
        except ImportError as e:
            raise StudyError(
                f"storage {redact(url)}: a database driver is missing ({e}); for PostgreSQL install "
                "tansuo[postgres] (psycopg2-binary)"
            ) from None
        except (IntegrityError, ProgrammingError):
            # workers starting together on an empty database race to create Optuna's tables; the loser
            # finds them made on its next attempt
            if attempt >= 4:
                raise
            log.info("storage tables are being created by another process; trying again")
            time.sleep(1.0 + attempt)
        except Exception as e:  # SQLAlchemy's OperationalError and friends: the database cannot be reached
            if "already exists" in str(e) and attempt < 4:  # SQLite's form of the same race
                time.sleep(1.0 + attempt)
                continue
            raise StudyError(f"cannot open storage {redact(url)}: {str(e).splitlines()[0]}") from None


def _sampler(spec: ExploreSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    kind = spec.sampler
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "nsga2":
        trials = spec.explore.budget.trials or 20
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 3)))
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is enqueued; never asked to sample


def study_name(spec: ExploreSpec) -> str:
    return spec.study_dir.resolve().name


def open_study(
    spec: ExploreSpec,
    raw_recipe: dict[str, Any],
    *,
    storage: str | None = None,
    resume: bool = False,
    worker: bool = False,
) -> optuna.Study:
    """Create the study (or continue it with ``resume``, or join it with ``worker``) and write study.json."""
    url = storage or default_storage(spec.study_dir)
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    store = open_storage(url)
    name = study_name(spec)
    seed = spec.explore.seed if spec.explore.seed is not None else int(spec.base.get("seed", 1337))
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(store)}
    if exists and not (resume or worker):
        raise StudyError(
            f"a study named {name!r} already exists in {redact(url)}: continue it with --resume, join it "
            "with --worker, or give another study folder (--out)"
        )
    if not exists and resume:
        raise StudyError(f"--resume: there is no study {name!r} in {redact(url)}; run without --resume")
    created = False
    if not exists:
        try:
            study = optuna.create_study(
                storage=store, study_name=name, directions=spec.directions, sampler=_sampler(spec, seed)
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
            pass
    if created:
        study.set_user_attr("recipe", raw_recipe)
        if spec.sampler == "grid":
            points = spec.grid()
            if spec.explore.budget.trials is not None:
                points = points[: spec.explore.budget.trials]
            for params in points:
                study.enqueue_trial(params)
            log.info("grid of %d points enqueued", len(points))
        study.set_user_attr("ready", True)
    else:
        # workers draw their own random streams; a resumed study moves the recipe's seed on by the trials
        # already run, so that a seeded sampler does not propose its first trials' parameters again
        previous = optuna.load_study(storage=store, study_name=name)
        seed = None if worker else seed + len(previous.get_trials(deepcopy=False))
        study = optuna.load_study(storage=store, study_name=name, sampler=_sampler(spec, seed))
        _wait_ready(study)
        _check_same_search(study, raw_recipe)
        if resume and not worker:  # nothing else runs this study: every running trial was cut short
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                requeue(study, t, "interrupted")
    atomic_write_json(
        spec.study_dir / STUDY_FILE,
        {
            "study_name": name,
            "storage": redact(url),
            "default_storage": storage is None,
            "recipe": raw_recipe,
        },
    )
    return study


def _wait_ready(study: optuna.Study, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not study.user_attrs.get("ready"):
        if time.monotonic() > deadline:
            raise StudyError(
                f"study {study.study_name!r} was created but never set up (its creator stopped?)"
            )
        time.sleep(1.0)
        study = optuna.load_study(storage=study._storage, study_name=study.study_name)


def _check_same_search(study: optuna.Study, raw_recipe: dict[str, Any]) -> None:
    theirs = (study.user_attrs.get("recipe") or {}).get("explore", {})
    ours = raw_recipe.get("explore", {})
    differ = [
        k
        for k in SHARED
        if json.dumps(theirs.get(k), sort_keys=True) != json.dumps(ours.get(k), sort_keys=True)
    ]
    if differ:
        raise StudyError(
            f"the study {study.study_name!r} was created from a recipe whose explore.{differ[0]} differs "
            "from this one; use the same recipe (budget and measure may change), or another study folder"
        )


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Mark a cut-short trial failed with ``reason`` and queue its parameters again (once per trial)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        if trial.state == TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another process finished or failed it first
    # a trial cut short before it sampled anything still holds its enqueued (grid) parameters
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
    log.warning("trial %d %s; its parameters are queued again", trial.number, reason)


def budget_used(study: optuna.Study) -> tuple[int, int]:
    """(trials that count against the budget: finished or running, not interrupted; waiting trials)."""
    used = waiting = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            waiting += 1
        elif t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED) or (
            t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")
        ):
            used += 1
    return used, waiting


def _now() -> float:
    return time.monotonic()


def run_study(
    spec: ExploreSpec,
    study: optuna.Study,
    *,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> int:
    """Run trials until the budget is spent (or, for a grid, none is waiting); returns trials run here."""
    budget = spec.explore.budget
    started = _now()
    ran = 0
    emit = on_event or (lambda kind, info: None)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed and requeued
        used, waiting = budget_used(study)
        if budget.trials is not None and used >= budget.trials and not waiting:
            break
        if spec.sampler == "grid" and not waiting:
            break
        if budget.minutes is not None and _now() - started >= 60 * budget.minutes:
            log.info("the %g-minute budget is spent", budget.minutes)
            break
        with warnings.catch_warnings():  # ask/tell with a heartbeat is what study.optimize does inside
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        folder = (spec.study_dir / "trials" / f"{trial.number:04d}").resolve()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("folder", str(folder))
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                settings = suggest(trial, spec)
                emit("start", {"number": trial.number, "settings": settings})
                record = run_trial(spec, settings, folder)
            except KeyboardInterrupt:
                requeue(study, study._storage.get_trial(trial._trial_id), "interrupted")
                raise
            except TrialFailed as e:
                _fail(study, trial, str(e), emit)
                ran += 1
                continue
            except Exception as e:  # noqa: BLE001 (a bug or an unforeseen error: recorded, logged in full)
                log.exception("trial %d failed", trial.number)
                _fail(study, trial, f"{type(e).__name__}: {e}", emit)
                ran += 1
                continue
            rep = representative(spec, record)
            trial.set_user_attr("record", record)
            trial.set_user_attr("representative", rep["name"])
            if spec.constraints:
                for c, amount in zip(spec.constraints, rep["violations"], strict=True):
                    trial.set_constraint(str(c), amount)  # > 0: infeasible (steers TPE / NSGA-II away)
            study.tell(trial, objective_values(spec, rep))
            ran += 1
            emit("done", {"number": trial.number, "record": record, "representative": rep})
    return ran


def _fail(
    study: optuna.Study, trial: optuna.Trial, reason: str, emit: Callable[[str, dict[str, Any]], None]
) -> None:
    log.warning("trial %d failed: %s", trial.number, reason)
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    emit("failed", {"number": trial.number, "reason": reason})


def load_study_folder(study_dir: Path, storage: str | None = None) -> tuple[optuna.Study, dict[str, Any]]:
    """The study of a study folder (its study.json names the study; ``storage`` replaces a redacted URL)."""
    info_path = Path(study_dir) / STUDY_FILE
    if not info_path.is_file():
        raise StudyError(
            f"{study_dir} is not a study folder (no {STUDY_FILE}); pass the folder explore wrote"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if storage is None:
        if not info.get("default_storage"):
            stored = info["storage"]
            if "***" in stored:
                raise StudyError(f"the study lives in {stored}: pass --storage with the password")
            storage = stored
        else:
            storage = default_storage(study_dir)
    try:
        study = optuna.load_study(storage=open_storage(storage), study_name=info["study_name"])
    except KeyError:
        raise StudyError(f"no study {info['study_name']!r} in {redact(storage)}") from None
    return study, info
