"""The efficiency switches of ``train:``: each changes how a step runs, not what it computes."""

import json
from pathlib import Path

import pytest
import torch

from tansuo.blocks import activation_checkpointing_
from tansuo.device import autocast_dtype
from tansuo.errors import RecipeError, TansuoError
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.train.checkpoint import load_checkpoint
from tansuo.train.ema import ema_decay, ema_model
from tansuo.train.optim import build_optimizer
from tests.helpers import Interrupted, image_recipe, interrupt_after, lm_recipe, make_trainer


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    if name == "gpt_test":
        return (torch.randint(0, 64, (3, 16)),)
    if name == "vit_test":
        return (torch.randn(3, 1, 8, 8),)
    return (torch.randint(0, 100, (3, 16)),)


@pytest.mark.parametrize("name", ["gpt_test", "vit_test", "bert_test"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name: str) -> None:
    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)
        model = create_model(name, dropout=0.1)  # dropout: the recomputation must replay its masks
        assert activation_checkpointing_(model, checkpointing) >= 1
        model.train()
        torch.manual_seed(2)
        out = model(*_inputs(name))
        loss = (out[0] if isinstance(out, tuple) else out).float().pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert torch.equal(plain_loss, ckpt_loss)
    assert len(plain_grads) == len(ckpt_grads) > 0
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_keeps_names_and_recomputes() -> None:
    model = create_model("gpt_test")
    names = list(model.state_dict())
    activation_checkpointing_(model)
    assert list(model.state_dict()) == names  # bundles and checkpoints are unchanged
    calls = {"n": 0}
    layer = model.stack.layers[0]
    forward = layer.forward

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        return forward(*args, **kwargs)

    layer.forward = counted  # (forward hooks do not fire when checkpointing recomputes)
    model(torch.randint(0, 64, (2, 8))).float().sum().backward()
    assert calls["n"] == 2  # once forward, once again in the backward pass
    with torch.no_grad():
        calls["n"] = 0
        model(torch.randint(0, 64, (2, 8)))
    assert calls["n"] == 1  # inference does not recompute


def test_activation_checkpointing_on_a_model_without_layers_is_a_recipe_error(
    image_npz: Path, tmp_path: Path
) -> None:
    raw = image_recipe(image_npz, tmp_path / "run", activation_checkpointing=True)
    raw["model"]["name"] = "resnet_test"
    with pytest.raises(RecipeError, match="activation_checkpointing.*no transformer layer stack"):
        make_trainer(raw)


def test_ema_is_the_moving_average_of_the_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ema_model(model, 0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    ema.update_parameters(model)  # the first update copies
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)
        ema.update_parameters(model)
        d = min(0.9, (2 + step) / (11 + step))  # warmed up: 2/11, 3/12, ... until 0.9
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    assert ema_decay(0.9, 0) == pytest.approx(1 / 10) and ema_decay(0.9, 1000) == 0.9
    for e, p in zip(expected, ema.module.parameters(), strict=True):
        torch.testing.assert_close(p, e)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ema_model(model, 1.0)


def test_ema_leaves_training_alone_and_is_what_is_evaluated_and_bundled(
    image_npz: Path, tmp_path: Path
) -> None:
    from tansuo.bundle import load_bundle

    def train_losses(out: Path) -> list[float]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]

    plain = make_trainer(image_recipe(image_npz, tmp_path / "plain", max_steps=10, eval_every=10))
    plain.fit()
    averaged = make_trainer(image_recipe(image_npz, tmp_path / "ema", max_steps=10, eval_every=10, ema=0.8))
    averaged.fit()
    assert train_losses(tmp_path / "plain") == train_losses(tmp_path / "ema")
    for a, b in zip(plain.model.parameters(), averaged.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the raw weights trained exactly as without the average
    bundle = load_bundle(tmp_path / "ema" / "bundle")
    saved, raw, avg = bundle.model.state_dict(), averaged.model.state_dict(), averaged.ema.module.state_dict()
    assert all(torch.equal(saved[k], avg[k]) for k in saved)
    assert not all(torch.equal(saved[k], raw[k]) for k in saved)


def test_optimizer_implementations_agree() -> None:
    results = {}
    for impl in ("fused", "foreach", "for-loop"):
        torch.manual_seed(0)
        model = create_model("gpt_test")
        opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.99), torch.device("cpu"), impl=impl)
        for step in range(4):
            torch.manual_seed(step)
            model(torch.randint(0, 64, (2, 8))).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        results[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(results["fused"], results["for-loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["foreach"], results["for-loop"], rtol=1e-5, atol=1e-6)
    assert build_optimizer(model, 1e-3, 0.0, (0.9, 0.99), torch.device("cpu")).defaults["fused"]


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(cpu, "fp16") == torch.float16
    with pytest.raises(TansuoError, match="meta cannot autocast.*train.precision=auto or fp32"):
        autocast_dtype(torch.device("meta"), "bf16")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("precision", "fp8", "train.precision: must be one of"),
        ("optimizer_impl", "adam", "train.optimizer_impl: must be one of"),
        ("ema", 1.5, "train.ema: Input should be less than 1"),
        ("ema", 0, "train.ema: Input should be greater than 0"),
        ("activation_checkpointing", "sometimes", "train.activation_checkpointing"),
    ],
)
def test_bad_switch_values_are_recipe_errors(
    field: str, value: object, message: str, image_npz: Path, tmp_path: Path
) -> None:
    raw = image_recipe(image_npz, tmp_path / "run", **{field: value})
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)


def test_fp16_with_the_scaler_trains_and_resumes_bit_for_bit(text_file: Path, tmp_path: Path) -> None:
    def raw(out: Path) -> dict:
        return lm_recipe(
            text_file, out, max_steps=12, eval_every=6, checkpoint_every=3, precision="fp16", ema=0.9
        )

    full = make_trainer(raw(tmp_path / "a"))
    full.task.evaluate  # noqa: B018
    before = full.task.evaluate(full.model, "val", 4, full.device)["loss"]
    full.fit()
    assert full.scaler.is_enabled() and full.scaler.get_scale() > 0
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
        if '"event": "train"' in line
    ]
    assert losses[-1] < losses[0] and full.task.evaluate(full.model, "val", 4, full.device)["loss"] < before
    saved = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    assert saved["scaler"]["scale"] == full.scaler.get_scale() and "n_averaged" in saved["ema"]

    interrupted = make_trainer(raw(tmp_path / "b"))
    interrupt_after(interrupted, 8)  # inside step 9: the checkpoint of step 6 is the last
    with pytest.raises(Interrupted):
        interrupted.fit()
    torch.manual_seed(999)
    resumed = make_trainer(raw(tmp_path / "b"))
    resumed.fit(resume=True)
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    for states in (
        (full.model.state_dict(), resumed.model.state_dict()),
        (full.ema.state_dict(), resumed.ema.state_dict()),
    ):
        for (name, a), (_, b) in zip(states[0].items(), states[1].items(), strict=True):
            assert torch.equal(a, b), name


def test_resume_without_the_state_a_switch_needs_is_a_clear_error(text_file: Path, tmp_path: Path) -> None:
    make_trainer(lm_recipe(text_file, tmp_path / "run", max_steps=4, eval_every=4)).fit()
    with pytest.raises(TansuoError, match="no ema state.*resume with the recipe it was started with"):
        make_trainer(lm_recipe(text_file, tmp_path / "run", max_steps=8, ema=0.9)).fit(resume=True)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_logs_the_compile_time(text_file: Path, tmp_path: Path) -> None:
    def run(out: Path, compile_: bool) -> list[dict]:
        raw = lm_recipe(text_file, out, max_steps=6, eval_every=6, log_every=1, compile=compile_)
        raw["model"]["overrides"]["dropout"] = 0.0  # compiled dropout draws other masks than eager
        make_trainer(raw).fit()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    eager, compiled = run(tmp_path / "eager", False), run(tmp_path / "compiled", True)
    compile_events = [r for r in compiled if r["event"] == "compile"]
    assert len(compile_events) == 1 and compile_events[0]["step"] == 1 and compile_events[0]["seconds"] > 0
    assert not any(r["event"] == "compile" for r in eager)
    eager_losses = [r["loss"] for r in eager if r["event"] == "train"]
    compiled_losses = [r["loss"] for r in compiled if r["event"] == "train"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
