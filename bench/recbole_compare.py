"""SASRec on MovieLens-100k, tansuo's beside RecBole 1.2.1's, on the identical split.

What is measured: u.data is converted to RecBole's atomic format (``<out>/atomic/ml100k_tansuo/
ml100k_tansuo.inter``: ``user_id:token item_id:token rating:float timestamp:float``) and both libraries read
that one file. RecBole
(in its own virtual environment, ``make recbole``; never a tansuo dependency) trains its SASRec with its
defaults for ``--epochs`` (``bench/_recbole_worker.py``); tansuo trains ``recipes/ml100k-sasrec.yaml`` on the
same file for ``--tansuo-epochs`` (default: the same). Both split leave-one-out by time (RecBole's ``LS:
valid_and_test``, ``order: TO``), cut histories to 50 items, train with the softmax cross-entropy and
validate NDCG@10 every epoch.

Printed (and written to ``<out>/bench.json``): test HR@10 and NDCG@10 under full ranking and against 100
sampled negatives, for both; the wall time per epoch (training only) and in total. Two full-ranking columns
for tansuo: with the user's seen items removed (tansuo's default, the figure a user of the recommendations
cares about) and without (what RecBole 1.2.1 does for sequential models: its full-sort evaluation masks
history items only for general, non-sequential models), so the comparison with RecBole is like for like.
Also: when tansuo's validation HR@10 first reached RecBole's last-epoch validation HR@10 (its wall time).

Run from the repository root (RecBole's venv first: ``make recbole``)::

    .venv/bin/python bench/recbole_compare.py --data-dir ../shared/data/movielens-100k --epochs 5

``--users N`` keeps the first N users of u.data (a smoke run in minutes; the figures are not the data set's),
``--skip-recbole`` runs tansuo alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_progress,
    add_sets,
    add_threads,
    check_positive,
    fail,
    training_bench_main,
    training_start,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "recipes" / "ml100k-sasrec.yaml"
RECBOLE_VENV = HERE / ".venv-recbole"
# not "ml-100k": for that name RecBole 1.2.1 reads the copy inside its wheel, whatever data_path says
DATASET = "ml100k_tansuo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SASRec on MovieLens-100k: tansuo beside RecBole 1.2.1.")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/movielens-100k"),
        help="folder holding u.data and u.item (default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=5, help="RecBole's epochs (default: %(default)s)")
    p.add_argument("--tansuo-epochs", type=float, default=None, help="tansuo's epochs (default: --epochs)")
    p.add_argument("--users", type=int, default=None, help="keep the first N users (smoke runs)")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="tansuo's recipe (default: %(default)s)")
    p.add_argument("--out", default="runs/bench-recbole", help="run folder (default: %(default)s)")
    p.add_argument("--recbole-venv", type=Path, default=RECBOLE_VENV, help="RecBole's venv (make recbole)")
    p.add_argument("--skip-recbole", action="store_true", help="run tansuo alone")
    p.add_argument("--seed", type=int, default=2020, help="RecBole's seed (its default: %(default)s)")
    add_threads(p, "torch threads for both (default: 2)", default=2)
    add_progress(p)
    add_sets(p, " (tansuo's recipe)")
    args = p.parse_args(argv)
    check_positive(p, args, "epochs", "tansuo_epochs", "users", "threads")
    return args


def write_atomic(data_dir: Path, folder: Path, users: int | None) -> tuple[Path, int]:
    """u.data as RecBole's atomic ``DATASET.inter`` in ``folder/DATASET/`` (the first ``users`` users when
    given); returns the file and its number of interactions."""
    source = data_dir / "u.data"
    if not source.is_file():
        fail(f"{source} not found; pass --data-dir to the MovieLens-100k folder (u.data, u.item)")
    rows = [line.split("\t") for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if users is not None:
        kept = list(dict.fromkeys(r[0] for r in rows))[:users]
        keep = set(kept)
        rows = [r for r in rows if r[0] in keep]
    target = folder / DATASET / f"{DATASET}.inter"
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] + ["\t".join(r) for r in rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target, len(rows)


def run_recbole(args: argparse.Namespace, atomic: Path, out_dir: Path) -> dict[str, Any]:
    python = args.recbole_venv / "bin" / "python"
    if not python.is_file():
        fail(
            f"RecBole's virtual environment is missing ({python}); run `make recbole`, or pass --skip-recbole"
        )
    spec = {
        "data_path": str(atomic.resolve()),
        "dataset": DATASET,
        "checkpoint_dir": str((out_dir / "recbole-saved").resolve()),
        "epochs": args.epochs,
        "threads": args.threads,
        "seed": args.seed,
    }
    cmd = [str(python), str(HERE / "_recbole_worker.py"), "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"RecBole: SASRec for {args.epochs} epochs ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out_dir)
    if done.returncode != 0:
        raise RuntimeError(f"RecBole failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    (out_dir / "recbole.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def run_tansuo(args: argparse.Namespace, inter: Path, out_dir: Path) -> dict[str, Any]:
    from tansuo.bundle import load_bundle
    from tansuo.recipe import load_recipe
    from tansuo.train.setup import train_recipe

    epochs = args.tansuo_epochs or args.epochs
    sets = [
        f"train.out_dir={json.dumps(str(out_dir / 'tansuo'))}",
        f"data.path={json.dumps(str(inter.resolve()))}",  # absolute: --data-dir is for the titles
        f"train.epochs={epochs}",
        "train.max_steps=null",
        "train.eval_every=0",  # once an epoch, as RecBole validates
        f"train.threads={args.threads}",
    ]
    rec, data_cfg = load_recipe(args.recipe, sets + args.sets, data_dir=args.data_dir)
    began: dict[str, float] = {}
    evals: list[dict[str, float]] = []
    start = training_start(rec, out_dir, began, batch=" windows of up to 51 items")

    def watch(trainer: Any) -> None:
        start(trainer)
        evaluate = trainer.task.evaluate

        def timed(model, split, batch_size, device):  # when each validation happened, and how long it took
            t0 = time.perf_counter()
            metrics = evaluate(model, split, batch_size, device)
            if split == "val":
                t1 = time.perf_counter()
                evals.append({"s": t1 - began["fit"], "eval_s": t1 - t0, "hr@10": metrics["hr@10"]})
            return metrics

        trainer.task.evaluate = timed

    started = time.perf_counter()
    done = train_recipe(rec, data_cfg, progress=args.progress, on_start=watch)
    wall = time.perf_counter() - started
    fit_s = time.perf_counter() - began["fit"]
    result, trainer = done.result, done.trainer
    best = load_bundle(Path(result["bundle"]), device=trainer.device)
    test = best.task.evaluate(best.model, "test", 512, trainer.device)
    best.task.data = best.task.data.model_copy(update={"exclude_seen": False})
    as_recbole = best.task.evaluate(best.model, "test", 512, trainer.device)
    return {
        "epochs": epochs,
        "steps": trainer.plan.total_steps,
        "num_params": best.model.num_params(),
        "best_step": result.get("step"),
        "wall_s": wall,
        "fit_s": fit_s,
        "epoch_train_s": (fit_s - sum(e["eval_s"] for e in evals)) / epochs,
        "val_curve": evals,
        "test": test,
        "test_seen_kept": as_recbole,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic = out_dir / "atomic"
    inter, rows = write_atomic(args.data_dir, atomic, args.users)
    print(f"{inter}: {rows:,} interactions", flush=True)
    recbole = None if args.skip_recbole else run_recbole(args, atomic, out_dir)
    ours = run_tansuo(args, inter, out_dir)
    reached = None
    if recbole is not None:
        goal = recbole["valid_last"].get("hit@10")
        reached = next((e["s"] for e in ours["val_curve"] if goal is not None and e["hr@10"] >= goal), None)
    return {
        "benchmark": "recbole_compare",
        "out_dir": str(out_dir),
        "data": str(args.data_dir),
        "interactions": rows,
        "users_kept": args.users,
        "threads": args.threads,
        "torch": torch.__version__,
        "tansuo": ours,
        "recbole": recbole,
        "tansuo_s_to_recbole_val_hr10": reached,
    }


def _row(label: str, metrics: dict[str, float] | None, hit: str, ndcg: str) -> str:
    if metrics is None:
        return f"{label:44}{'-':>10}{'-':>10}"
    return f"{label:44}{metrics[hit]:>10.4f}{metrics[ndcg]:>10.4f}"


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    ours, theirs = r["tansuo"], r["recbole"]
    print()
    note = f" (first {r['users_kept']} users: a smoke run)" if r["users_kept"] else ""
    print(f"SASRec on MovieLens-100k{note} · {r['interactions']:,} interactions · {r['threads']} threads")
    print(f"{'test':44}{'HR@10':>10}{'NDCG@10':>10}")
    print(_row("tansuo full ranking, seen items removed", ours["test"], "hr@10", "ndcg@10"))
    print(_row("tansuo full ranking, seen items kept", ours["test_seen_kept"], "hr@10", "ndcg@10"))
    print(_row("tansuo sampled-100", ours["test"], "sampled_hr@10", "sampled_ndcg@10"))
    if theirs is not None:
        print(_row("RecBole full ranking (seen items kept)", theirs["test_full"], "hit@10", "ndcg@10"))
        print(_row("RecBole sampled-100 (uni100)", theirs["test_sampled"], "hit@10", "ndcg@10"))
    print()
    print(
        f"tansuo   {ours['epochs']:g} epochs ({ours['steps']} steps): "
        f"{ours['epoch_train_s']:.1f} s per epoch (training only), {ours['fit_s']:.1f} s fit, "
        f"{ours['wall_s']:.1f} s in total"
    )
    if theirs is not None:
        per = sum(theirs["epoch_train_s"]) / len(theirs["epoch_train_s"])
        print(
            f"RecBole  {theirs['epochs']} epochs: {per:.1f} s per epoch (training only), "
            f"{theirs['fit_s']:.1f} s fit, {theirs['wall_s']:.1f} s in total"
        )
        reached = r["tansuo_s_to_recbole_val_hr10"]
        goal = theirs["valid_last"].get("hit@10", float("nan"))
        when = f"after {reached:.1f} s of training" if reached is not None else "not within the run"
        print(f"tansuo's validation HR@10 reached RecBole's last ({goal:.4f}) {when}")


def main(argv: list[str] | None = None) -> None:
    training_bench_main(argv, parse_args, run, report)


if __name__ == "__main__":
    main()
