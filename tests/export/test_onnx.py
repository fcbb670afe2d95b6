"""ONNX export matches PyTorch; ONNX Runtime int8 bundles load and run like any other bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tansuo.bundle import load_bundle  # noqa: E402
from tansuo.errors import TansuoError  # noqa: E402
from tansuo.export.onnx import OnnxModel, export_onnx  # noqa: E402
from tansuo.models import create_model  # noqa: E402
from tests.helpers import (  # noqa: E402
    classify_recipe,
    image_recipe,
    make_trainer,
    run,
    write_recipe,
    write_sentiment_tsv,
)


def _op_types(path: Path) -> set[tuple[str, str]]:
    import onnx

    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("name", ["bert_test", "vit_test"])
def test_export_matches_pytorch_on_new_shapes(name: str, fuse: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    model.model_name = name
    report = export_onnx(model, tmp_path / "m.onnx", fuse=fuse)
    assert report["max_abs_diff"] <= 1e-4 and (tmp_path / "m.onnx").is_file()
    ops = _op_types(tmp_path / "m.onnx")
    contrib = {op for domain, op in ops if domain == "com.microsoft"}
    if fuse:  # each layer's attention one node, its residual norms and biased GELU fused too
        assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= contrib
        assert report["fused"]["attention"] == model.config.num_layers
        assert not {op for _, op in ops} & {"Softmax", "Erf"}
    else:
        assert not contrib and report["fused"] == {}
    onnx_model = OnnxModel(tmp_path / "m.onnx", model)
    if name == "bert_test":  # a batch and a length the export never saw, with padding
        x = torch.randint(0, 128, (5, 23))
        mask = torch.ones_like(x)
        mask[2, 11:] = 0
        with torch.no_grad():
            ref = model(x, attention_mask=mask.bool())
        out = onnx_model(x, attention_mask=mask.bool())
    else:
        x = torch.randn(7, 1, 8, 8)
        with torch.no_grad():
            ref = model(x)
        out = onnx_model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["segmenter_test", "unet_test"])
def test_segmenters_export_their_per_pixel_scores(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    model.model_name = name
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report["max_abs_diff"] <= 1e-4
    x = torch.randn(5, 3, 16, 16)  # a batch size the export never saw
    with torch.no_grad():
        ref = model(x)  # (5, 3, 16, 16)
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", model)(x), ref, atol=1e-4, rtol=0)


def test_the_efficientnet_classifier_exports_with_its_resize_and_grey_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("effnet_lite0_test", image_size=12, feature_norm=True).eval()
    model.model_name = "effnet_lite0_test"
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report["max_abs_diff"] <= 1e-4
    x = torch.randn(5, 1, 12, 12)  # grey 12x12, resampled to 32x32 inside the graph
    with torch.no_grad():
        ref = model(x)  # (5, 3)
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", model)(x), ref, atol=1e-4, rtol=0)


def test_unsupported_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TansuoError, match="'gpt' family does not export to ONNX"):
        export_onnx(create_model("gpt_test"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture
def image_bundle(image_npz: Path, tmp_path: Path) -> Path:
    return Path(
        make_trainer(image_recipe(image_npz, tmp_path / "run", max_steps=30, eval_every=30)).fit()["bundle"]
    )


def test_export_command(image_bundle: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, _ = run(["export", str(image_bundle), "--out", str(tmp_path / "m.onnx")], monkeypatch, capsys)
    assert code == 0 and "max abs difference from PyTorch" in out and (tmp_path / "m.onnx").is_file()
    assert "fused for ONNX Runtime: 2 attention" in out  # vit_test: two layers
    args = ["export", str(image_bundle), "--out", str(tmp_path / "p.onnx"), "--portable"]
    code, out, _ = run(args, monkeypatch, capsys)
    assert code == 0 and "standard ONNX operators only" in out
    assert all(domain == "ai.onnx" for domain, _ in _op_types(tmp_path / "p.onnx"))
    code, _, err = run(
        ["export", str(image_bundle), "--out", "x.onnx", "--format", "tflite"], monkeypatch, capsys
    )
    assert code == 2 and "--format onnx" in err


def test_onnxruntime_int8_bundle_is_batch_invariant(
    image_bundle: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "c"
    recipe = {"steps": [{"step": "quantize", "backend": "onnxruntime"}], "reps": 10, "speed_rounds": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(recipe))
    args = ["compress", str(image_bundle), "--recipe", str(tmp_path / "c.yaml"), "--out", str(out)]
    code, _, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    config = json.loads((out / "bundle" / "config.json").read_text())
    assert config["runtime"] == "onnxruntime" and config["compression"][-1]["backend"] == "onnxruntime"
    assert not (out / "bundle" / "model.safetensors").exists()
    b = load_bundle(out / "bundle")
    assert isinstance(b.model, OnnxModel)
    images, _ = b.task._split("test")
    x = b.task.normalize(images[:6])
    together = b.model(x)
    alone = torch.cat([b.model(x[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)  # a sample's answer does not depend on its batch
    report = json.loads((out / "report.json").read_text())
    accuracy = b.task.evaluate(b.model, "test", 64, torch.device("cpu"))["accuracy"]
    assert accuracy == pytest.approx(report["variants"][-1]["quality"])


def test_predict_on_onnxruntime_matches_torch(tmp_path: Path, monkeypatch, capsys) -> None:
    write_sentiment_tsv(tmp_path / "train.tsv", 80)
    recipe = write_recipe(
        tmp_path / "r.yaml", classify_recipe(tmp_path / "train.tsv", tmp_path / "run", max_steps=30)
    )
    code, _, err = run(["train", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    texts = ["the film was superb really", "the film was dull really", "a much longer review " * 9]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    got = {}
    for backend in ("torch", "onnxruntime"):
        args = ["predict", str(tmp_path / "run" / "bundle"), "--input", str(tmp_path / "in.jsonl"), "--json"]
        code, out, err = run([*args, "--backend", backend], monkeypatch, capsys)
        assert code == 0, err
        got[backend] = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in got["onnxruntime"]] == [r["label"] for r in got["torch"]]
    for a, b in zip(got["onnxruntime"], got["torch"], strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_backends_refuse_what_cannot_run(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tansuo.export.onnx import model_for_backend

    def bundle(task: str, onnx_file: Path | None = None, compression: list | None = None) -> SimpleNamespace:
        model = SimpleNamespace(onnx_file=onnx_file, compression=compression or [])
        abilities = frozenset({"onnx"}) if task in ("classify", "image") else frozenset()
        return SimpleNamespace(
            model=model, task=SimpleNamespace(name=task, abilities=abilities), path=Path("b")
        )

    cpu = torch.device("cpu")
    cases = [
        (bundle("classify"), "tensorrt", cpu, "unknown"),
        (bundle("classify", onnx_file=Path("m.onnx")), "torch", cpu, "--backend onnxruntime"),
        (bundle("mlm"), "onnxruntime", cpu, "classifiers"),
        (bundle("lm"), "onnxruntime", cpu, "--backend torch"),
        (bundle("classify"), "onnxruntime", torch.device("cuda"), "--device cpu"),
        (bundle("image", compression=[{"step": "quantize"}]), "onnxruntime", cpu, "int8 torch layers"),
    ]
    for b, backend, device, message in cases:
        with pytest.raises(TansuoError, match=message):
            model_for_backend(b, backend, device, tmp_path)
    plain = bundle("classify")
    assert model_for_backend(plain, "torch", cpu, None) is plain.model
