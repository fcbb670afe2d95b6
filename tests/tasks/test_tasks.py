from pathlib import Path

import pytest
import torch

from tansuo.models import create_model
from tansuo.tasks import TASKS, Task
from tests.helpers import image_recipe, lm_recipe, task_from


@pytest.fixture(params=["lm", "image"])
def task(request, tmp_path: Path, text_file: Path, image_npz: Path) -> Task:  # noqa: ANN001
    raw = lm_recipe(text_file, tmp_path) if request.param == "lm" else image_recipe(image_npz, tmp_path)
    return task_from(raw)


def test_tasks_follow_the_protocol(task: Task) -> None:
    assert isinstance(task, Task)
    assert task.name in TASKS


def test_training_batches_are_a_pure_function_of_seed_and_step(task: Task) -> None:
    first = [b for _, b in zip(range(12), task.train_batches(4, start=0), strict=False)]
    later = [b for _, b in zip(range(4), task.train_batches(4, start=8), strict=False)]
    for a, b in zip(first[8:], later, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(first[0]["x"], first[1]["x"])


def test_evaluate_leaves_global_rng_alone(task: Task) -> None:
    model = create_model("gpt_test" if task.name == "lm" else "vit_test", **task.model_overrides())
    state = torch.get_rng_state()
    task.evaluate(model, "val", 4, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())


def test_image_epochs_visit_every_training_image_once(tmp_path: Path, image_npz: Path) -> None:
    raw = image_recipe(image_npz, tmp_path)
    raw["data"]["max_shift"] = 0
    task = task_from(raw)
    per_epoch = task.steps_per_epoch(16)
    labels = torch.cat([b["y"] for _, b in zip(range(per_epoch), task.train_batches(16, 0), strict=False)])
    assert len(labels) == per_epoch * 16 == 128  # 80% of 160
    assert torch.bincount(labels).tolist() == torch.bincount(task._split("train")[1]).tolist()


def test_lm_split_is_first_90_percent(tmp_path: Path, text_file: Path) -> None:
    task = task_from(lm_recipe(text_file, tmp_path))
    train, val = task._split("train"), task._split("val")
    n = len(train) + len(val)
    assert len(train) == int(0.9 * n)
    assert task.model_overrides() == {"vocab_size": task.tokenizer.get_vocab_size(), "max_seq_len": 16}


def test_lm_evaluation_does_not_depend_on_batch_size(tmp_path: Path, text_file: Path) -> None:
    task = task_from(lm_recipe(text_file, tmp_path))
    model = create_model("gpt_test", **task.model_overrides())
    a = task.evaluate(model, "val", 4, torch.device("cpu"))["loss"]
    b = task.evaluate(model, "val", 7, torch.device("cpu"))["loss"]
    assert a == pytest.approx(b, rel=1e-5)
