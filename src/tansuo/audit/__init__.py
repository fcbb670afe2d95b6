"""The membership-inference audit (``tansuo audit``): attacks on per-example losses (``attacks.py``), the
audit of a bundle with its reference models (``run.py``) and its ROC plot (``plot.py``)."""

from tansuo.audit.attacks import attack_figures, calibrated_scores, loss_scores
from tansuo.audit.run import audit_bundle, example_losses

__all__ = ["attack_figures", "audit_bundle", "calibrated_scores", "example_losses", "loss_scores"]
