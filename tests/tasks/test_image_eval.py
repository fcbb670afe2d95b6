"""ImageTask.evaluate honours its batch size: the model never sees more, and the metrics do not change."""

from pathlib import Path

import pytest
import torch

from tansuo.models import create_model
from tansuo.tasks import ImageTask


def test_image_evaluate_calls_the_model_in_batches_of_at_most_batch_size(image_npz: Path, tmp_path: Path):
    data = ImageTask.DataConfig.model_validate({"source": "npz", "path": str(image_npz)})
    task = ImageTask.from_recipe(data, seed=0, work_dir=tmp_path)
    model = create_model("resnet_test", **task.model_overrides())
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    results = {}
    for batch_size in (1, 7, 256):
        seen.clear()
        results[batch_size] = task.evaluate(model, "val", batch_size, torch.device("cpu"))
        n = sum(c["support"] for c in results[batch_size]["per_class"].values())
        assert max(seen) <= batch_size and sum(seen) == n and len(seen) == -(-n // batch_size)
    assert results[1]["accuracy"] == pytest.approx(results[256]["accuracy"])
    assert results[7]["accuracy"] == pytest.approx(results[256]["accuracy"])
