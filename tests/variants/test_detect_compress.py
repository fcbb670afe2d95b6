"""`tansuo compress` on detect bundles: the ViT detector pruned (its backbone's heads and FFN neurons) and
made int8, quality measured as COCO mAP; the CNN detector, whose layers are all convolutions, made int8 by
ONNX Runtime and refused by the torch backend and by pruning with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tansuo.bundle import load_bundle
from tansuo.compress.quantize import Int8DynamicLinear
from tests.helpers import detect_recipe, make_trainer, run, write_yolo_boxes

pytestmark = pytest.mark.slow


def _bundle(tmp_path: Path, model: str, **overrides: int) -> Path:
    config = write_yolo_boxes(tmp_path / "d", train=8, val=4, seed=1)
    raw = detect_recipe(config, tmp_path / f"run-{model}", model=model, max_steps=40, eval_every=40)
    raw["data"]["augment"] = False
    raw["model"]["overrides"] = overrides
    torch.manual_seed(0)
    return Path(make_trainer(raw).fit()["bundle"])


def test_prune_and_int8_a_vit_detector(tmp_path: Path, monkeypatch, capsys) -> None:
    bundle = _bundle(tmp_path, "vit_det_test")
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
    code, text, err = run([*args, "--train", "batch_size=4"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    original, pruned, quantized = report["variants"]
    assert [v["name"] for v in report["variants"]] == ["original", "01-prune", "02-quantize"]
    assert {v["metric"] for v in report["variants"]} == {"map"}
    assert pruned["params"] < original["params"] and quantized["size_bytes"] < pruned["size_bytes"]
    assert 0 < original["quality"] <= 1 and 0 <= quantized["quality"] <= 1
    b = load_bundle(Path(quantized["path"]))
    assert [r["step"] for r in b.model.compression] == ["prune", "quantize"]
    assert any(isinstance(m, Int8DynamicLinear) for m in b.model.backbone.modules())
    metrics = b.task.evaluate(b.model, "val", 4, torch.device("cpu"))
    assert metrics["map"] == pytest.approx(quantized["quality"])


def test_a_cnn_detector_is_int8_on_onnx_runtime_only(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    bundle = _bundle(tmp_path, "resnet_det_test", width=16, fpn_channels=32)  # weights outweigh the graph
    args = ["compress", str(bundle), "--out", str(tmp_path / "t")]
    code, text, err = run([*args, "--quantize", "int8", "--quantize-backend", "torch"], monkeypatch, capsys)
    assert code == 2 and "Linear" in err, (code, text, err)
    code, text, err = run([*args, "--prune", "heads=0.5"], monkeypatch, capsys)
    assert code == 2 and "resnet_det" in err and "vit_det" in err, (code, text, err)

    out = tmp_path / "ort"
    ort = ["--quantize", "int8", "--quantize-backend", "onnxruntime"]
    code, text, err = run(["compress", str(bundle), *ort, "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    original, int8 = report["variants"]
    assert int8["size_bytes"] < 0.6 * original["size_bytes"]
    assert int8["quality"] == pytest.approx(original["quality"], abs=0.1)
    b = load_bundle(Path(int8["path"]))
    import onnx

    ops = {n.op_type for n in onnx.load(str(Path(int8["path"]) / "model.onnx")).graph.node}
    assert "ConvInteger" in ops and "Conv" not in ops  # every convolution runs in int8
    rows = b.task.predict(b.model, [str(tmp_path / "d" / "images" / "val" / "000.png")], torch.device("cpu"))
    assert rows[0]["width"] == 48 and rows[0]["height"] == 40
