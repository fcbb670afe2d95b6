"""Distillation: the loss is the textbook formula; a student learns from a teacher through the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tansuo.compress import DistillationLoss, DistillTask, init_from_teacher
from tansuo.compress.distill import HiddenStateLoss, teacher_layers
from tansuo.errors import CompressionError
from tansuo.models import create_model
from tansuo.recipe import TrainConfig
from tansuo.train.trainer import Trainer
from tests.helpers import image_recipe, make_trainer


def test_loss_equals_the_formula_on_hand_made_logits() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([0, 2])
    a, T = 0.3, 2.0
    kl = 0.0
    for i in range(2):
        p = [math.exp(v / T) for v in t[i].tolist()]
        q = [math.exp(v / T) for v in s[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    ce = -(math.log(math.exp(2) / sum(math.exp(v) for v in s[0].tolist())))
    ce -= math.log(math.exp(1.0) / sum(math.exp(v) for v in s[1].tolist()))
    expected = a * ce / 2 + (1 - a) * T * T * kl / 2
    assert DistillationLoss(a, T)(s, t, y).item() == pytest.approx(expected, rel=1e-6)
    assert DistillationLoss(1.0, T)(s, t, y).item() == pytest.approx(F.cross_entropy(s, y).item())
    assert DistillationLoss(0.0, T)(t, t, y).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("alpha,temperature", [(-0.1, 2.0), (1.1, 2.0), (0.5, 0.0)])
def test_bad_settings_are_refused(alpha: float, temperature: float) -> None:
    with pytest.raises(CompressionError):
        DistillationLoss(alpha, temperature)


def test_hidden_loss_is_zero_for_equal_states_at_equal_width_and_masks_padding() -> None:
    h = torch.randn(2, 5, 8)
    loss = HiddenStateLoss(8, 8)
    assert loss(h, h).item() == pytest.approx(0.0, abs=1e-10)
    other = h.clone()
    other[:, 3:] += 10  # only padding differs
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()
    assert loss(h, other, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_student_layers_come_from_evenly_spaced_teacher_layers() -> None:
    assert teacher_layers(6, 3) == [1, 3, 5]
    assert teacher_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert teacher_layers(4, 4) == [0, 1, 2, 3]
    torch.manual_seed(0)
    teacher = create_model("bert_test", num_layers=4, num_classes=2)
    student = create_model("bert_test", num_layers=2, num_classes=2)
    report = init_from_teacher(student, teacher)
    assert report["skipped"] == 0
    assert torch.equal(student.stack.layers[0].attn.q_proj.weight, teacher.stack.layers[1].attn.q_proj.weight)
    assert torch.equal(student.stack.layers[1].mlp.in_proj.bias, teacher.stack.layers[3].mlp.in_proj.bias)
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight)
    assert student.mlm_head.decoder.weight is student.tok_emb.weight  # the tie survives


def test_an_encoder_decoder_student_maps_each_stack_on_its_own_depth() -> None:
    torch.manual_seed(0)
    teacher = create_model("seq2seq_test", num_encoder_layers=2, num_decoder_layers=4)
    student = create_model("seq2seq_test", num_encoder_layers=2, num_decoder_layers=1)
    assert init_from_teacher(student, teacher)["skipped"] == 0
    pairs = [(student.encoder.layers[i], teacher.encoder.layers[i]) for i in range(2)]
    pairs += [(student.decoder.layers[0], teacher.decoder.layers[3])]
    for s_layer, t_layer in pairs:
        want = t_layer.state_dict()
        for name, got in s_layer.state_dict().items():
            assert torch.equal(got, want[name]), name
    assert torch.equal(student.decoder.final_norm.weight, teacher.decoder.final_norm.weight)


def test_a_narrow_student_learns_from_the_teacher(image_npz: Path, tmp_path: Path) -> None:
    teacher_run = make_trainer(image_recipe(image_npz, tmp_path / "teacher", max_steps=40, eval_every=40))
    teacher_run.fit()
    teacher, task = teacher_run.model.eval(), teacher_run.task
    torch.manual_seed(1)
    student = create_model("vit_test", **{**task.model_overrides(), "embed_dim": 16, "num_heads": 2})
    dtask = DistillTask(task, teacher, student, alpha=0.5, temperature=2.0, hidden=1.0)
    assert dtask.extra is not None and dtask.extra[0].proj.weight.shape == (teacher.config.embed_dim, 16)
    cfg = TrainConfig(out_dir=str(tmp_path / "student"), max_steps=40, batch_size=16, lr=3e-3, log_every=5)
    trainer = Trainer(dtask, student, cfg, seed=3, extra=dtask.extra)
    proj_before = dtask.extra[0].proj.weight.detach().clone()
    result = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["event"] == "train"]
    assert losses[-1] < 0.6 * losses[0]
    assert not torch.equal(dtask.extra[0].proj.weight, proj_before)  # the projection is trained too
    assert result["test"]["accuracy"] >= 0.5  # 4 classes: chance is 0.25
    assert all(p.grad is None for p in teacher.parameters())
