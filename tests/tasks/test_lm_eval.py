"""Language-model evaluation stays within its memory budget for large vocabularies, with the same loss."""

from __future__ import annotations

from pathlib import Path

import torch

import tansuo.tasks.lm as lm
from tansuo.models import create_model
from tests.helpers import lm_recipe, make_trainer


def test_evaluation_splits_rows_to_bound_the_logits(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    trainer = make_trainer(lm_recipe(text_file, tmp_path / "run", max_steps=1))
    task = trainer.task
    torch.manual_seed(0)
    model = create_model("gpt_test", vocab_size=task.vocab_size, max_seq_len=task.data.block_size).eval()
    whole = task.evaluate(model, "val", 64, torch.device("cpu"))
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    T, V = task.data.block_size, model.config.vocab_size
    monkeypatch.setattr(lm, "EVAL_LOGITS_BUDGET", 3 * T * V)  # three rows of logits at a time
    split = task.evaluate(model, "val", 64, torch.device("cpu"))
    assert max(seen) == 3 and sum(seen) == task.data.eval_windows
    assert abs(split["loss"] - whole["loss"]) < 1e-5
