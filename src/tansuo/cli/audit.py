"""``tansuo audit``: a membership-inference audit of a bundle (AUC and TPR at 1% FPR, ROC plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import console, setup_logging


def audit(
    bundle: Annotated[Path, typer.Argument(help="the bundle folder to audit")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="folder for audit.json, roc.png and the reference runs; default: BUNDLE/../audit"
        ),
    ] = None,
    examples: Annotated[
        int, typer.Option("--examples", min=1, help="training members audited, and as many held-out examples")
    ] = 1000,
    reference_models: Annotated[
        int,
        typer.Option(
            "--reference-models",
            min=0,
            help="reference models trained with the bundle's recipe for the calibrated attack (2+; each "
            "costs one training run); 0: the loss attack only",
        ),
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="picks the audited examples and the folds")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
    data: Annotated[
        str | None, typer.Option("--data", help="the data file, when it has moved since training")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Audit what a bundle leaks about its training data: a loss-threshold attack and a difficulty-calibrated
    attack (reference models trained without each example) try to tell training members from held-out
    examples. Prints each attack's AUC (0.5: nothing leaks) and its true-positive rate at 1% false
    positives; writes audit.json and roc.png."""
    setup_logging(verbose)
    from tansuo.audit import audit_bundle

    folder = out if out is not None else bundle.resolve().parent / "audit"
    result = audit_bundle(
        bundle, examples=examples, reference_models=reference_models, seed=seed, out=folder, device=device,
        data_path=data,
    )  # fmt: skip
    eps = result["epsilon"]
    spent = "trained without privacy" if eps is None else f"epsilon {eps:.3g} at delta {result['delta']:g}"
    console.print(
        f"{bundle}: {result['examples']} {result['member_split']} members against {result['examples']} "
        f"{result['non_member_split']} non-members ({spent})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for name, a in result["attacks"].items():
        console.print(
            f"  {name:<11} AUC {a['auc']:.4f}   TPR at 1% FPR {a['tpr_at_1pct_fpr']:.4f}",
            markup=False,
            highlight=False,
        )
    console.print(f"privacy (highest AUC): {result['privacy']:.4f}", markup=False, highlight=False)
    files = result["files"]
    console.print(f"wrote {files['audit']} and {files['roc']}", markup=False, highlight=False)
