"""``tansuo audit``: how well membership-inference attacks tell a bundle's training examples from unseen ones.

Members are a seeded sample of the task's training split; non-members as many examples of its held-out split
(``Task.heldout_split``: ``test`` where there is one), which training never saw. Both are scored by their loss
under the bundle's model (``example_losses`` of tasks with the :data:`~tansuo.tasks.base.EXAMPLES` ability)
and attacked as ``attacks.py`` says: the loss threshold, and with ``reference_models`` >= 2 the
difficulty-calibrated attack. Its reference models are trained with the bundle's own recipe (``recipe.json``:
the same model, initial weights, training settings and privacy) by the project's trainer, each on the
training split without one of ``reference_models`` folds, so that every audited member has a reference model
that never saw it (the one without its fold) and every non-member one drawn at random among them; all
audited examples are "out" for their reference, as in the offline LiRA of Carlini et al. 2022.

``privacy``, the figure the explorer minimises, is the highest AUC among the attacks run (0.5: nothing leaks).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tansuo.atomic import atomic_write_json
from tansuo.audit.attacks import attack_figures, calibrated_scores, loss_scores
from tansuo.errors import TansuoError
from tansuo.tasks.base import EXAMPLES, Batch, Task, batch_seed

log = logging.getLogger(__name__)


@torch.no_grad()
def example_losses(
    model: nn.Module, task: Task, split: str, indices: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    """The loss of each example ``indices`` of ``split`` under ``model`` (in eval mode), as evaluation sees
    them (no augmentation)."""
    model.eval()
    out = []
    for chunk in indices.split(batch_size):
        batch = {k: v.to(device) for k, v in task.examples(split, chunk).items()}  # type: ignore[attr-defined]
        out.append(task.example_losses(model, batch).float().cpu())  # type: ignore[attr-defined]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class TrainSubset:
    """``task`` with its training split cut to ``keep`` (indices into it): what a reference model trains on.
    Batches are a pure function of ``(seed, step)`` as every task's are; everything else is ``task``'s."""

    def __init__(self, task: Task, keep: torch.Tensor, seed: int) -> None:
        self._task, self.keep, self._seed = task, keep, seed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.keep) // batch_size)

    def split_size(self, split: str) -> int:
        return len(self.keep) if split == "train" else self._task.split_size(split)  # type: ignore[attr-defined]

    def examples(self, split: str, indices: torch.Tensor, step: int | None = None) -> Batch:
        if split == "train":
            indices = self.keep[indices]
        return self._task.examples(split, indices, step)  # type: ignore[attr-defined]

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, perm = -1, torch.arange(0)
        for n in count(start):
            e, k = divmod(n, per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(batch_seed(self._seed, e, salt=51))
                epoch, perm = e, torch.randperm(len(self.keep), generator=g)
            yield self.examples("train", perm[k * batch_size : (k + 1) * batch_size], n)


def _reference_model(bundle: Any, keep: torch.Tensor, k: int, work: Path, device: str) -> nn.Module:
    """Train reference model ``k`` with the bundle's recipe on the training examples ``keep``; its best
    bundle's model (as the audited bundle is its run's best)."""
    from tansuo.bundle import load_bundle
    from tansuo.recipe import Recipe
    from tansuo.train.setup import build_run
    from tansuo.train.trainer import Trainer

    recipe_file = bundle.path / "recipe.json"
    if not recipe_file.is_file():
        raise TansuoError(
            f"{bundle.path} has no recipe.json (it was not trained by tansuo), so no reference model can be "
            "trained as it was; run the audit with --reference-models 0 (the loss attack only)"
        )
    import json

    rec = Recipe.model_validate(json.loads(recipe_file.read_text(encoding="utf-8")))
    rec = rec.model_copy(
        update={
            "seed": rec.seed + 1 + k,
            "train": rec.train.model_copy(update={"out_dir": str(work / f"reference-{k}"), "device": device}),
        }
    )
    subset = TrainSubset(bundle.task, keep, rec.seed)
    run = build_run(rec, None, work / "data", task=subset)  # type: ignore[arg-type]
    log.info("reference model %d: %s on %d training examples", k, rec.model.name, len(keep))
    trainer = Trainer(run.task, run.model, rec.train, seed=rec.seed, recipe=rec.model_dump())
    result = trainer.fit()
    return load_bundle(result["bundle"], device=trainer.device).model


def audit_bundle(
    path: str | Path,
    *,
    examples: int = 1000,
    reference_models: int = 2,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "cpu",
    data_path: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Run the membership-inference audit of a bundle; see the module docstring.

    Args:
        path: the bundle folder.
        examples: members audited, and as many non-members (fewer when a split is smaller).
        reference_models: 0 for the loss attack alone; 2 or more also trains that many reference models
            for the calibrated attack (each as long as the bundle's own training, on a fraction
            ``1 - 1 / reference_models`` of its training split).
        seed: picks the audited examples and the folds.
        out: a folder for ``audit.json``, ``roc.png`` and the reference runs; None: the figures only.
        device: where the models run.
        data_path: the data file when it has moved since training (as ``tansuo eval --data``).
        batch_size: examples per forward pass when scoring.

    Returns:
        ``{"bundle", "examples", "member_split", "non_member_split", "attacks": {name: {auc,
        tpr_at_1pct_fpr, roc}}, "privacy", "epsilon"}`` (epsilon: what the bundle's training spent, or None).

    Raises:
        TansuoError: The task has no single examples, the recipe is missing for reference models, or
            ``reference_models`` is 1.
    """
    from tansuo.bundle import load_bundle

    if reference_models == 1:
        raise TansuoError(
            "--reference-models 1: each reference model trains without one fold of the training split, so "
            "at least 2 are needed for every member to be unseen by one; use 0 (loss attack only) or 2+"
        )
    b = load_bundle(path, device=device, data_path=data_path)
    task = b.task
    if EXAMPLES not in task.abilities:
        raise TansuoError(
            f"{path}: the {task.name!r} task cannot address single examples (its data are cut or packed into "
            "windows), so there are no members to audit; the audit works on image and classify bundles"
        )
    held = task.heldout_split
    n_train, n_held = task.split_size("train"), task.split_size(held)  # type: ignore[attr-defined]
    n = min(examples, n_train, n_held)
    g = torch.Generator().manual_seed(seed)
    members = torch.randperm(n_train, generator=g)[:n].sort().values
    outsiders = torch.randperm(n_held, generator=g)[:n].sort().values
    dev = torch.device(device)
    losses = np.concatenate(
        [
            example_losses(b.model, task, "train", members, batch_size, dev),
            example_losses(b.model, task, held, outsiders, batch_size, dev),
        ]
    )
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    attacks = {"loss": attack_figures(labels, loss_scores(losses))}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out) if out is not None else Path(tmp)
        if reference_models:
            ref = _reference_losses(b, members, outsiders, reference_models, work, device, seed, batch_size)
            attacks["calibrated"] = attack_figures(labels, calibrated_scores(losses, ref))
    privacy = b.metrics.get("privacy") or {}
    result = {
        "bundle": str(path),
        "examples": n,
        "member_split": "train",
        "non_member_split": held,
        "attacks": attacks,
        "privacy": max(a["auc"] for a in attacks.values()),
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
    }
    if out is not None:
        from tansuo.audit.plot import write_roc_png

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        eps = "no privacy" if result["epsilon"] is None else f"epsilon {result['epsilon']:.2f}"
        name = "/".join(Path(path).resolve().parts[-2:])  # runs/NAME/bundle: the run's name shows
        write_roc_png(out / "roc.png", attacks, f"membership inference: {name} ({eps})")
        atomic_write_json(out / "audit.json", result)
        result["files"] = {"audit": str(out / "audit.json"), "roc": str(out / "roc.png")}
    return result


def _reference_losses(
    bundle: Any,
    members: torch.Tensor,
    outsiders: torch.Tensor,
    k: int,
    work: Path,
    device: str,
    seed: int,
    batch_size: int,
) -> np.ndarray:
    """Each audited example's loss under a reference model that never trained on it (members, then
    non-members, in the order of ``members`` and ``outsiders``)."""
    task = bundle.task
    n_train = task.split_size("train")
    g = torch.Generator().manual_seed(seed + 1)
    fold = torch.randperm(n_train, generator=g) % k  # fold of every training example
    pick = torch.randint(0, k, (len(outsiders),), generator=g)  # a reference for every non-member
    out = np.zeros(len(members) + len(outsiders), dtype=np.float64)
    dev = torch.device(device)
    for r in range(k):
        model = _reference_model(bundle, (fold != r).nonzero().squeeze(1), r, work, device)
        mine = (fold[members] == r).nonzero().squeeze(1)  # members this reference never saw
        out[mine.numpy()] = example_losses(model, task, "train", members[mine], batch_size, dev)
        theirs = (pick == r).nonzero().squeeze(1)
        held = example_losses(model, task, task.heldout_split, outsiders[theirs], batch_size, dev)
        out[len(members) + theirs.numpy()] = held
    return out
