"""The study's bookkeeping without training: sampling settings, trial recipes, requeueing cut-short trials,
the budget count, and the storage checks of create / resume / join."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from tansuo.explore.search import StudyError, budget_used, open_study, redact, requeue
from tansuo.explore.trial import suggest, trial_recipe
from tests.explore.helpers import explore_raw, record, spec_for


def test_suggest_and_trial_recipe_merge_candidate_settings(tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path,
        candidates=[{"model": "vit_test", "space": {"embed_dim": [8, 16]}, "train": {"max_steps": 7}}],
        train={"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": [1, 2]},
        sampler="tpe",
        budget={"trials": 2},
    )
    params = {"candidate": "vit_test", "vit_test.embed_dim": 16, "train.lr": 0.004, "train.epochs": 2}
    settings = suggest(FixedTrial(params), spec)
    assert settings == {
        "candidate": "vit_test",
        "model": "vit_test",
        "overrides": {"embed_dim": 16},
        "train": {"max_steps": 7, "lr": 0.004, "epochs": 2},
    }
    raw = trial_recipe(spec, settings, tmp_path / "t")
    assert raw["model"] == {"name": "vit_test", "overrides": {"embed_dim": 16}}
    assert raw["train"]["lr"] == 0.004 and raw["train"]["out_dir"] == str(tmp_path / "t")
    assert raw["train"]["batch_size"] == 16  # the base recipe's
    assert "explore" not in raw


def test_requeue_fails_the_trial_and_queues_its_parameters_once() -> None:
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_categorical("candidate", ["a", "b"])
    frozen = study._storage.get_trial(trial._trial_id)
    requeue(study, frozen, "interrupted")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    failed, waiting = study.get_trials()
    assert failed.user_attrs == {"fail_reason": "interrupted", "interrupted": True}
    assert waiting.user_attrs["retry_of"] == 0
    assert budget_used(study) == (0, 1)  # the interrupted trial does not count; its retry is waiting
    again = study.ask()  # the retry is popped first, with the same parameters
    assert (
        again.number == 1 and again.suggest_categorical("candidate", ["a", "b"]) == frozen.params["candidate"]
    )
    study.tell(again, 1.0)
    study.tell(study.ask(), state=TrialState.FAIL)  # an ordinary failure counts
    assert budget_used(study) == (2, 0)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # this test asks for a trial itself
def test_create_resume_and_join_rules(tmp_path: Path) -> None:
    raw = explore_raw(tmp_path / "bars.npz", tmp_path / "study")
    spec = spec_for(tmp_path)
    with pytest.raises(StudyError, match="no study"):
        open_study(spec, raw, resume=True)
    study = open_study(spec, raw)
    assert budget_used(study) == (0, 3)  # the 3-point grid is enqueued
    with pytest.raises(StudyError, match="--resume"):
        open_study(spec, raw)
    running = study.ask()  # a trial that was running when its process died
    resumed = open_study(spec, raw, resume=True)
    assert [t.state for t in resumed.get_trials()][running.number] == TrialState.FAIL
    assert budget_used(resumed) == (0, 3)  # its grid point is waiting again
    changed = explore_raw(tmp_path / "bars.npz", tmp_path / "study", objectives=["quality"])
    with pytest.raises(StudyError, match="explore.objectives differs"):
        open_study(spec, changed, worker=True)
    assert (tmp_path / "study" / "study.json").is_file()


def test_storage_urls_lose_their_password() -> None:
    assert redact("postgresql://ann:secret@db:5432/tansuo") == "postgresql://ann:***@db:5432/tansuo"
    assert "secret" not in redact("postgresql://ann:secret@db/x")


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path: Path, monkeypatch) -> None:
    import tansuo.explore.search as search
    from tansuo.explore.trial import TrialFailed

    raw = explore_raw(tmp_path / "bars.npz", tmp_path / "study")
    spec = spec_for(tmp_path)
    bundle = tmp_path / "bundle"

    def fake_run_trial(spec, settings, folder):
        if settings["overrides"].get("embed_dim") == 8:
            raise TrialFailed("NaN loss: loss became nan at step 3")
        if settings["candidate"] == "resnet_test":
            raise ValueError("a bug")  # unforeseen errors are recorded too, with their type
        return record(spec, "vit_test", settings["overrides"], {"plain": (0.9, 1.0, 0.1)}, bundle)

    monkeypatch.setattr(search, "run_trial", fake_run_trial)
    events = []
    study = open_study(spec, raw)
    assert search.run_study(spec, study, on_event=lambda kind, info: events.append(kind)) == 3
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"].startswith("NaN loss")
    assert trials[2].user_attrs["fail_reason"] == "ValueError: a bug"
    assert trials[1].values == pytest.approx([0.9, 1.0])
    assert events == ["start", "failed", "start", "done", "start", "failed"]


def test_training_failures_become_trial_failures(image_npz: Path, tmp_path: Path, monkeypatch) -> None:
    from tansuo.errors import TrainingDiverged
    from tansuo.explore.trial import TrialFailed, _train
    from tansuo.train.trainer import Trainer

    spec = spec_for(tmp_path)
    spec.base["data"]["path"] = str(image_npz)
    settings = {"candidate": "vit_test", "model": "vit_test", "overrides": {"num_heads": 3}, "train": {}}
    with pytest.raises(TrialFailed, match="invalid combination.*divisible"):
        _train(spec, trial_recipe(spec, settings, tmp_path / "a"))
    settings["overrides"] = {}
    for error, reason in (
        (TrainingDiverged("loss became nan at step 2"), "NaN loss"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"),
            "out of memory",
        ),
    ):

        def fit(self, resume=False, error=error):
            raise error

        monkeypatch.setattr(Trainer, "fit", fit)
        with pytest.raises(TrialFailed, match=reason):
            _train(spec, trial_recipe(spec, settings, tmp_path / "b"))


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_sampled_studies_spend_their_trial_budget_with_constraints(
    tmp_path: Path, monkeypatch, sampler: str
) -> None:
    import tansuo.explore.search as search

    extra = {
        "sampler": sampler,
        "budget": {"trials": 4},
        "constraints": ["latency <= 1.5"],
        "train": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}},
    }
    raw = explore_raw(tmp_path / "bars.npz", tmp_path / "study", **extra)
    spec = spec_for(tmp_path, **extra)

    def fake_run_trial(spec, settings, folder):  # slower models for larger lr: some break the constraint
        latency = 1.0 + 100 * settings["train"]["lr"]
        return record(
            spec, settings["candidate"], settings["overrides"], {"plain": (0.9, latency, 0.1)}, folder
        )

    monkeypatch.setattr(search, "run_trial", fake_run_trial)
    study = open_study(spec, raw)
    assert search.run_study(spec, study) == 4
    assert search.run_study(spec, study) == 0  # the budget counts the whole study, not one run
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        (violation,) = [v for k, v in t.system_attrs.items() if k.startswith("constraints")]
        assert violation == pytest.approx(max(0.0, 100 * t.params["train.lr"] - 0.5))


def _trials_measure_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trial "runs" at once and records one variant with the same made-up figures."""
    import tansuo.explore.search as search

    monkeypatch.setattr(
        search,
        "run_trial",
        lambda spec, s, folder: record(
            spec, s["candidate"], s["overrides"], {"plain": (0.9, 1.0, 0.1)}, folder
        ),
    )


def test_the_minutes_budget_stops_new_trials(tmp_path: Path, monkeypatch) -> None:
    import tansuo.explore.search as search

    extra = {"sampler": "tpe", "budget": {"minutes": 1}}
    raw = explore_raw(tmp_path / "bars.npz", tmp_path / "study", **extra)
    spec = spec_for(tmp_path, **extra)
    clock = iter([0.0, 30.0, 61.0, 62.0])  # start, before trial 0, before trial 1 (past the minute), ...
    monkeypatch.setattr(search, "_now", lambda: next(clock))
    _trials_measure_alike(monkeypatch)
    assert search.run_study(spec, open_study(spec, raw)) == 1


def test_a_resumed_seeded_study_does_not_propose_its_first_trials_again(tmp_path: Path, monkeypatch) -> None:
    import tansuo.explore.search as search

    extra = {
        "sampler": "tpe",
        "budget": {"trials": 2},
        "train": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
    }
    raw = explore_raw(tmp_path / "bars.npz", tmp_path / "study", **extra)
    spec = spec_for(tmp_path, **extra)
    _trials_measure_alike(monkeypatch)
    assert search.run_study(spec, open_study(spec, raw)) == 2
    spec.explore.budget.trials = 4
    study = open_study(spec, raw, resume=True)
    assert search.run_study(spec, study) == 2
    lrs = [t.params["train.lr"] for t in study.get_trials()]
    assert len(set(lrs)) == 4, lrs


@pytest.mark.slow  # two launches of two processes
def test_a_trial_trains_on_several_processes(image_npz: Path, tmp_path: Path) -> None:
    from tansuo.explore.trial import TrialFailed, _train

    spec = spec_for(tmp_path, nproc_per_node=2)
    spec.base["data"]["path"] = str(image_npz)
    settings = {"candidate": "vit_test", "model": "vit_test", "overrides": {}, "train": {"max_steps": 4}}
    raw = trial_recipe(spec, settings, tmp_path / "a" / "train")
    bundle, seconds = _train(spec, raw)
    assert (bundle / "model.safetensors").is_file() and seconds > 0
    assert not (tmp_path / "a" / "train" / "checkpoint.safetensors").exists()
    events = (tmp_path / "a" / "train" / "metrics.jsonl").read_text().splitlines()
    assert '"step": 4' in events[-1]

    settings["overrides"] = {"num_heads": 3}  # fails in the ranks, when the model is built
    with pytest.raises(TrialFailed, match="training on 2 processes failed: rank [01] failed"):
        _train(spec, trial_recipe(spec, settings, tmp_path / "b" / "train"))
