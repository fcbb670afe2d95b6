"""What ``tansuo explore`` shows while a study runs: the best quality so far, the size of the Pareto front of
the feasible variants finished so far, and the trial that is running."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from tansuo.explore.pareto import pareto_front, quality_text, value
from tansuo.explore.schema import METRICS, ExploreSpec


def quiet_optuna() -> None:
    """Optuna's own log lines and experimental-feature warnings off (the explore display replaces them)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class StudyProgress:
    """The objective values of the feasible variants of finished trials, and the headline drawn from them."""

    def __init__(self, spec: ExploreSpec) -> None:
        self.spec = spec
        self.seen: list[list[float]] = []  # objective values per feasible variant
        self.qualities: list[float] = []

    def add(self, record: dict[str, Any]) -> None:
        """Count a finished trial's record (its measured variants)."""
        for v in record.get("variants", []):
            if v["status"] == "ok" and v["feasible"]:
                self.seen.append([value(v["figures"], o) for o in self.spec.explore.objectives])
                self.qualities.append(value(v["figures"], "quality"))

    def add_finished(self, study: optuna.Study) -> None:
        """Count the trials a resumed study finished before."""
        for t in study.get_trials(deepcopy=False):
            if "record" in t.user_attrs and t.state == optuna.trial.TrialState.COMPLETE:
                self.add(t.user_attrs["record"])

    def headline(self) -> str:
        """``best accuracy 97.50% · front 3 models`` (the front only with several objectives)."""
        if not self.seen:
            return "no feasible model yet"
        best = max(self.qualities) if self.spec.quality == "maximize" else min(self.qualities)
        q = f"best {METRICS['quality'].title} {quality_text(best, self.spec.quality)}"
        if len(self.spec.explore.objectives) == 1:
            return q
        front = pareto_front(self.seen, self.spec.directions)
        return f"{q} · front {len(front)} models"


def trial_text(info: dict[str, Any]) -> str:
    """``trial 3: vit_digits embed_dim=64 lr=0.003`` for a trial that starts."""
    s = info["settings"]
    shown = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in {**s["overrides"], **s["train"]}.items()
    )
    return f"trial {info['number']}: {s['candidate']} {shown}"
