"""DP-SGD (train/privacy.py): per-example gradients, the accountant, private runs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tansuo.errors import RecipeError, TansuoError
from tansuo.models import create_model
from tansuo.train.checkpoint import load_checkpoint
from tansuo.train.privacy import hooked_gradients, hooks_apply, per_example_gradients
from tests.helpers import Interrupted, classify_recipe, image_recipe, make_trainer


def _backward_one_by_one(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    n = len(next(iter(batch.values())))
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(n):
        model.zero_grad()
        loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                out.setdefault(name, []).append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def _image_loss(model, b):
    return F.cross_entropy(model(b["x"]), b["y"])


def _text_loss(model, b):
    mask, types = b["attention_mask"].bool(), b["token_type_ids"]
    return F.cross_entropy(model(b["input_ids"], attention_mask=mask, token_type_ids=types), b["y"])


def _lm_loss(model, b):
    return F.cross_entropy(model(b["t"][:, :-1]).flatten(0, 1), b["t"][:, 1:].flatten())


def _cases():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 6:] = 0  # one padded text
    types = torch.zeros_like(ids)
    text = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "y": ids[:, 0] % 3}
    return [
        ("vit_test", {"num_classes": 4, "image_size": 8, "in_channels": 1}, _image_loss,
         {"x": torch.randn(4, 1, 8, 8, generator=g), "y": torch.tensor([0, 1, 2, 3])}),
        ("resnet_test", {"num_classes": 4, "norm": "group", "norm_groups": 4}, _image_loss,
         {"x": torch.randn(4, 1, 8, 8, generator=g), "y": torch.tensor([0, 1, 2, 3])}),
        ("bert_test", {"vocab_size": 50, "num_classes": 3}, _text_loss, text),
        ("gpt_test", {"vocab_size": 50}, _lm_loss, {"t": torch.randint(0, 50, (4, 9), generator=g)}),
        ("gpt_test", {"vocab_size": 50, "norm": "rmsnorm", "positions": "rotary", "mlp": "swiglu"}, _lm_loss,
         {"t": torch.randint(0, 50, (4, 9), generator=g)}),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "overrides", "loss_fn", "batch"), _cases())
def test_per_example_gradients_equal_one_backward_per_example(name, overrides, loss_fn, batch):
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()  # no dropout: the two ways must see the same network
    grads, losses = per_example_gradients(model, loss_fn, batch)
    expected = _backward_one_by_one(model, loss_fn, batch)
    assert set(grads) == set(expected)
    for k, g in grads.items():
        torch.testing.assert_close(g, expected[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    want = torch.stack([loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(4)])
    torch.testing.assert_close(losses, want.detach())


def test_only_trainable_parameters_get_per_example_gradients():
    model = create_model("vit_test", num_classes=4, image_size=8, in_channels=1).eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    batch = {"x": torch.randn(3, 1, 8, 8), "y": torch.tensor([0, 1, 2])}
    grads, _ = per_example_gradients(model, _image_loss, batch)
    assert set(grads) == {"head.weight", "head.bias"}


def _lora(model, dropout=0.0):
    from tansuo.adapters.lora import LoRAConfig, freeze_base_, lora_

    lora_(model, LoRAConfig(r=2, alpha=4.0, dropout=dropout))
    freeze_base_(model, ["head"])
    for layer in model.modules():  # B starts at zero: give it values, so that A's gradient is not zero
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def _hooked_cases():  # without dropout: the two ways must see the same network, in training mode
    cases = {c[0]: c for c in _cases()}
    vit_probe = create_model("vit_test", num_classes=4, image_size=8, in_channels=1, dropout=0.0)
    for n, p in vit_probe.named_parameters():
        p.requires_grad_(n.startswith("head."))  # a frozen backbone under a trained head
    return [
        ("resnet_test", create_model("resnet_test", **cases["resnet_test"][1]), *cases["resnet_test"][2:]),
        (
            "bert_test+lora",
            _lora(create_model("bert_test", **cases["bert_test"][1], dropout=0.0)),
            *cases["bert_test"][2:],
        ),
        ("vit_test head", vit_probe, *cases["vit_test"][2:]),
    ]


@pytest.mark.parametrize(
    ("name", "model", "loss_fn", "batch"), _hooked_cases(), ids=["resnet", "lora", "probe"]
)
def test_opacus_hooks_give_the_same_per_example_gradients_as_vmap(name, model, loss_fn, batch):
    model.train()  # the hooks record in training mode
    assert hooks_apply(model)
    expected, losses = per_example_gradients(model, loss_fn, batch)
    grads, summed = hooked_gradients(model, loss_fn, batch)
    assert set(grads) == set(expected)
    for k, g in grads.items():
        assert g.abs().sum() > 0 or k.startswith("mlm_head."), f"{name}: {k} got no gradient"
        torch.testing.assert_close(g, expected[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    torch.testing.assert_close(summed, losses.sum())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # removed


def test_hooks_are_not_used_where_they_cannot_give_every_gradient():
    assert not hooks_apply(
        create_model("vit_test", num_classes=4, image_size=8, in_channels=1)
    )  # class token
    assert not hooks_apply(create_model("bert_test", vocab_size=50, num_classes=3))  # LearnedPositions
    assert not hooks_apply(_lora(create_model("bert_test", vocab_size=50, num_classes=3), dropout=0.1))


def _private(npz: Path, out: Path, **train: object) -> dict:
    # a large noise multiplier: Opacus' RDP calibration and epsilon take a fraction of a second (seconds when
    # the noise is small)
    privacy = {"target_epsilon": 1.0, "delta": 1e-3, "max_grad_norm": 1.0, "accountant": "rdp"}
    raw = image_recipe(npz, out, privacy=privacy, grad_clip=0.0, **{"threads": 1, **train})
    raw["data"].update(mean=[3.0], std=[4.0])  # public statistics: the training split's are refused
    return raw


def _private_classify(tsv: Path, tokenizer: Path, out: Path, **train: object) -> dict:
    raw = classify_recipe(tsv, out, **train)
    raw["data"]["tokenizer"] = str(tokenizer)  # learned from public text: one trained on tsv is refused
    return raw


def test_accountant_matches_opacus_for_the_same_noise_rate_and_steps(image_npz, tmp_path):
    from opacus.accountants import RDPAccountant

    trainer = make_trainer(_private(image_npz, tmp_path / "run", max_steps=6, eval_every=6))
    dp = trainer.private
    assert dp is not None
    # Poisson batches: a pure function of the step, of size batch_size on average
    assert torch.equal(dp.sample(3), dp.sample(3)) and not torch.equal(dp.sample(3), dp.sample(4))
    sizes = [len(dp.sample(s)) for s in range(200)]
    assert abs(sum(sizes) / 200 - 16) < 1.5 and len(set(sizes)) > 3
    sample = dp.sample
    dp.sample = lambda step: torch.zeros(0, dtype=torch.long) if step == 2 else sample(step)  # an empty batch
    trainer.fit()
    reference = RDPAccountant()
    for _ in range(6):
        reference.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    assert dp.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-12)
    assert dp.sample_rate == pytest.approx(16 / 128)  # batch 16 of 128 training images (80% of 160)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_spends_the_target_over_the_planned_steps(accountant):
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=200, accountant=accountant
    )
    acc = create_accountant(accountant)
    for _ in range(200):
        acc.step(noise_multiplier=sigma, sample_rate=0.05)
    assert 2.9 <= acc.get_epsilon(delta=1e-5) <= 3.0


def test_private_run_logs_epsilon_within_target_and_bundles_it(image_npz, tmp_path):
    trainer = make_trainer(_private(image_npz, tmp_path / "run", max_steps=10, log_every=2, eval_every=5))
    result = trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [e["epsilon"] for e in events if e["event"] == "train"]
    assert len(eps) == 5 and eps == sorted(eps) and 0 < eps[0] < eps[-1] <= 1.0
    assert eps[-1] > 0.98  # the noise was calibrated to spend (nearly) all of it over the 10 steps
    privacy = json.loads((tmp_path / "run" / "bundle" / "metrics.json").read_text())["privacy"]
    assert privacy["steps"] == result["step"] and privacy["epsilon"] <= 1.0
    assert privacy["delta"] == 1e-3 and privacy["noise_multiplier"] > 0
    # the served card (/v1/model) carries the bundle's metrics, so its guarantee
    from fastapi.testclient import TestClient

    from tansuo.bundle import load_bundle
    from tansuo.serve.app import ServeConfig, Server, create_app

    server = Server(load_bundle(tmp_path / "run" / "bundle"), ServeConfig(), torch.device("cpu"))
    with TestClient(create_app(server)) as client:
        card = client.get("/v1/model").json()
    assert card["metrics"]["privacy"]["epsilon"] == privacy["epsilon"]


def test_private_run_resumes_bit_for_bit_with_the_accountant(image_npz, tmp_path):
    whole = make_trainer(_private(image_npz, tmp_path / "whole", max_steps=8, eval_every=4))
    whole.fit()
    half = make_trainer(_private(image_npz, tmp_path / "half", max_steps=8, eval_every=4))
    accumulate = half.private.accumulate

    def stop_at_step_6(step, *args):  # killed two steps after the checkpoint at step 4
        if step == 6:
            raise Interrupted
        return accumulate(step, *args)

    half.private.accumulate = stop_at_step_6
    with pytest.raises(Interrupted):
        half.fit()
    saved = load_checkpoint(tmp_path / "half" / "checkpoint.safetensors")["privacy"]
    assert saved["history"][0][2] == 4
    resumed = make_trainer(_private(image_npz, tmp_path / "half", max_steps=8, eval_every=4))
    resumed.fit(resume=True)
    assert resumed.private.accountant.history == whole.private.accountant.history
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_private_classify_trains(sentiment_tsv, public_tokenizer, tmp_path):
    privacy = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp"}
    raw = _private_classify(
        sentiment_tsv, public_tokenizer, tmp_path / "run", max_steps=4, privacy=privacy, eval_every=4
    )
    result = make_trainer(raw).fit()
    assert 0 < result["privacy"]["epsilon"] <= 1.0


def test_private_lora_classify_trains_on_opacus_hooks(sentiment_tsv, public_tokenizer, tmp_path):
    privacy = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp"}
    lora = {"r": 2, "alpha": 4.0, "modules_to_save": ["head"]}
    raw = _private_classify(
        sentiment_tsv,
        public_tokenizer,
        tmp_path / "run",
        max_steps=3,
        privacy=privacy,
        eval_every=3,
        lora=lora,
    )
    trainer = make_trainer(raw)
    assert trainer.private.hooks
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    assert 0 < result["privacy"]["epsilon"] <= 1.0
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed), changed


def test_private_bitfit_classify_trains_only_biases_and_head_on_opacus_hooks(
    sentiment_tsv, public_tokenizer, tmp_path
):
    privacy = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp", "group_norms": {"head": 1.0}}
    raw = _private_classify(
        sentiment_tsv,
        public_tokenizer,
        tmp_path / "run",
        max_steps=3,
        privacy=privacy,
        eval_every=3,
        trainable=["stack.*.bias", "head.*"],
    )
    trainer = make_trainer(raw)
    assert trainer.private.hooks  # Linear and LayerNorm give their biases' per-example gradients
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("stack.") for n in changed) and "head.weight" in changed
    assert all(n.endswith(".bias") or n.startswith("head.") for n in changed), changed


@pytest.mark.parametrize(("lora", "text_chunk"), [(True, 3), (True, 64), (False, 3)])
def test_every_example_is_clipped_once_whatever_the_chunks(
    sentiment_tsv, public_tokenizer, tmp_path, monkeypatch, lora, text_chunk
):
    import tansuo.train.privacy as privacy

    monkeypatch.setattr(privacy, "TEXT_CHUNK", text_chunk)  # texts sorted by length, chunks of 3 or all
    adapters = {"lora": {"r": 2, "alpha": 4.0, "modules_to_save": ["head"]}} if lora else {}
    privacy_cfg = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp", "max_grad_norm": 0.05}
    raw = _private_classify(
        sentiment_tsv, public_tokenizer, tmp_path / "run", max_steps=2, privacy=privacy_cfg, **adapters
    )
    trainer = make_trainer(raw)
    dp, model = trainer.private, trainer.model.train()
    assert dp.hooks == lora
    dp.accumulate(0, torch.device("cpu"))
    dp.optimizer.clip_and_accumulate()
    # the reference: the whole batch at once on torch.func, each example clipped to the norm by hand
    batch = trainer.task.examples("train", dp.sample(0), 0)
    assert batch["attention_mask"].sum(1).unique().numel() > 2  # texts of several lengths
    grads, _ = per_example_gradients(model, trainer.task.loss, batch)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any()
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = torch.einsum("b,b...->...", factor, grads[name])
            torch.testing.assert_close(p.summed_grad, want, atol=1e-6, rtol=1e-4, msg=name)


#: what a private classifier trains in the clipping tests: LoRA adapters and the head, or the whole body
#: but its embedding tables (Opacus' hooks cover it; the learned positions are not a layer they know)
TUNED = {
    "lora": {"lora": {"r": 2, "alpha": 4.0, "modules_to_save": ["head"]}},
    "body": {"trainable": ["stack.*", "emb_norm.*", "head.*"]},
}


def _one_clipped_lora_step(
    sentiment_tsv, public_tokenizer, tmp_path, monkeypatch, tuned="lora", **privacy_cfg
):
    """A private classifier's first step accumulated and clipped (texts in chunks of 3), its trained
    parameters, and the per-example gradients of the same batch from torch.func for reference."""
    import tansuo.train.privacy as privacy

    monkeypatch.setattr(privacy, "TEXT_CHUNK", 3)
    privacy_cfg = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp", **privacy_cfg}
    raw = _private_classify(
        sentiment_tsv, public_tokenizer, tmp_path / "run", max_steps=2, privacy=privacy_cfg, **TUNED[tuned]
    )
    trainer = make_trainer(raw)
    dp, model = trainer.private, trainer.model.train()
    dp.accumulate(0, torch.device("cpu"))
    dp.optimizer.clip_and_accumulate()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = trainer.task.examples("train", dp.sample(0), 0)
    grads, _ = per_example_gradients(model, trainer.task.loss, batch)
    return dp, trained, grads


def test_per_layer_clipping_clips_each_tensor_to_its_share(
    sentiment_tsv, public_tokenizer, tmp_path, monkeypatch
):
    dp, trained, grads = _one_clipped_lora_step(
        sentiment_tsv, public_tokenizer, tmp_path, monkeypatch, max_grad_norm=0.05, clipping="per_layer"
    )
    share = 0.05 / len(trained) ** 0.5
    assert dp.optimizer.max_grad_norm == pytest.approx(0.05)  # the noise is sized for the whole norm
    clipped = 0
    for name, p in trained.items():
        factor = (share / (grads[name].flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        clipped += int((factor < 1).sum())
        want = torch.einsum("b,b...->...", factor, grads[name])
        torch.testing.assert_close(p.summed_grad, want, atol=1e-6, rtol=1e-4, msg=name)
    assert clipped > 0


def test_group_clipping_clips_each_group_apart_and_noises_it_in_proportion(
    sentiment_tsv, public_tokenizer, tmp_path, monkeypatch
):
    dp, trained, grads = _one_clipped_lora_step(
        sentiment_tsv, public_tokenizer, tmp_path, monkeypatch, max_grad_norm=0.01, group_norms={"head": 0.5}
    )
    groups = {"head": [n for n in trained if n.startswith("head.")]}
    groups["rest"] = [n for n in trained if n not in groups["head"]]
    assert groups["head"] and groups["rest"]
    for group, norm in (("head", 0.5), ("rest", 0.01)):
        norms = torch.stack([grads[n].flatten(1).norm(dim=1) for n in groups[group]]).norm(dim=0)
        factor = (norm / (norms + 1e-6)).clamp(max=1.0)
        assert (factor < 1).any(), group
        for n in groups[group]:
            want = torch.einsum("b,b...->...", factor, grads[n])
            torch.testing.assert_close(trained[n].summed_grad, want, atol=1e-6, rtol=1e-4, msg=n)
    # the noise: sigma * sqrt(2 groups) * the group's norm, on a zero sum
    torch.manual_seed(0)
    for p in trained.values():
        p.summed_grad = torch.zeros_like(p.summed_grad)
    dp.optimizer.add_noise()
    for group, norm in (("head", 0.5), ("rest", 0.01)):
        noise = torch.cat([trained[n].grad.flatten() for n in groups[group]])
        want = dp.noise_multiplier * 2**0.5 * norm
        assert noise.numel() > 50
        assert abs(noise.std().item() / want - 1) < 0.3, (group, noise.numel())


@pytest.mark.parametrize("tuned", ["lora", "body"])
@pytest.mark.parametrize("group_norms", [{}, {"head": 0.5}])
def test_ghost_clipping_gives_the_clipped_sums_of_per_example_gradients(
    sentiment_tsv, public_tokenizer, tmp_path, monkeypatch, tuned, group_norms
):
    dp, trained, grads = _one_clipped_lora_step(
        sentiment_tsv,
        public_tokenizer,
        tmp_path,
        monkeypatch,
        tuned,
        max_grad_norm=0.01,
        group_norms=group_norms,
        grad_sample_mode="ghost",
    )
    assert dp.ghost and len(dp.sample(0)) > 3  # several chunks of 3 texts, each summed into the optimizer's
    groups = {"rest": list(trained)}
    if group_norms:
        groups = {"head": [n for n in trained if n.startswith("head.")]}
        groups["rest"] = [n for n in trained if n not in groups["head"]]
    for group, names in groups.items():
        norm = group_norms.get(group, 0.01)
        norms = torch.stack([grads[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)
        factor = (norm / (norms + 1e-6)).clamp(max=1.0)
        assert (factor < 1).any(), group
        for n in names:
            want = torch.einsum("b,b...->...", factor, grads[n])
            torch.testing.assert_close(trained[n].summed_grad, want, atol=1e-6, rtol=1e-3, msg=n)


@pytest.mark.parametrize("privacy_cfg", [{"group_norms": {"head": 0.5}}, {"grad_sample_mode": "ghost"}])
def test_an_empty_poisson_batch_is_a_step_of_noise(sentiment_tsv, public_tokenizer, tmp_path, privacy_cfg):
    privacy_cfg = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp", **privacy_cfg}
    raw = _private_classify(
        sentiment_tsv, public_tokenizer, tmp_path / "run", max_steps=1, privacy=privacy_cfg, **TUNED["lora"]
    )
    trainer = make_trainer(raw)
    dp, model = trainer.private, trainer.model
    dp.sample = lambda step: torch.zeros(0, dtype=torch.long)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit()
    assert dp.epsilon() > 0  # the accountant counted the step
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_ghost_clipping_needs_opacus_hooks_and_flat_clipping(sentiment_tsv, public_tokenizer, tmp_path):
    privacy_cfg = {"target_epsilon": 1.0, "delta": 1e-3, "grad_sample_mode": "ghost"}
    raw = _private_classify(
        sentiment_tsv, public_tokenizer, tmp_path / "run", max_steps=1, privacy=privacy_cfg
    )
    with pytest.raises(RecipeError, match="ghost needs Opacus' hooks on every trained layer"):
        make_trainer(raw)  # the learned positions are trained too
    privacy_cfg["clipping"] = "per_layer"
    with pytest.raises(RecipeError, match="use clipping: flat"):
        make_trainer(raw)


class _Twice(nn.Module):
    """One Linear layer applied twice (tied weights), or a model returning a pair."""

    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.lin, self.pair = nn.Linear(4, 4), pair

    def forward(self, x: torch.Tensor):
        return (self.lin(x), x) if self.pair else self.lin(self.lin(x))


@pytest.mark.parametrize(("pair", "match"), [(False, "tying"), (True, "one tensor with a row per example")])
def test_ghost_clipping_refuses_what_it_cannot_clip(pair, match):
    from tansuo.train.dp_ghost import ghost_clipped_sums

    model = _Twice(pair)

    def loss_fn(m, b):
        out = m(b["x"])
        return (out[0] if pair else out).pow(2).mean()

    groups = {"lin.weight": 0, "lin.bias": 0}
    with pytest.raises(TansuoError, match=match):
        ghost_clipped_sums(model, loss_fn, {"x": torch.randn(3, 4)}, groups, [1.0])
    assert all(getattr(p, "_norm_sample", None) is None for p in model.parameters())  # hooks gone


def test_group_norms_must_name_trained_parameters(sentiment_tsv, public_tokenizer, tmp_path):
    privacy_cfg = {"target_epsilon": 1.0, "delta": 1e-3, "group_norms": {"classifier": 1.0}}
    raw = _private_classify(
        sentiment_tsv,
        public_tokenizer,
        tmp_path / "run",
        max_steps=1,
        privacy=privacy_cfg,
        lora={"r": 2, "modules_to_save": ["head"]},
    )
    with pytest.raises(RecipeError, match="no trained parameter's name starts with classifier"):
        make_trainer(raw)
    privacy_cfg.update(group_norms={"head": 1.0}, clipping="per_layer")
    with pytest.raises(RecipeError, match="does not combine"):
        make_trainer(
            _private_classify(
                sentiment_tsv, public_tokenizer, tmp_path / "b", max_steps=1, privacy=privacy_cfg
            )
        )


def test_refuses_statistics_of_the_private_data_computed_outside_dp_sgd(image_npz, sentiment_tsv, tmp_path):
    raw = _private(image_npz, tmp_path / "image")
    del raw["data"]["mean"], raw["data"]["std"]
    with pytest.raises(
        RecipeError, match=r"training images' per-channel mean and std; set data.mean and data"
    ):
        make_trainer(raw)
    privacy = {"target_epsilon": 1.0, "delta": 1e-3}
    with pytest.raises(RecipeError, match="wordpiece tokenizer is trained on the training texts"):
        make_trainer(classify_recipe(sentiment_tsv, tmp_path / "text", privacy=privacy))


def test_given_statistics_normalise_the_images(image_npz, tmp_path):
    raw = image_recipe(image_npz, tmp_path / "run")
    raw["data"].update(mean=[3.0], std=[4.0])
    task = make_trainer(raw).task
    assert task.training_statistics is None
    torch.testing.assert_close(task.normalize(torch.full((1, 1, 2, 2), 7.0)), torch.ones(1, 1, 2, 2))
    raw["data"].update(mean=[3.0, 1.0])
    with pytest.raises(TansuoError, match="data.mean has 2 values; the images have 1 channels"):
        make_trainer(raw)


def test_refuses_batchnorm_models(image_npz, tmp_path):
    raw = _private(image_npz, tmp_path / "run")
    raw["model"] = {"name": "resnet_test"}
    with pytest.raises(RecipeError, match=r"resnet_test \(ResNet\).*BatchNorm.*model.overrides.norm=group"):
        make_trainer(raw)


def test_a_group_norm_resnet_trains_privately(image_npz, tmp_path):
    raw = _private(image_npz, tmp_path / "run", max_steps=3, eval_every=3)
    raw["model"] = {"name": "resnet_test", "overrides": {"norm": "group", "norm_groups": 4}}
    result = make_trainer(raw).fit()
    assert 0 < result["privacy"]["epsilon"] <= 1.0


def test_refuses_tasks_without_examples(text_file, tmp_path):
    from tests.helpers import lm_recipe

    raw = lm_recipe(text_file, tmp_path / "run", privacy={"target_epsilon": 3.0})
    with pytest.raises(RecipeError, match="'lm' task cannot address single examples"):
        make_trainer(raw)


@pytest.mark.parametrize(
    ("field", "value"),
    [("grad_accum", 2), ("precision", "fp16"), ("compile", True), ("activation_checkpointing", True)],
)
def test_refuses_combinations(image_npz, tmp_path, field, value):
    with pytest.raises(RecipeError, match=f"train.privacy does not combine with train.{field}"):
        make_trainer(_private(image_npz, tmp_path / "run", **{field: value}))


def test_refuses_mixup(image_npz, tmp_path):
    raw = _private(image_npz, tmp_path / "run", max_steps=2)
    raw["data"]["mixup"] = 0.5
    with pytest.raises(TansuoError, match="data.mixup"):
        make_trainer(raw).fit()


def test_resume_refuses_a_non_private_checkpoint(image_npz, tmp_path):
    make_trainer(image_recipe(image_npz, tmp_path / "run", max_steps=2)).fit()
    with pytest.raises(TansuoError, match="without train.privacy"):
        make_trainer(_private(image_npz, tmp_path / "run", max_steps=4)).fit(resume=True)
