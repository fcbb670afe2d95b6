"""`tansuo compress`: recipes, the choice of variant, and the whole chain on a tiny image bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tansuo.bundle import load_bundle
from tansuo.compress.quantize import Int8DynamicLinear
from tansuo.errors import BundleError, RecipeError
from tansuo.variants import Variant, choose, load_compress_recipe, parse_prune
from tests.helpers import image_recipe, make_trainer, run


def _v(name: str, quality: float, latency: float, size: int) -> Variant:
    return Variant(name, Path(name), [], {"quality": quality, "latency_ms_p50": latency, "size_bytes": size})


def test_choose_picks_the_fastest_within_the_allowed_drop() -> None:
    variants = [
        _v("original", 0.900, 40.0, 90),
        _v("distill", 0.880, 20.0, 60),  # 2.0 points down
        _v("prune", 0.893, 25.0, 50),  # 0.7 down
        _v("int8", 0.891, 12.0, 30),  # 0.9 down
    ]
    assert choose(variants, 1.0, "latency").name == "int8"
    assert choose(variants, 0.8, "latency").name == "prune"
    assert choose(variants, 2.5, "latency").name == "int8"
    assert choose(variants, 0.5, "latency") is None  # none qualifies: the original stays
    assert choose(variants, None, "latency").name == "int8"  # no budget: the last step
    sized = [variants[0], _v("a", 0.9, 10.0, 70), _v("b", 0.9, 30.0, 20)]
    assert choose(sized, 1.0, "size").name == "b" and choose(sized, 1.0, "latency").name == "a"


def test_choose_reads_a_loss_as_lower_is_better() -> None:
    """An lm bundle's quality is its loss: a variant whose loss went up lost that much (in loss units)."""
    original = _v("original", 3.40, 40.0, 90)
    original.figures["metric"] = "loss"
    variants = [original, _v("int4", 3.45, 10.0, 30), _v("int8", 3.41, 20.0, 50), _v("odd", 3.00, 30.0, 60)]
    assert choose(variants, 0.02, "latency").name == "int8"  # int4 lost 0.05
    assert choose(variants, 0.06, "latency").name == "int4"
    assert choose(variants, 0.0, "latency").name == "odd"  # a lower loss is no loss at all


def test_recipe_schema_names_bad_fields() -> None:
    with pytest.raises(RecipeError, match="quantize must be the last step"):
        load_compress_recipe(None, {"steps": [{"step": "quantize"}, {"step": "prune", "heads": 0.5}]})
    with pytest.raises(RecipeError, match="steps.0.prune.heads"):
        load_compress_recipe(None, {"steps": [{"step": "prune", "heads": 1.0}]})
    with pytest.raises(RecipeError, match="give heads and/or ffn"):
        load_compress_recipe(None, {"steps": [{"step": "prune"}]})
    with pytest.raises(RecipeError, match="steps"):
        load_compress_recipe(None, {"steps": []})
    assert parse_prune("heads=0.25, ffn=0.5") == {"heads": 0.25, "ffn": 0.5}
    for bad in ("heads", "layers=0.5", "heads=lots"):
        with pytest.raises(RecipeError, match="--prune"):
            parse_prune(bad)


@pytest.fixture
def image_bundle(image_npz: Path, tmp_path: Path) -> Path:
    result = make_trainer(image_recipe(image_npz, tmp_path / "run", max_steps=40, eval_every=40)).fit()
    return Path(result["bundle"])


def test_compress_chain_end_to_end(image_bundle: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "compressed"
    recipe = {
        "steps": [
            {"step": "prune", "heads": 0.5, "ffn": 0.5, "importance": "magnitude", "finetune_steps": 4},
            {"step": "quantize", "backend": "torch"},
        ],
        "reps": 10,
        "speed_rounds": 1,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(recipe))
    args = ["compress", str(image_bundle), "--recipe", str(tmp_path / "c.yaml"), "--out", str(out)]
    code, out_text, err = run([*args, "--train", "batch_size=16"], monkeypatch, capsys)
    assert code == 0, err
    assert "chosen: 02-quantize" in out_text and "speed" in out_text and "RSS MB" in out_text
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["original", "01-prune", "02-quantize"]
    for v in report["variants"]:
        for key in ("quality", "latency_ms_p50", "latency_ms_p95", "throughput_per_s", "size_bytes"):
            assert v[key] > 0
        assert v["peak_rss_mb"] > 50 and v["threads"] >= 1
    original, pruned, quantized = report["variants"]
    assert pruned["params"] < original["params"] and quantized["size_bytes"] < pruned["size_bytes"]
    assert "| variant |" in (out / "report.md").read_text()
    b = load_bundle(out / "bundle")  # the chosen bundle loads like any other and still predicts
    assert isinstance(b.model.head, Int8DynamicLinear)
    assert [r["step"] for r in b.model.compression] == ["prune", "quantize"]
    assert sum(b.model.compression[0]["attention"].values()) == 2  # vit_test: 2 layers x 2 heads, half go
    accuracy = b.task.evaluate(b.model, "test", 64, torch.device("cpu"))["accuracy"]
    assert accuracy == pytest.approx(quantized["quality"])
    with pytest.raises(BundleError, match="CPU only"):
        load_bundle(out / "bundle", device="meta")
    code, text, err = run(["eval", str(out / "bundle"), "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "accuracy" in text, err


def test_unstructured_pruning_says_what_it_saves(
    image_bundle: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "sparse"
    recipe = {"steps": [{"step": "prune", "unstructured": 0.8}], "reps": 5, "speed_rounds": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(recipe))
    code, text, err = run(
        ["compress", str(image_bundle), "--recipe", str(tmp_path / "c.yaml"), "--out", str(out)],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "neither latency nor the size on disk improves" in text
    original, sparse = json.loads((out / "report.json").read_text())["variants"]
    assert sparse["size_zipped_bytes"] < 0.6 * original["size_zipped_bytes"]
    from tansuo.compress.prune import sparsity

    assert sparsity(load_bundle(out / "bundle").model) == pytest.approx(0.8, abs=0.01)


def test_nothing_qualifies_keeps_the_original_and_exits_non_zero(
    image_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    fake = {
        "bundle": str(image_bundle),
        "recipe": {"max_drop": 0.1, "objective": "latency", "reps": 5, "large_batch": 4},
        "variants": [
            {"name": n, "steps": s, "quality": q, "latency_ms_p50": 2.0, "threads": 1}
            for n, s, q in (("original", [], 0.9), ("01-quantize", ["int8"], 0.5))
        ],
        "chosen": None,
    }
    monkeypatch.setattr("tansuo.variants.compress", lambda *a, **k: fake)
    out = tmp_path / "c"
    args = ["compress", str(image_bundle), "--quantize", "int8", "--max-drop", "0.1", "--out", str(out)]
    code, text, _ = run(args, monkeypatch, capsys)
    assert code == 1 and "the original stays" in text
    assert not (out / "bundle").exists()


def test_bad_requests_are_usage_errors_and_write_nothing(
    image_bundle: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "c"
    cases = [
        (["--prune", "heads=1.0"], "heads"),
        (["--prune", "heads=0.5", "--quantize", "int4"], "quantize"),
        (["--distill-into", "bert_test"], "family"),
        (["--distill-into", "vit_test", "--student", "num_classes=7"], "num_classes"),
        (["--distill-into", "no_such_model"], "no_such_model"),
        ([], "nothing to do"),
    ]
    for extra, words in cases:
        code, _, err = run(["compress", str(image_bundle), "--out", str(out), *extra], monkeypatch, capsys)
        assert code == 2 and words in err, (extra, err)
        assert not (out / "bundle").exists()


def test_shipped_compression_recipes_are_valid() -> None:
    paths = sorted((Path(__file__).parents[2] / "recipes" / "compress").glob("*.yaml"))
    assert paths
    for path in paths:
        assert path.read_text().startswith("# tansuo compress "), path
        recipe = load_compress_recipe(path)
        assert recipe.steps[-1].step == "quantize"


def test_distill_without_a_preset_copies_the_teachers_own_architecture(
    image_npz: Path, tmp_path: Path
) -> None:
    # the teacher was trained with overrides; the student is that architecture, with the step's changes
    from tansuo.variants import DistillStep, build_student

    recipe = image_recipe(image_npz, tmp_path / "run", max_steps=2, eval_every=2)
    recipe["model"]["overrides"] = {"embed_dim": 24, "num_heads": 3, "mlp_ratio": 2}
    bundle = load_bundle(Path(make_trainer(recipe).fit()["bundle"]))
    student = build_student(bundle, DistillStep(step="distill", overrides={"num_layers": 1}))
    teacher = bundle.model.config
    assert (student.config.embed_dim, student.config.num_heads, student.config.mlp_ratio) == (24, 3, 2)
    assert student.config.num_layers == 1 and teacher.num_layers != 1
    named = build_student(bundle, DistillStep(step="distill", into="vit_test"))  # a preset: its own defaults
    assert named.config.embed_dim != 24


def test_a_lora_bundle_is_compressed_as_its_merged_weights(text_file: Path, tmp_path: Path) -> None:
    """Quantizing a LoRA-tuned bundle quantizes base + adapter (merged first), not the base alone with
    the adapters left in fp32 beside it."""
    from tansuo.adapters import LoRAConfig, lora_, lora_layers
    from tansuo.bundle import save_bundle
    from tansuo.compress.weight_only import WeightOnlyLinear
    from tansuo.models import create_model
    from tansuo.variants.pipeline import run_steps
    from tansuo.variants.steps import QuantizeStep
    from tests.helpers import lm_recipe, task_from

    task = task_from(lm_recipe(text_file, tmp_path / "run"))
    torch.manual_seed(0)
    model = create_model("gpt_test", vocab_size=task.model_overrides()["vocab_size"])
    lora_(model, LoRAConfig(r=2, alpha=4, targets="all-linear"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.5)  # adapters that change the function
    model.eval()
    x = model.example_input()
    with torch.no_grad():
        adapted = model(x)
    save_bundle(tmp_path / "lora", model, task)
    step = QuantizeStep(step="quantize", mode="int8-weight")
    (_, path, _), *_ = list(run_steps(tmp_path / "lora", [step], tmp_path / "variants"))
    quantized = load_bundle(path).model
    assert not lora_layers(quantized)
    blocks = [m for n, m in quantized.named_modules() if n.startswith("stack.")]
    assert any(isinstance(m, WeightOnlyLinear) for m in blocks)
    assert not any(type(m) is torch.nn.Linear for m in blocks)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), adapted, rtol=0.05, atol=0.05)
