"""Membership-inference attacks on per-example losses, and how well they tell members from non-members.

An attack gives every audited example a score, higher meaning "more likely a training member"; its success is
the area under the ROC curve (0.5: a coin; 1: every member told apart) and the true-positive rate at a 1%
false-positive rate (Carlini et al. 2022, "Membership Inference Attacks From First Principles": what matters
is whether *some* members are exposed with confidence, which an average like the AUC can hide).

- **loss** (Yeom et al. 2018, "Privacy Risk in Machine Learning"): the score is minus the target model's
  loss; a model fits its training examples better than unseen ones.
- **calibrated** (Watson et al. 2022, "On the Importance of Difficulty Calibration in Membership Inference
  Attacks"; the offline, fixed-variance form of Carlini et al.'s LiRA): minus the target's loss *minus* the
  loss of a reference model that did not train on the example. An example that is easy for any model (a
  clean "1") no longer looks like a member only for being easy; what remains is how much better the target
  fits it than a model that never saw it.

The figures are scikit-learn's ``roc_auc_score`` and ``roc_curve``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the false-positive rate the true-positive rate is reported at
LOW_FPR = 0.01


def attack_figures(members: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC, TPR at :data:`LOW_FPR` and the ROC curve of ``scores`` (higher: member) for the 0/1 labels
    ``members``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(members, scores)
    return {
        "auc": float(roc_auc_score(members, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= LOW_FPR].max()),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def loss_scores(losses: np.ndarray) -> np.ndarray:
    """The loss-threshold attack's scores: a lower loss is more likely a member."""
    return -np.asarray(losses, dtype=np.float64)


def calibrated_scores(losses: np.ndarray, reference_losses: np.ndarray) -> np.ndarray:
    """The difficulty-calibrated attack's scores: how much lower the target's loss is than that of a
    reference model that never trained on the example (``reference_losses``, one per example)."""
    return np.asarray(reference_losses, dtype=np.float64) - np.asarray(losses, dtype=np.float64)
