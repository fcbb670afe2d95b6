"""The privacy-utility curve: test accuracy and membership-inference AUC at epsilon 1, 3, 8 and without DP.

What is measured: ``recipes/mnist-dp.yaml`` (a small ViT on 5,000 MNIST digits, DP-SGD with the PRV
accountant at delta 1e-5) trained through the library as ``tansuo train`` does, once per epsilon (``inf``:
the same recipe without ``train.privacy``, the non-private baseline), for each model asked for (``vit``: the
recipe's; ``cnn``: ``resnet_mnist``, whose BatchNorm DP-SGD refuses: the refusal is what is reported for it
under privacy). Each bundle is then audited as ``tansuo audit`` does (the loss attack; ``--reference-models
2`` adds the calibrated attack at the cost of two more trainings per point).

Printed (and written to ``<out>/bench.json``): per model and epsilon, the epsilon actually spent, test
accuracy, the audit's AUC and TPR at 1% FPR, and training seconds. Targets (issue 19): at epsilon 3 within 5
points of the non-private accuracy; the AUC falls toward 0.5 as epsilon falls. Published anchor: Opacus'
MNIST example, 96.78% at epsilon 2.91 against 98.94% without privacy (60,000 images).

Run from the repository root::

    .venv/bin/python bench/privacy.py --data-dir ../shared/data/mnist-5k
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from _common import fail

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "mnist-dp.yaml"
MODELS = {"vit": None, "cnn": "resnet_mnist"}  # None: the recipe's own model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accuracy and membership-inference AUC by epsilon, MNIST-5k.")
    p.add_argument("--data-dir", type=Path, required=True, help="the folder holding mnist_5k.csv.gz")
    p.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    p.add_argument("--epsilons", default="1,3,8,inf", help="comma-separated; inf: no privacy")
    p.add_argument("--models", default="vit,cnn", help="comma-separated among " + ", ".join(MODELS))
    p.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs (smoke runs)")
    p.add_argument("--reference-models", type=int, default=0, help="audit's reference models (0 or 2+)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="recipe overrides (FIELD=VALUE)")
    return p.parse_args(argv)


def one_point(args: argparse.Namespace, model: str, eps: float) -> dict[str, Any]:
    from tansuo.audit import audit_bundle
    from tansuo.errors import RecipeError
    from tansuo.recipe import load_recipe
    from tansuo.train.setup import train_recipe

    out = args.out / f"{model}-eps{eps:g}"
    sets = [*args.sets, f"train.out_dir={out}"]
    if MODELS[model] is not None:
        sets += [f"model.name={MODELS[model]}", "model.overrides={}"]
    if math.isinf(eps):
        sets.append("train.privacy=null")
    else:
        sets.append(f"train.privacy.target_epsilon={eps}")
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    rec, data = load_recipe(RECIPE, sets, args.data_dir)
    row: dict[str, Any] = {"model": model, "target_epsilon": eps}
    started = time.perf_counter()
    try:
        done = train_recipe(rec, data)
    except RecipeError as e:  # a model DP-SGD cannot train: its refusal is the figure
        row["refused"] = str(e)
        return row
    row["train_seconds"] = time.perf_counter() - started
    row["test_accuracy"] = done.result["test"]["accuracy"]
    row["epsilon"] = (done.result.get("privacy") or {}).get("epsilon")
    audit = audit_bundle(done.bundle, reference_models=args.reference_models, out=out / "audit")
    for name, a in audit["attacks"].items():
        row[f"{name}_auc"] = a["auc"]
        row[f"{name}_tpr_at_1pct_fpr"] = a["tpr_at_1pct_fpr"]
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.data_dir / "mnist_5k.csv.gz").is_file():
        fail(f"{args.data_dir}/mnist_5k.csv.gz not found; pass --data-dir ../shared/data/mnist-5k")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        fail(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows = []
    for model in models:
        for eps in epsilons:
            row = one_point(args, model, eps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    head = ("target eps", "spent", "test acc", "loss AUC", "TPR@1%", "train s")
    print(f"\n{'model':<5} {head[0]:>10} {head[1]:>7} {head[2]:>9} {head[3]:>9} {head[4]:>7} {head[5]:>8}")
    for r in rows:
        if "refused" in r:
            print(f"{r['model']:<5} {r['target_epsilon']:>10g}  refused: {r['refused'].splitlines()[0][:90]}")
            continue
        spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(
            f"{r['model']:<5} {r['target_epsilon']:>10g} {spent:>7} {100 * r['test_accuracy']:>8.2f}% "
            f"{r['loss_auc']:>9.4f} {r['loss_tpr_at_1pct_fpr']:>7.3f} {r['train_seconds']:>8.0f}"
        )


if __name__ == "__main__":
    main()
