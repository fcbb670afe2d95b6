"""Pruning that recovers: the gradual schedule reaches the final ratio exactly, stages see fresh data and
fold into one record, layer-wise hidden-state distillation, an epoch budget, and the ratio search that
never returns a variant outside the limit when one within was found."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tansuo.bundle import load_bundle
from tansuo.compress import (
    DistillTask,
    StructuredPruneConfig,
    gradual_schedule,
    magnitude_scores,
    prune_,
    stage_config,
    stage_steps,
    units,
)
from tansuo.errors import CompressionError, RecipeError
from tansuo.models import create_model
from tansuo.variants import accuracy, recipe_from_options
from tansuo.variants.pruning import _budget, _Continued, prune_once, run_prune
from tansuo.variants.report import report_markdown
from tansuo.variants.steps import PruneStep
from tests.helpers import image_recipe, make_trainer


@pytest.mark.parametrize("final", [0.25, 0.5, 0.3, 0.9])
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 7])
def test_gradual_schedule_rises_to_exactly_the_final_ratio(final: float, stages: int) -> None:
    ratios = gradual_schedule(final, stages)
    assert len(ratios) == stages and ratios[-1] == final  # exact, not approximately
    assert all(0 < a < b for a, b in zip(ratios, ratios[1:], strict=False))
    if stages >= 3:  # cubic: the first cut is the largest, the last ones the smallest
        gaps = [ratios[0], *(b - a for a, b in zip(ratios, ratios[1:], strict=False))]
        assert gaps == sorted(gaps, reverse=True)
    with pytest.raises(CompressionError, match="at least one stage"):
        gradual_schedule(final, 0)


@pytest.mark.parametrize(("total", "stages"), [(1000, 4), (10, 4), (3, 4), (7, 1), (2100, 5)])
def test_stage_steps_add_up_to_the_budget(total: int, stages: int) -> None:
    plan = stage_steps(total, stages)
    assert sum(plan) == total and all(n >= 1 for n in plan) and len(plan) == min(total, stages)
    if len(plan) > 1:  # half the budget is left to recover after the last cut
        assert plan[-1] >= total // 2


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("bert_test", num_layers=3, num_heads=4, num_classes=3, dropout=0.0).eval()


@pytest.mark.parametrize(("heads", "ffn"), [(0.25, 0.5), (0.5, 0.3), (0.0, 0.7), (0.4, 0.0)])
def test_staged_cuts_remove_what_one_cut_removes(heads: float, ffn: float) -> None:
    one = _bert()
    prune_(one, StructuredPruneConfig(heads=heads, ffn=ffn), scores=magnitude_scores(one))
    staged = _bert()
    original = units(staged)
    for fraction in gradual_schedule(1.0, 4):
        config = stage_config(original, units(staged), heads * fraction, ffn * fraction)
        if config is not None:
            prune_(staged, config, scores=magnitude_scores(staged))
    assert units(staged) == units(one)
    assert stage_config(original, units(staged), heads, ffn) is None  # nothing left to remove


@pytest.fixture
def vit_bundle(image_npz: Path, tmp_path: Path) -> Path:
    result = make_trainer(image_recipe(image_npz, tmp_path / "run", max_steps=30, eval_every=30)).fit()
    return Path(result["bundle"])


def test_stages_continue_the_data_where_the_last_one_stopped(vit_bundle: Path) -> None:
    task = load_bundle(vit_bundle).task
    later = next(_Continued(task, 5).train_batches(8, start=2))
    direct = next(task.train_batches(8, start=7))
    assert all(torch.equal(later[k], direct[k]) for k in direct)
    assert _Continued(task, 5).default_metric == task.default_metric  # the rest is the task's


def test_gradual_pruning_with_layerwise_distillation_on_a_bundle(vit_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(vit_bundle)
    before = units(bundle.model)
    step = PruneStep(
        step="prune",
        heads=0.5,
        ffn=0.5,
        importance="taylor",
        score_batches=2,
        finetune_steps=12,
        stages=3,
        hidden=1.0,
        hidden_layers="all",
        train={"batch_size": 16},
    )
    out = prune_once(bundle, step, tmp_path / "01-prune")
    pruned = load_bundle(out)
    assert units(bundle.model) == before  # the input bundle's model is left alone
    one = copy.deepcopy(bundle.model)
    prune_(one, StructuredPruneConfig(heads=0.5, ffn=0.5))
    assert units(pruned.model) == units(one)  # the schedule ends at the step's ratios exactly
    records = [r for r in pruned.model.compression if r["step"] == "prune"]
    assert len(records) == 1  # the cuts fold into one record
    record = records[0]
    assert (record["heads"], record["ffn"], record["importance"]) == (0.5, 0.5, "taylor")
    schedule = record["schedule"]
    assert schedule["steps"] == stage_steps(12, 3) and sum(schedule["steps"]) == 12
    assert schedule["fractions"][-1] == 1.0 and schedule["fractions"][0] < 1.0
    for k, n in enumerate(schedule["steps"], 1):  # each stage trained its share, then went on
        log = (tmp_path / "01-prune-train" / f"stage-{k}" / "metrics.jsonl").read_text().splitlines()
        trained = [json.loads(line) for line in log if '"event": "train"' in line]
        assert trained[-1]["step"] == n
        assert not (tmp_path / "01-prune-train" / f"stage-{k}" / "checkpoint.safetensors").exists()
    assert "test" in pruned.metrics and "val" in pruned.metrics  # the last stage's best, measured
    x = pruned.task.example_input(pruned.model, 3, 16)
    again = load_bundle(out)  # records replayed: the same outputs
    with torch.no_grad():
        assert torch.equal(pruned.model(*x), again.model(*x))


def test_one_shot_prunes_once_and_budget_in_epochs(vit_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(vit_bundle)
    step = PruneStep(
        step="prune",
        heads=0.5,
        ffn=0.25,
        importance="magnitude",
        finetune_epochs=1.0,
        schedule="one-shot",
        train={"batch_size": 16},
    )
    per_epoch = bundle.task.steps_per_epoch(16)
    assert _budget(bundle, step, tmp_path / "x") == per_epoch
    assert _budget(bundle, step.model_copy(update={"finetune_epochs": 0.5}), tmp_path / "x") == -(
        -per_epoch // 2
    )
    out = prune_once(bundle, step, tmp_path / "01-prune")
    record = load_bundle(out).model.compression[-1]
    assert "schedule" not in record and record["ffn"] == 0.25
    log = (tmp_path / "01-prune-train" / "metrics.jsonl").read_text().splitlines()
    assert json.loads([line for line in log if '"event": "train"' in line][-1])["step"] == per_epoch
    with pytest.raises(RecipeError, match="not both"):
        recipe_from_options(prune="heads=0.5", finetune_steps=10, finetune_epochs=1.0)


def test_bisection_tries_the_given_ratio_first_then_halves_towards_the_limit() -> None:
    assert accuracy.bisect_scale(lambda s: True, 3) == [(1.0, True)]
    assert accuracy.bisect_scale(lambda s: s <= 0.3, 3) == [(1.0, False), (0.5, False), (0.25, True)]
    assert accuracy.bisect_scale(lambda s: s <= 0.3, 4)[-1] == (0.375, False)
    assert accuracy.bisect_scale(lambda s: s <= 0.8, 3) == [(1.0, False), (0.5, True), (0.75, True)]
    assert accuracy.bisect_scale(lambda s: False, 2) == [(1.0, False), (0.5, False)]


def test_ratio_search_keeps_the_largest_ratio_within_the_limit(
    vit_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(vit_bundle)
    full = sum(p.numel() for p in bundle.model.parameters())
    # quality = the share of parameters kept: each candidate's drop is known without training
    monkeypatch.setattr(
        accuracy.Judge, "quality", lambda self, m: sum(p.numel() for p in m.parameters()) / full
    )
    step = PruneStep(step="prune", heads=0.5, ffn=0.75, importance="magnitude", max_drop=15.0)
    out = run_prune(bundle, step, tmp_path / "01-prune")
    search = load_bundle(out).model.compression[-1]["ratio_search"]
    tried = search["candidates"]
    assert len(tried) == 3 and tried[0]["scale"] == 1.0
    within = [c for c in tried if c["within_limit"]]
    outside = [c for c in tried if not c["within_limit"]]
    assert within and outside  # the limit lies between the candidates
    assert all(c["drop"] <= 15.0 for c in within) and all(c["drop"] > 15.0 for c in outside)
    best = max(within, key=lambda c: c["scale"])
    assert search["chosen_scale"] == best["scale"] and search["within_limit"]
    kept = sum(p.numel() for p in load_bundle(out).model.parameters()) / full
    assert 100 * (1 - kept) == pytest.approx(best["drop"])  # the bundle written is the chosen candidate
    text = report_markdown(
        {
            "bundle": "b",
            "recipe": {"reps": 1, "large_batch": 1, "steps": [step.model_dump()], "max_drop": None},
            "variants": [
                {"name": "original", "quality": 1.0, "latency_ms_p50": 1.0, "threads": 1, "steps": []},
                {
                    "name": "01-prune",
                    "quality": kept,
                    "latency_ms_p50": 1.0,
                    "steps": ["prune"],
                    "prune_search": search,
                },
            ],
            "chosen": "01-prune",
        }
    )
    assert f"kept x{best['scale']:g}, the largest within" in text
    # a limit nothing meets: the smallest tried, marked as outside (the pipeline's max_drop refuses it)
    strict = step.model_copy(update={"max_drop": 0.0, "search_candidates": 2})
    out = run_prune(bundle, strict, tmp_path / "02-prune")
    search = load_bundle(out).model.compression[-1]["ratio_search"]
    assert not search["within_limit"] and search["chosen_scale"] == 0.5


def test_layerwise_hidden_distillation_maps_layers_and_lets_go(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = create_model("bert_test", num_layers=4, num_classes=2, dropout=0.0)
    student = create_model("bert_test", num_layers=2, num_classes=2, dropout=0.0)

    class Task:
        def logits(self, model, batch):
            return model(batch["input_ids"]), batch["labels"]

    dtask = DistillTask(Task(), teacher, student, hidden=1.0, layers="all")
    assert len(dtask.extra) == 2  # one projection per student layer
    batch = {"input_ids": student.example_input(2, seq_len=6), "labels": torch.tensor([0, 1])}
    loss = dtask.loss(student, batch)
    assert torch.isfinite(loss)
    plain = DistillTask(Task(), teacher, create_model("bert_test", num_layers=2, num_classes=2), hidden=0.0)
    assert plain.extra is None
    dtask.close()
    assert all(not layer._forward_hooks for layer in teacher.stack.layers)
    assert all(not layer._forward_hooks for layer in student.stack.layers)
    with pytest.raises(CompressionError, match="'last' or 'all'"):
        DistillTask(Task(), teacher, student, hidden=1.0, layers="some")


def test_cli_options_reach_the_prune_step() -> None:
    spec = recipe_from_options(
        prune="heads=0.25,ffn=0.5", finetune_epochs=2.0, schedule="one-shot", hidden=1.0, max_drop=1.0
    )
    (step,) = spec.steps
    assert (step.finetune_epochs, step.schedule, step.hidden, step.max_drop) == (2.0, "one-shot", 1.0, 1.0)
    assert step.describe() == "prune heads=0.25 ffn=0.5 +2 epochs within 1"
    assert step.scaled(0.5).heads == 0.125 and step.scaled(0.5).max_drop is None


def test_a_first_cut_with_nothing_due_yet_is_no_error(vit_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(vit_bundle)  # vit_test: 4 heads in all; 0.2 of them is one, due at the second cut
    assert units(bundle.model)["heads"] == 4
    step = PruneStep(
        step="prune", heads=0.2, importance="magnitude", finetune_steps=3, stages=3, train={"batch_size": 16}
    )
    record = load_bundle(prune_once(bundle, step, tmp_path / "p")).model.compression[-1]
    assert sum(record["attention"].values()) == 3 and record["heads"] == 0.2
