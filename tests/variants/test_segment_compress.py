"""`tansuo compress` on segment bundles: the ViT segmenter pruned (heads, FFN neurons) and made int8, quality
measured as mIoU; a U-Net, which has no Linear layer, is int8 on ONNX Runtime (its convolutions), and the
torch backend and pruning say why they cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tansuo.bundle import load_bundle
from tansuo.compress.quantize import Int8DynamicLinear
from tests.helpers import make_trainer, run, segment_recipe, write_digits_csv

pytestmark = pytest.mark.slow


def _bundle(tmp_path: Path, model: str) -> Path:
    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)
    raw = segment_recipe(csv, tmp_path / f"run-{model}", model=model, max_steps=30, eval_every=30)
    return Path(make_trainer(raw).fit()["bundle"])


def test_prune_and_int8_a_segmenter(tmp_path: Path, monkeypatch, capsys) -> None:
    bundle = _bundle(tmp_path, "segmenter_test")
    out = tmp_path / "compressed"
    recipe = {
        "steps": [
            {"step": "prune", "heads": 0.5, "ffn": 0.5, "importance": "magnitude", "finetune_steps": 4},
            {"step": "quantize", "backend": "torch"},
        ],
        "reps": 5,
        "speed_rounds": 1,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(recipe))
    args = ["compress", str(bundle), "--recipe", str(tmp_path / "c.yaml"), "--out", str(out)]
    code, text, err = run([*args, "--train", "batch_size=8"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    original, pruned, quantized = report["variants"]
    assert [v["name"] for v in report["variants"]] == ["original", "01-prune", "02-quantize"]
    assert pruned["params"] < original["params"] and quantized["size_bytes"] < pruned["size_bytes"]
    assert 0 < quantized["quality"] <= 1
    b = load_bundle(out / "02-quantize" if (out / "02-quantize").is_dir() else out / "bundle")
    assert isinstance(b.model.head, Int8DynamicLinear)
    assert [r["step"] for r in b.model.compression] == ["prune", "quantize"]
    miou = b.task.evaluate(b.model, "test", 8, torch.device("cpu"))["miou"]
    assert miou == pytest.approx(quantized["quality"])


def test_a_unet_is_int8_on_onnx_runtime_and_the_torch_backend_says_why_not(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    bundle = _bundle(tmp_path, "unet_test")
    args = ["compress", str(bundle), "--quantize", "int8", "--out", str(tmp_path / "c")]
    code, text, err = run([*args, "--quantize-backend", "torch"], monkeypatch, capsys)
    assert code == 2 and "Linear" in err and "onnxruntime" in err, (code, text, err)
    code, text, err = run(
        [*args[:2], "--prune", "heads=0.5", "--out", str(tmp_path / "p")], monkeypatch, capsys
    )
    assert code == 2 and "unet" in err, (code, text, err)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    code, text, err = run(args, monkeypatch, capsys)  # backend auto: the one that can
    assert code == 0, err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    int8 = report["variants"][-1]
    assert json.loads((Path(int8["path"]) / "config.json").read_text())["runtime"] == "onnxruntime"
    assert int8["quality"] == pytest.approx(report["variants"][0]["quality"], abs=0.1)
