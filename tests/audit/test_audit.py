"""The membership-inference audit: attack figures, audits of bundles that memorised or never saw their data,
the calibrated attack's reference models, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tansuo.audit import attack_figures, audit_bundle, calibrated_scores, loss_scores
from tansuo.errors import TansuoError
from tests.helpers import image_recipe, make_trainer, run


def test_attack_figures_of_a_perfect_and_a_blind_attack():
    members = np.array([1] * 200 + [0] * 200)
    perfect = attack_figures(members, np.r_[np.full(200, 2.0), np.full(200, 1.0)])
    assert perfect["auc"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0
    rng = np.random.default_rng(0)
    blind = attack_figures(members, rng.normal(size=400))
    assert abs(blind["auc"] - 0.5) < 0.08 and blind["tpr_at_1pct_fpr"] < 0.1


def test_scores_rank_low_loss_and_low_loss_against_the_reference_as_members():
    assert list(loss_scores(np.array([0.1, 2.0]))) == [-0.1, -2.0]
    # a hard example (reference loss 3) fitted to 1 scores above an easy one (reference 0.2) fitted to 0.1
    scores = calibrated_scores(np.array([1.0, 0.1]), np.array([3.0, 0.2]))
    assert scores[0] > scores[1]


@pytest.fixture
def noise_npz(tmp_path: Path) -> Path:
    """Pure noise with random labels: nothing to learn but the examples themselves."""
    rng = np.random.default_rng(1)
    path = tmp_path / "noise.npz"
    np.savez(path, x=rng.normal(size=(120, 8, 8)).astype(np.float32), y=rng.integers(0, 4, 120))
    return path


def _noise_recipe(npz: Path, out: Path, **train: object) -> dict:
    raw = image_recipe(npz, out, **{"threads": 1, **train})  # tiny matmuls: 2 threads only wait
    raw["data"].update(max_shift=0, splits=[0.5, 0.1, 0.4])  # 60 members, 48 held-out non-members
    return raw


def test_audit_finds_a_memorised_training_set(noise_npz, tmp_path):
    raw = _noise_recipe(noise_npz, tmp_path / "run", max_steps=100, batch_size=20, eval_every=100, lr=1e-2,
                        warmup_steps=0, weight_decay=0.0)  # fmt: skip
    make_trainer(raw).fit()
    result = audit_bundle(tmp_path / "run" / "bundle", reference_models=2, out=tmp_path / "audit")
    assert result["examples"] == 48 and result["non_member_split"] == "test"
    assert result["attacks"]["loss"]["auc"] > 0.95
    # noise is equally hard for every model: calibrating by a reference model's loss adds its variance
    assert result["attacks"]["calibrated"]["auc"] > 0.7
    assert result["privacy"] == max(a["auc"] for a in result["attacks"].values())
    assert result["epsilon"] is None
    assert (tmp_path / "audit" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["attacks"]["loss"]["auc"] == result["attacks"]["loss"]["auc"]
    assert (tmp_path / "audit" / "reference-1" / "bundle" / "model.safetensors").is_file()


def test_audit_of_a_model_that_never_saw_its_data_is_near_chance(noise_npz, tmp_path):
    make_trainer(_noise_recipe(noise_npz, tmp_path / "run", max_steps=1, lr=1e-9)).fit()
    result = audit_bundle(tmp_path / "run" / "bundle", reference_models=0)
    assert set(result["attacks"]) == {"loss"}
    assert abs(result["attacks"]["loss"]["auc"] - 0.5) < 0.15


def test_audit_refuses_one_reference_model(noise_npz, tmp_path):
    with pytest.raises(TansuoError, match="at least 2"):
        audit_bundle(tmp_path / "nothing", reference_models=1)


def test_audit_command_prints_figures_and_exits_2_on_errors(noise_npz, tmp_path, monkeypatch, capsys):
    make_trainer(_noise_recipe(noise_npz, tmp_path / "run", max_steps=2)).fit()
    bundle = str(tmp_path / "run" / "bundle")
    code, out, _ = run(["audit", bundle, "--reference-models", "0"], monkeypatch, capsys)
    assert code == 0, out
    assert "loss        AUC" in out and "TPR at 1% FPR" in out and "trained without privacy" in out
    assert (tmp_path / "run" / "audit" / "roc.png").is_file()
    code, _, err = run(["audit", str(tmp_path / "missing")], monkeypatch, capsys)
    assert code == 2 and "bundle not found" in err
    code, _, err = run(["audit", bundle, "--reference-models", "1"], monkeypatch, capsys)
    assert code == 2 and "at least 2" in err
