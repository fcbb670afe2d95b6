"""The contract every registered task keeps (as ``tests/models/test_model_contract.py`` does for models).

Each test runs over ``sorted(TASKS)`` as collected. ``CASES`` says, per task name, how to make tiny data and
its recipe (validated as ``tansuo train`` does), a typical input for ``predict`` and a file for
``read_inputs``; a task registered without a case fails ``test_task_has_a_contract_case``. ``MORE_CASES``
runs a task again on another form of its data (``lm`` on instruction JSONL), keyed ``task:form``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from tansuo.bundle import load_bundle, save_bundle
from tansuo.errors import TansuoError
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.tasks import EXAMPLES, GENERATE, ONNX, TASKS, Task
from tests.helpers import (
    classify_recipe,
    detect_recipe,
    image_recipe,
    lm_recipe,
    mlm_recipe,
    recommend_recipe,
    segment_recipe,
    translate_recipe,
    write_digits_csv,
    write_interactions,
    write_parallel,
    write_sentiment_tsv,
    write_yolo_boxes,
)

CPU = torch.device("cpu")
BS = 4
EVAL_BS = 8
KNOWN_ABILITIES = {EXAMPLES, GENERATE, ONNX}


@dataclass
class Case:
    """What one task's contract tests need, made in ``folder``."""

    raw: dict  # a raw recipe on tiny data
    inputs: list[str]  # one typical input for predict
    inputs_file: Path  # the task's natural input file for read_inputs
    loss_is_cross_entropy: bool = True  # False where the loss is not the logits' CE (detection: focal + GIoU)


# ------------------------------------------------------------------------------------------------ data


def _words(path: Path, lines: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    words = ["the", "film", "was", "good", "bad", "and", "a", "story", "to be", "or not"]
    path.write_text("\n".join(" ".join(rng.choice(words, size=6)) for _ in range(lines)) + "\n")
    return path


def _classify(folder: Path) -> Case:
    data = write_sentiment_tsv(folder / "train.tsv", 60)
    raw = classify_recipe(data, folder / "run")
    raw["data"].update(vocab_size=200, max_seq_len=16)
    inputs = folder / "inputs.tsv"
    inputs.write_text("sentence\nthe film was good really\nthe film was dull\n")
    return Case(raw, ["the film was good really"], inputs)


def _mlm(folder: Path) -> Case:
    corpus = _words(folder / "corpus.txt", 400, seed=1)
    inputs = _words(folder / "inputs.txt", 2, seed=2)
    return Case(mlm_recipe(corpus, folder / "run"), ["the film was [MASK] and good"], inputs)


def _lm(folder: Path) -> Case:
    corpus = _words(folder / "corpus.txt", 300, seed=3)
    inputs = _words(folder / "inputs.txt", 2, seed=4)
    raw = lm_recipe(corpus, folder / "run")
    raw["data"]["eval_windows"] = 8
    return Case(raw, ["the film"], inputs)


def _lm_instructions(folder: Path) -> Case:
    words = ["the film", "a story", "the plot", "the cast"]
    lines = [
        json.dumps({"prompt": f"was {w} good?", "response": "yes it was" if i % 3 else "no"})
        for i, w in enumerate(words * 12)
    ]
    lines.append(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]})
    )
    data = folder / "qa.jsonl"
    data.write_text("\n".join(lines) + "\n")
    inputs = _words(folder / "inputs.txt", 2, seed=4)
    raw = lm_recipe(data, folder / "run")
    raw["data"] = {"path": str(data), "block_size": 48, "chat": {"eos_token": "<|end|>"}}
    return Case(raw, ["was the film"], inputs)


def _image(folder: Path) -> Case:
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 4
    images = rng.uniform(0, 2, size=(80, 8, 8))
    for i, y in enumerate(labels):
        images[i, 2 * y : 2 * y + 2, :] += 12  # a bright bar whose row says the class
    npz = folder / "bars.npz"
    np.savez(npz, x=images.astype(np.float32), y=labels)
    picture = folder / "one.npy"
    np.save(picture, images[0].astype(np.float32))
    listing = folder / "inputs.txt"
    listing.write_text(f"{picture}\n")
    return Case(image_recipe(npz, folder / "run"), [str(picture)], listing)


def _detect(folder: Path) -> Case:
    config = write_yolo_boxes(folder / "boxes")
    picture = folder / "boxes" / "images" / "val" / "000.png"
    listing = folder / "inputs.txt"
    listing.write_text(f"{picture}\n")
    return Case(detect_recipe(config, folder / "run"), [str(picture)], listing, loss_is_cross_entropy=False)


def _translate(folder: Path) -> Case:
    prefix = write_parallel(folder / "pairs", 80, seed=5, reverse=True)
    inputs = folder / "inputs.txt"
    inputs.write_text("ka lo mi\nnu pe ri so\n")
    raw = translate_recipe(prefix, folder / "run")
    raw["data"].update(beam_size=2, max_len_extra=4)  # label smoothing 0: the loss is the logits' CE
    return Case(raw, ["ka lo mi nu"], inputs)


def _recommend(folder: Path) -> Case:
    log = write_interactions(folder / "log.tsv", users=20, items=16, length=8)
    inputs = folder / "histories.txt"
    inputs.write_text("m1,m2,m3\nm7|m8\n")
    return Case(recommend_recipe(log, folder / "run"), ["m1,m2,m3"], inputs)


def _segment(folder: Path) -> Case:
    from PIL import Image

    csv = write_digits_csv(folder / "digits.csv", 40)
    picture = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(picture)
    listing = folder / "inputs.txt"
    listing.write_text(f"{picture}\n")
    return Case(segment_recipe(csv, folder / "run"), [str(picture)], listing)


#: task name -> a factory of its tiny data, recipe and inputs (a new task adds one entry)
CASES: dict[str, Callable[[Path], Case]] = {
    "classify": _classify,
    "detect": _detect,
    "image": _image,
    "lm": _lm,
    "mlm": _mlm,
    "recommend": _recommend,
    "segment": _segment,
    "translate": _translate,
}

#: case key "task:form" -> a factory of tiny data of another form a task reads
MORE_CASES: dict[str, Callable[[Path], Case]] = {"lm:instructions": _lm_instructions}

NAMES = sorted(TASKS)
KEYS = NAMES + sorted(k for k in MORE_CASES if k.split(":")[0] in TASKS)


# ------------------------------------------------------------------------------------------------ fixtures


@dataclass
class Built:
    name: str
    case: Case
    data: BaseModel
    seed: int
    task: Task
    model_name: str
    model_overrides: dict  # the recipe's (dropout off); the task's sizes are added in make_model
    folder: Path

    def make_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(self.model_name, **{**self.model_overrides, **self.task.model_overrides()})


@pytest.fixture(scope="module", params=KEYS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    key = request.param
    name = key.split(":")[0]
    if key not in CASES and key not in MORE_CASES:
        pytest.fail(f"task {name!r} has no entry in CASES of {__file__}; add one (tiny data, recipe, inputs)")
    folder = tmp_path_factory.mktemp(f"task-{key.replace(':', '-')}")
    case = (CASES.get(key) or MORE_CASES[key])(folder)
    recipe, data = validate_recipe(case.raw)
    assert recipe.task == name
    task = TASKS[name].from_recipe(data, recipe.seed, folder / "work")
    overrides = {**recipe.model.overrides, "dropout": 0.0}
    return Built(name, case, data, recipe.seed, task, recipe.model.name, overrides, folder)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nth(task: Task, start: int, n: int = 0) -> dict[str, torch.Tensor]:
    for i, batch in enumerate(task.train_batches(BS, start)):
        if i == n:
            return batch
    raise AssertionError("unreachable")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", NAMES)
def test_task_has_a_contract_case(name: str) -> None:
    assert name in CASES, (
        f"task {name!r} is registered but has no entry in CASES of tests/tasks/test_task_contract.py; "
        "add one (a factory of tiny data, a recipe and inputs) so the task keeps the contract"
    )


def test_from_recipe_builds_the_registered_class(built: Built) -> None:
    task = built.task
    assert type(task) is TASKS[built.name]
    assert task.name == built.name
    assert isinstance(task, Task)
    assert isinstance(task.default_metric, str) and task.default_metric
    assert task.unit in ("tokens", "samples")
    spe = task.steps_per_epoch(BS)
    assert spe is None or (isinstance(spe, int) and spe > 0)


def test_model_overrides_build_the_model(built: Built) -> None:
    overrides = built.task.model_overrides()
    assert isinstance(overrides, dict) and overrides
    model = built.make_model()
    for key, value in overrides.items():
        assert getattr(model.config, key) == value, key


def test_training_batches_are_cpu_tensors_and_a_pure_function_of_seed_and_step(built: Built) -> None:
    first = _nth(built.task, 0)
    assert isinstance(first, dict) and first
    for key, value in first.items():
        assert isinstance(key, str)
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu", key
    assert _equal(first, _nth(built.task, 0))  # asked again from the same start
    third = _nth(built.task, 0, n=3)
    assert _equal(third, _nth(built.task, 3))  # batch 3 from 0 is batch 0 from 3
    assert not _equal(first, third)


def test_loss_is_a_finite_scalar_whose_gradients_reach_the_parameters(built: Built) -> None:
    model = built.make_model()
    model.train()
    loss = built.task.loss(model, _nth(built.task, 0))
    assert loss.dim() == 0 and loss.is_floating_point()
    assert torch.isfinite(loss)
    loss.backward()
    params = dict(model.named_parameters())
    reached = [n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)
    first = next(iter(params))  # the input embedding or stem: the farthest from the loss
    assert first in reached, f"no gradient reaches {first}"
    assert len(reached) >= len(params) // 2, sorted(set(params) - set(reached))


def test_logits_and_targets_match_the_loss(built: Built) -> None:
    model = built.make_model().eval()
    batch = _nth(built.task, 0)
    with torch.no_grad():
        logits, targets = built.task.logits(model, batch)
        loss = built.task.loss(model, batch)
    assert logits.dim() == 2 and logits.shape[0] > 0
    assert targets.shape == (logits.shape[0],)
    assert torch.isfinite(logits).all()
    if (
        logits.shape[1] > 1 and built.case.loss_is_cross_entropy
    ):  # class scores: the loss is their cross-entropy
        assert not targets.is_floating_point()
        assert int(targets.min()) >= 0 and int(targets.max()) < logits.shape[1]
        torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets), rtol=1e-5, atol=1e-6)


def test_count_is_positive(built: Built) -> None:
    n = built.task.count(_nth(built.task, 0))
    assert isinstance(n, int) and n > 0


def test_evaluate_gives_the_default_metric_and_changes_nothing(built: Built) -> None:
    task, model = built.task, built.make_model()
    before, rng = _state(model), torch.get_rng_state()
    metrics = task.evaluate(model, task.heldout_split, EVAL_BS, CPU)
    assert isinstance(metrics, dict)
    value = metrics[task.default_metric]
    assert isinstance(value, float) and math.isfinite(value)
    assert torch.equal(rng, torch.get_rng_state())
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = task.evaluate(model, task.heldout_split, EVAL_BS, CPU)[task.default_metric]
    assert again == pytest.approx(value, abs=1e-6)


def test_bundle_round_trip_keeps_the_task_metric_and_outputs(built: Built, tmp_path: Path) -> None:
    task, model = built.task, built.make_model().eval()
    path = save_bundle(tmp_path / "bundle", model, task)
    loaded = load_bundle(path)
    assert type(loaded.task) is type(task)
    assert loaded.task.heldout_split == task.heldout_split
    split = task.heldout_split
    want = task.evaluate(model, split, EVAL_BS, CPU)[task.default_metric]
    got = loaded.task.evaluate(loaded.model, split, EVAL_BS, CPU)[task.default_metric]
    assert got == pytest.approx(want, abs=1e-6)
    torch.manual_seed(1)
    x = task.example_input(model, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(*x), model(*x), rtol=0, atol=0)
    assert task.model_overrides() == loaded.task.model_overrides()


def test_predict_gives_one_row_per_input_and_a_printable_line(built: Built) -> None:
    model = built.make_model()
    rows = built.task.predict(model, built.case.inputs, CPU)
    assert isinstance(rows, list) and len(rows) == len(built.case.inputs)
    for row in rows:
        assert isinstance(row, dict)
        line = built.task.format_prediction(row, 3)
        assert isinstance(line, str) and line.strip()


def test_example_input_is_what_the_model_takes(built: Built) -> None:
    model = built.make_model().eval()
    x = built.task.example_input(model, 2, 8)
    assert isinstance(x, tuple) and x
    assert all(isinstance(t, torch.Tensor) for t in x)
    with torch.no_grad():
        out = model(*x)
    assert out.shape[0] == 2
    assert torch.isfinite(out).all()


def test_abilities_are_declared_not_probed(built: Built) -> None:
    task = built.task
    assert isinstance(task.abilities, frozenset)
    assert task.abilities <= KNOWN_ABILITIES, task.abilities - KNOWN_ABILITIES
    assert (GENERATE in task.abilities) == callable(getattr(task, "generate", None))


def test_examples_are_single_examples_whose_losses_average_to_the_loss(built: Built) -> None:
    """The EXAMPLES ability (DP-SGD, the membership audit): a batch of chosen examples, one loss each, whose
    mean is the task's loss, and no example's loss depends on the others in its batch."""
    task = built.task
    if EXAMPLES not in task.abilities:
        pytest.skip(f"{built.name} does not address single examples")
    n = task.split_size("train")
    assert n > 4 and task.split_size(task.heldout_split) > 0
    model = built.make_model().eval()
    idx = torch.tensor([0, 3, 1, n - 1])
    with torch.no_grad():
        training = task.examples("train", idx, 5)  # augmented as micro-batch 5 (draws per row)
        assert task.count(training) == 4 and torch.isfinite(task.loss(model, training))
        batch = task.examples("train", idx)
        losses = task.example_losses(model, batch)
        assert losses.shape == (4,) and torch.isfinite(losses).all()
        if not getattr(task.data, "label_smoothing", 0):  # the training loss is smoothed; these are plain
            torch.testing.assert_close(losses.mean(), task.loss(model, batch).float())
        alone = task.example_losses(model, task.examples("train", idx[1:2]))
    torch.testing.assert_close(alone[0], losses[1], atol=1e-5, rtol=1e-4)
    assert task.examples(task.heldout_split, torch.tensor([0]))


def test_read_inputs_gives_texts_or_a_tansuo_error(built: Built) -> None:
    try:
        inputs = built.task.read_inputs(built.case.inputs_file)
    except TansuoError as e:
        assert str(e)
        return
    assert isinstance(inputs, list) and inputs
    assert all(isinstance(t, str) and t for t in inputs)
