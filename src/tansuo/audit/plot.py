"""The ROC plot of an audit as a PNG (matplotlib, imported only here, on its file backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tansuo.atomic import atomic_write


def write_roc_png(path: Path, attacks: dict[str, dict[str, Any]], title: str) -> Path:
    """Each attack's ROC curve on log-log axes (the low false-positive corner is where exposure shows, as
    Carlini et al. 2022 plot it), with the chance diagonal; written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1e-3
    for name, figures in attacks.items():
        fpr = [max(v, floor) for v in figures["roc"]["fpr"]]
        tpr = [max(v, floor) for v in figures["roc"]["tpr"]]
        ax.plot(fpr, tpr, label=f"{name}: AUC {figures['auc']:.3f}, TPR@1% {figures['tpr_at_1pct_fpr']:.3f}")
    ax.plot([floor, 1], [floor, 1], linestyle="--", color="grey", label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), title=title)
    ax.set(xlabel="false-positive rate (non-members called members)", ylabel="true-positive rate")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
