"""Training on several processes (gloo on the CPU, two ranks): DDP and FSDP against one process on the same
global batch, rank 0 alone writing, resume after a rank dies, checkpoints across world sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from tansuo.errors import RecipeError, TansuoError
from tansuo.recipe import validate_recipe
from tansuo.train.checkpoint import load_checkpoint
from tansuo.train.distributed import Parallel, sharded_grad_scaler
from tansuo.train.launch import LaunchConfig
from tansuo.train.setup import train_recipe
from tests.helpers import (
    Interrupted,
    classify_recipe,
    image_recipe,
    interrupt_after,
    lm_recipe,
    mlm_recipe,
    run_ranks,
    train_ranks,
)

# float tolerance between runs that sum the same gradients in a different order (two ranks against one
# process's accumulation; FSDP's reduce-scatter against DDP's all-reduce): observed differences are 0 to 1e-7
ATOL = 1e-5


def _lm(text: Path, out: Path, **train: object) -> dict:
    # no dropout: one process and two ranks draw their dropout masks from different random streams
    raw = lm_recipe(text, out, **{"max_steps": 6, "eval_every": 3, "threads": 1, **train})
    raw["model"]["overrides"]["dropout"] = 0.0
    return raw


def _one_process(raw: dict, data_root: Path, resume: bool = False, die: int | None = None) -> None:
    """Train in this process; ``die``: stop with :class:`Interrupted` at that micro-batch."""
    recipe, data = validate_recipe(raw)
    start = None if die is None else (lambda trainer: interrupt_after(trainer, die))
    try:
        train_recipe(recipe, data, data_root=data_root, resume=resume, on_start=start)
    except Interrupted:
        assert die is not None


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.safetensors")["model"]


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_two_ranks_equal_one_process_and_only_rank_0_writes(text_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _one_process(_lm(text_file, tmp_path / "one", grad_accum=2), data)
    # rank 1's recipe points at its own folder: whatever it wrote would be there
    train_ranks([_lm(text_file, tmp_path / "ddp"), _lm(text_file, tmp_path / "rank1")], data)

    assert not (tmp_path / "rank1").exists()
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {
        "checkpoint.safetensors",
        "metrics.jsonl",
        "bundle",
    }
    _assert_close(_weights(tmp_path / "one"), _weights(tmp_path / "ddp"))
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "ddp"), abs=1e-6)
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors")
    assert saved["trainer"]["world_size"] == 2 and saved["trainer"]["global_batch"] == 8
    assert len(saved["rng"]["ranks"]) == 2
    # the ranks draw from different random streams (dropout), rank 0 from the one-process stream
    assert not torch.equal(saved["rng"]["ranks"][0]["cpu"], saved["rng"]["ranks"][1]["cpu"])


def test_fsdp_equals_one_process_and_its_checkpoint_is_whole(text_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _one_process(_lm(text_file, tmp_path / "one", grad_accum=4), data)
    raws = [_lm(text_file, tmp_path / "fsdp", grad_accum=2, parallel="fsdp") for _ in range(2)]
    train_ranks(raws, data)

    _assert_close(_weights(tmp_path / "one"), _weights(tmp_path / "fsdp"))
    one = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors")["optimizer"]
    fsdp = load_checkpoint(tmp_path / "fsdp" / "checkpoint.safetensors")["optimizer"]
    assert one["state"].keys() == fsdp["state"].keys()  # whole moments, in the one-process layout
    for i in one["state"]:
        _assert_close(one["state"][i], fsdp["state"][i])
    bundle = tmp_path / "fsdp" / "bundle" / "model.safetensors"
    assert bundle.is_file()


def test_fsdp_trains_in_fp16_with_the_sharded_gradient_scaler(text_file: Path, tmp_path: Path) -> None:
    """fp16 under FSDP: the ranks agree on each step's overflow check (a sharded scaler), and the run is the
    one-process fp16 run, scale included, up to fp16 rounding of sums taken in another order."""
    data = tmp_path / "data"
    _one_process(_lm(text_file, tmp_path / "one", grad_accum=4, precision="fp16"), data)
    raws = [_lm(text_file, tmp_path / "fsdp", grad_accum=2, parallel="fsdp", precision="fp16")] * 2
    train_ranks(raws, data)

    one, fsdp = (load_checkpoint(tmp_path / r / "checkpoint.safetensors") for r in ("one", "fsdp"))
    torch.testing.assert_close(one["scaler"], fsdp["scaler"])
    _assert_close(one["model"], fsdp["model"], atol=2e-3)
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "fsdp"), abs=1e-2)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_the_sharded_scaler_skips_an_overflowing_step_with_fused_adamw(tmp_path: Path, impl: str) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.AdamW([w], lr=0.1, **{impl: True})
        scaler = sharded_grad_scaler("cpu", enabled=True)
        for grad, stepped in ((torch.tensor([1.0, float("inf"), 0.0, 0.0]), False), (torch.ones(4), True)):
            before = w.detach().clone()
            w.grad = grad * scaler.scale(torch.ones(())).item()  # backward of a scaled loss
            scaler.unscale_(opt)  # as the trainer does before clipping
            scaler.step(opt)
            scaler.update()
            assert (not torch.equal(w.detach(), before)) == stepped
        assert scaler.get_scale() == 65536.0 * 0.5  # backed off once, at the overflow
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # three runs of two processes
def test_resume_after_a_rank_dies_is_bit_exact(text_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"

    def raws(out: Path) -> list[dict]:
        # dropout on: each rank's random stream must be restored too
        return [lm_recipe(text_file, out, max_steps=8, eval_every=4, checkpoint_every=2, threads=1)] * 2

    train_ranks(raws(tmp_path / "full"), data)
    with pytest.raises(ProcessRaisedException, match="Interrupted"):
        train_ranks(raws(tmp_path / "cut"), data, die=(1, 11))  # rank 1 dies inside step 6
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["trainer"]["step"] == 4

    train_ranks(raws(tmp_path / "cut"), data, resume=True)
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")  # steps 2 and 4, then 6 and 8 resumed


@pytest.mark.slow  # two runs of two processes, three of one
def test_checkpoints_cross_world_sizes(text_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _one_process(_lm(text_file, tmp_path / "whole", grad_accum=2), data)

    # two ranks die inside step 5 (checkpoint at 3); one process with the same global batch finishes
    with pytest.raises(ProcessRaisedException, match="Interrupted"):
        train_ranks([_lm(text_file, tmp_path / "a")] * 2, data, die=(1, 9))
    assert load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")["trainer"]["step"] == 3
    _one_process(_lm(text_file, tmp_path / "a", grad_accum=2), data, resume=True)
    _assert_close(_weights(tmp_path / "whole"), _weights(tmp_path / "a"))

    # and the other way: one process stops inside step 5, two ranks finish (FSDP: loaded into shards)
    _one_process(_lm(text_file, tmp_path / "b", grad_accum=2), data, die=9)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")["trainer"]["step"] == 3
    train_ranks([_lm(text_file, tmp_path / "b", parallel="fsdp")] * 2, data, resume=True)
    _assert_close(_weights(tmp_path / "whole"), _weights(tmp_path / "b"))


@pytest.mark.slow  # a run of one process and one of two for each task
@pytest.mark.parametrize("task", ["image", "classify", "mlm"])
def test_every_task_trains_on_two_ranks(
    task: str, image_npz: Path, sentiment_tsv: Path, text_file: Path, tmp_path: Path
) -> None:
    def raw(out: Path, **train: object) -> dict:
        common = {"max_steps": 4, "eval_every": 4, "threads": 1, **train}
        if task == "image":  # resnet_test: BatchNorm buffers, which DDP keeps in step from rank 0
            r = image_recipe(image_npz, out, **common)
            r["model"]["name"] = "resnet_test"
            return r
        if task == "classify":
            return classify_recipe(sentiment_tsv, out, **common)
        return mlm_recipe(text_file, out, **common)  # forward_features + mlm_logits, no forward

    data = tmp_path / "data"
    _one_process(raw(tmp_path / "one", grad_accum=2), data)
    train_ranks([raw(tmp_path / "two")] * 2, data)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    if task == "image":  # BatchNorm's running statistics follow rank 0's micro-batches only
        one = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
        two = {k: v for k, v in two.items() if k in one}
    _assert_close(one, two)
    assert (tmp_path / "two" / "bundle" / "model.safetensors").is_file()


def _distill(rank: int, raw: dict, data_root: str) -> None:
    """A GPT student distilled from a GPT teacher with a hidden-state projection (the trainer's ``extra``)."""
    from tansuo.compress.distill import DistillTask
    from tansuo.device import resolve_device
    from tansuo.models import create_model
    from tansuo.train.distributed import main_first, process_group
    from tansuo.train.setup import build_run
    from tansuo.train.trainer import Trainer

    recipe, data = validate_recipe(raw)
    with process_group(resolve_device("cpu"), 60):
        with main_first():
            run = build_run(recipe, data, Path(data_root))
        torch.manual_seed(7)
        teacher = create_model("gpt_test", **run.task.model_overrides(), embed_dim=48, dropout=0.0)
        task = DistillTask(run.task, teacher, run.model, hidden=1.0)
        Trainer(task, run.model, recipe.train, seed=recipe.seed, extra=task.extra).fit()


@pytest.mark.slow  # a run of two processes
def test_distillation_trains_its_projection_on_two_ranks(text_file: Path, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    _distill(0, _lm(text_file, tmp_path / "one", grad_accum=2, max_steps=4), data)
    run_ranks(_distill, 2, _lm(text_file, tmp_path / "two", max_steps=4), data)
    one = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors")
    two = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    _assert_close(one["model"], two["model"])
    _assert_close(one["extra"], two["extra"])  # the projection trained the same, not only the student
    assert not torch.equal(two["extra"]["0.proj.weight"], torch.zeros_like(two["extra"]["0.proj.weight"]))


def test_resume_with_another_global_batch_is_refused(text_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _one_process(_lm(text_file, tmp_path / "run", max_steps=2, eval_every=2), data)
    with pytest.raises(TansuoError, match=r"global batch of 4 .* has 8 .*train.grad_accum"):
        _one_process(_lm(text_file, tmp_path / "run", grad_accum=2), data, resume=True)


def test_fsdp_needs_several_processes() -> None:
    with pytest.raises(RecipeError, match="train.parallel: fsdp .* --nproc-per-node"):
        Parallel("fsdp", torch.device("cpu"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nproc_per_node": 0}, "--nproc-per-node must be 1 or more"),
        ({"nproc_per_node": 2, "nnodes": 2}, "--master-addr HOST and --master-port"),
        ({"nproc_per_node": 2, "nnodes": 2, "node_rank": 2, "master_port": 29500}, "--node-rank"),
        ({"nproc_per_node": 2, "master_port": 70000}, "--master-port must be a TCP port"),
    ],
)
def test_launch_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(TansuoError, match=message):
        LaunchConfig(**kwargs)


def test_launch_flags_for_torchrun() -> None:
    assert LaunchConfig(2).torchrun_args() == ["--nproc-per-node=2", "--nnodes=1", "--standalone"]
    assert LaunchConfig(
        4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400
    ).torchrun_args() == [
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=29400",
    ]
