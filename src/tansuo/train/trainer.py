"""The one training loop, for every task.

The loop knows nothing about tasks: it asks the Task for micro-batches and a loss, steps AdamW on the
warm-up + cosine schedule, evaluates every ``eval_every`` steps, keeps the best bundle by the chosen metric,
checkpoints (atomically) and can resume bit for bit. Structure after nanoGPT's ``train.py``. On several
processes (``torchrun``, ``tansuo train --nproc-per-node N``) the same loop runs on every rank; what differs
(DDP or FSDP2, each rank's micro-batches, rank 0 alone writing) is in ``distributed.py``.

The efficiency switches of ``train:`` change how a step runs, not what it computes: ``compile``
(torch.compile; the first step's time is logged as a ``compile`` event, apart from throughput),
``activation_checkpointing`` (blocks/layers.py), ``precision`` (autocast; fp16 with a gradient scaler whose
state is checkpointed), ``optimizer_impl`` (optim.py) and ``ema`` (ema.py: the average is what is evaluated
and bundled, and is checkpointed). ``privacy`` changes what a step computes: DP-SGD (privacy.py: Poisson
batches, per-example clipping, calibrated noise, the accountant checkpointed with the rest; epsilon spent is
logged with the loss and recorded in each bundle's metrics).

Run folder (``train.out_dir``)::

    checkpoint.safetensors   latest resumable state
    metrics.jsonl            {"event": "train" | "eval" | "compile" | "end", "step": ..., ...} per line
    bundle/                  best model so far (see bundle.py)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tansuo.blocks import activation_checkpointing_
from tansuo.bundle import save_bundle, update_bundle_metrics
from tansuo.device import autocast_dtype, autocast_to, resolve_device
from tansuo.errors import RecipeError, TansuoError, TrainingDiverged
from tansuo.recipe import TrainConfig
from tansuo.tasks.base import Batch, Task
from tansuo.train.checkpoint import load_checkpoint, save_checkpoint
from tansuo.train.distributed import Parallel, rank_device
from tansuo.train.ema import ema_model
from tansuo.train.optim import build_optimizer, lr_at
from tansuo.train.privacy import DPSGD
from tansuo.train.progress import ProgressBar

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Step counts derived from the recipe and the data."""

    total_steps: int
    eval_every: int
    checkpoint_every: int
    steps_per_epoch: int | None


def make_plan(cfg: TrainConfig, task: Task, world_size: int = 1) -> Plan:
    """Resolve epochs into optimizer steps and pick evaluation/checkpoint intervals; an optimizer step
    takes ``grad_accum`` micro-batches on each of ``world_size`` processes."""
    micro_per_epoch = task.steps_per_epoch(cfg.batch_size)
    per_step = cfg.grad_accum * world_size
    steps_per_epoch = None if micro_per_epoch is None else max(1, micro_per_epoch // per_step)
    if cfg.max_steps is not None:
        total = cfg.max_steps
    elif steps_per_epoch is None:
        raise ValueError("train.epochs needs a data set of fixed size; give train.max_steps for this task")
    else:
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch or total
    return Plan(total, min(eval_every, total), cfg.checkpoint_every or eval_every, steps_per_epoch)


def metric_mode(metric: str) -> str:
    """Whether lower ("min") or higher ("max") is better: losses and perplexity go down, the rest up."""
    return "min" if metric.endswith("loss") or metric == "perplexity" else "max"


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """Train ``model`` on ``task`` as ``cfg`` says, writing into ``cfg.out_dir``.

    Args:
        task: the task that supplies batches, loss and metrics.
        model: a model from the registry (it must have ``model_name`` and ``config``).
        cfg: the recipe's ``train`` section.
        seed: the run's seed (recorded; data order is the task's pure function of it).
        recipe: the validated recipe, stored in every bundle.
        extra: modules trained beside the model (a distillation projection): optimised and checkpointed,
            but not part of the bundle.
        progress: show a Rich progress bar (the CLI turns it on; the library default is quiet logging);
            rank 0 alone shows it.
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        seed: int = 0,
        recipe: dict[str, Any] | None = None,
        extra: nn.Module | None = None,
        progress: bool = False,
    ) -> None:
        self.task, self.cfg, self.seed, self.recipe = task, cfg, seed, recipe
        self.device = rank_device(resolve_device(cfg.device))
        self.parallel = Parallel(cfg.parallel, self.device)
        if self.parallel.mode == "fsdp" and cfg.ema is not None:
            raise RecipeError(
                "train.parallel fsdp shards the weights: train.ema (a whole copy of them) is not supported "
                "with it; use ddp, or no ema"
            )
        self.progress = progress and self.parallel.is_main
        if cfg.threads:
            # tiny matmuls pay more for waking a second thread than they gain from it
            torch.set_num_threads(cfg.threads)
        self.model = model.to(self.device)
        if cfg.activation_checkpointing and not activation_checkpointing_(model):
            raise RecipeError(
                f"train.activation_checkpointing: {type(model).__name__} has no transformer layer stack to "
                "checkpoint; set it to false for this model"
            )
        self.step_model = torch.compile(model) if cfg.compile else model
        self.extra = None if extra is None else extra.to(self.device)
        self.trained = model if extra is None else nn.ModuleList([model, self.extra])
        # the loss of a micro-batch, through DDP or FSDP on several processes (before the optimizer: FSDP
        # replaces the parameters by their shards)
        self.loss = self.parallel.prepare(
            self.trained, model, lambda batch: task.loss(self.step_model, batch)
        )
        self.parallel.seed_rank(seed)
        betas = (cfg.beta1, cfg.beta2)
        self.optimizer = build_optimizer(
            self.trained,
            cfg.lr,
            cfg.weight_decay,
            betas,
            self.device,
            layer_decay=cfg.layer_decay,
            impl=cfg.optimizer_impl,
            kind=cfg.optimizer,
            momentum=cfg.momentum,
            lr_scales=cfg.lr_scales,
        )
        self.plan = make_plan(cfg, task, self.parallel.world)
        self.private: DPSGD | None = None
        if cfg.privacy is not None:
            self.private = DPSGD(
                task,
                model,
                cfg.privacy,
                batch_size=cfg.batch_size,
                total_steps=self.plan.total_steps,
                seed=seed,
                world_size=self.parallel.world,
            )
            self.optimizer = self.private.wrap(self.optimizer)
        self.global_batch = cfg.batch_size * self.parallel.world * cfg.grad_accum
        if self.parallel.world > 1:
            log.info(
                "%s on %d processes: global batch %d = %d per rank x %d ranks x %d accumulation",
                self.parallel.mode,
                self.parallel.world,
                self.global_batch,
                cfg.batch_size,
                self.parallel.world,
                cfg.grad_accum,
            )
        self.amp_dtype = autocast_dtype(self.device, cfg.precision)
        if self.amp_dtype is not None and self.device.type == "cpu":
            log.warning("train.precision %s on the CPU: correct but usually slower than fp32", cfg.precision)
        # fp16's narrow range needs the loss scaled up before backward (the scaler skips steps whose
        # gradients overflow and adapts the scale); disabled, every call passes straight through
        self.scaler = self.parallel.grad_scaler(enabled=self.amp_dtype == torch.float16)
        self.ema = None if cfg.ema is None else ema_model(model, cfg.ema)
        self.metric = cfg.best_metric or task.default_metric
        self.mode = cfg.best_mode or metric_mode(self.metric)
        self.out = Path(cfg.out_dir)
        self.checkpoint_path = self.out / "checkpoint.safetensors"
        self.bundle_path = self.out / "bundle"
        self.step = 0
        #: units (``task.unit``) trained on, all processes together, and seconds spent in training steps
        #: (evaluation and checkpoints left out): the D and the time of scaling laws and MFU
        self.units_trained = 0
        self.step_seconds = 0.0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The resumable state, whole on rank 0 (every rank must call it: FSDP gathers its shards)."""
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        ranks = self.parallel.rng_states()
        if ranks is not None:
            rng["ranks"] = ranks
        state = {
            "model": self.parallel.gather(self.model.state_dict()),
            "optimizer": self.parallel.gather(self.optimizer.state_dict()),
            "rng": rng,
            "trainer": {
                "step": self.step,
                "best": self.best,
                "best_step": self.best_step,
                "bad_evals": self.bad_evals,
                "seed": self.seed,
                "total_steps": self.plan.total_steps,
                "world_size": self.parallel.world,
                "global_batch": self.global_batch,
                "units_trained": self.units_trained,
                "step_seconds": self.step_seconds,
            },
        }
        if self.extra is not None:
            state["extra"] = self.parallel.gather(self.extra.state_dict())
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.private is not None:
            state["privacy"] = self.private.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a checkpoint of any world size with this run's global batch).

        Raises:
            TansuoError: The checkpoint was trained with another global batch.
        """
        t = state["trainer"]
        saved_global, saved_world = t.get("global_batch"), t.get("world_size", 1)
        if saved_global is not None and saved_global != self.global_batch:
            raise TansuoError(
                f"the checkpoint was trained with a global batch of {saved_global} and this run has "
                f"{self.global_batch} (train.batch_size {self.cfg.batch_size} x {self.parallel.world} "
                f"processes x train.grad_accum {self.cfg.grad_accum}); set train.grad_accum or "
                "train.batch_size so that they multiply to the same, or start without --resume"
            )
        self.parallel.load_model(self.model, state["model"])
        if self.extra is not None:
            self.parallel.load_model(self.extra, state["extra"])
        self.parallel.load_optimizer(self.optimizer, state["optimizer"])
        for name, part in (("scaler", self.scaler if self.scaler.is_enabled() else None), ("ema", self.ema)):
            if part is None:
                continue
            if name not in state:
                raise TansuoError(
                    f"the checkpoint has no {name} state: it was written with another train.precision or "
                    "train.ema; resume with the recipe it was started with"
                )
            part.load_state_dict(state[name])
        if self.private is not None:
            if "privacy" not in state:
                raise TansuoError(
                    "the checkpoint was trained without train.privacy: its steps spent no privacy budget the "
                    "accountant could count; resume with the recipe it was started with"
                )
            self.private.load_state_dict(state["privacy"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        same_rng = self.parallel.set_rng(state["rng"].get("ranks"), self.seed)
        if saved_world != self.parallel.world or not same_rng:
            log.warning(
                "resuming on %d processes a run checkpointed on %d: the same global batch and data, but "
                "no longer bit for bit the run it would have been",
                self.parallel.world,
                saved_world,
            )
        self.step, self.best, self.best_step, self.bad_evals = (
            t["step"],
            t["best"],
            t["best_step"],
            t["bad_evals"],
        )
        # checkpoints written before these counters existed count from the resumed step on
        self.units_trained, self.step_seconds = t.get("units_trained", 0), t.get("step_seconds", 0.0)

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0; every rank must call this, see ``state_dict``)."""
        state = self.state_dict()
        if self.parallel.is_main:
            save_checkpoint(self.checkpoint_path, state)

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or early stop) and return the best bundle's metrics."""
        main = self.parallel.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:  # rank 0 reads the file, every rank gets its contents
            state = load_checkpoint(self.checkpoint_path) if main else None
            self.load_state_dict(self.parallel.spread(state))
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        elif main and self.checkpoint_path.exists():
            log.warning(
                "%s exists and will be overwritten (use --resume to continue it)", self.checkpoint_path
            )
        with contextlib.ExitStack() as stack:
            # a resumed run appends to its log; a fresh run starts a new one; rank 0 alone writes it
            mode = "a" if resume else "w"
            self._log = (
                stack.enter_context(open(self.out / "metrics.jsonl", mode, encoding="utf-8"))
                if main
                else None
            )
            report = getattr(self.task, "data_report", None)  # what preparing the data did (PII scrubbed)
            if report and not resume:
                self._write({"event": "data", "step": self.step, **report})
            self._bar = bar = ProgressBar(self.plan.total_steps, self.task.unit, enabled=self.progress)
            with bar:
                bar.update(self.step, {})
                self._loop(bar)
            if not main:  # the best bundle and its held-back metrics are rank 0's to write
                return {"step": self.best_step, "bundle": str(self.bundle_path)}
            result = self._finish()
            self._write(
                {
                    "event": "end",
                    "step": self.step,
                    "steps_trained": self.step,
                    "units_trained": self.units_trained,
                    "step_seconds": self.step_seconds,
                    **result,
                }
            )
        return result

    def _loop(self, bar: ProgressBar) -> None:
        cfg, plan, task = self.cfg, self.plan, self.task
        # DP-SGD draws its own Poisson batches (privacy.py)
        batches = (
            None if self.private else self.parallel.batches(task, cfg.batch_size, self.step, cfg.grad_accum)
        )
        self.model.train()
        # throughput counts training steps only: evaluation and checkpoint time is left out
        window_loss, window_units, window_time, window_steps = 0.0, 0, 0.0, 0
        compiling = cfg.compile  # the first step of a compiled model compiles it: timed on its own
        while self.step < plan.total_steps:
            started = time.perf_counter()
            lr = lr_at(
                self.step,
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                warmup_steps=cfg.warmup_steps,
                total_steps=plan.total_steps,
                schedule=cfg.schedule,
            )
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            step_loss, step_units = 0.0, 0
            if self.private is not None:  # one Poisson batch, per-example gradients for the DPOptimizer
                step_loss, step_units = self.private.accumulate(
                    self.step, self.device, lambda: autocast_to(self.device, self.amp_dtype)
                )
            for micro in range(cfg.grad_accum if batches is not None else 0):
                batch = _to_device(next(batches), self.device)
                # several processes: gradients are averaged across ranks on the last micro-batch only
                with self.parallel.sync_gradients(last=micro == cfg.grad_accum - 1):
                    with autocast_to(self.device, self.amp_dtype):
                        loss = self.loss(batch)
                    self.scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_units += task.count(batch)
            # the step's loss (mean over ranks) and units (summed) as one process would count them
            step_loss, units = self.parallel.sum([step_loss, step_units])
            step_loss /= self.parallel.world
            step_units = int(units)
            if not math.isfinite(step_loss):  # before the bad step reaches the weights or a checkpoint
                self._diverged(step_loss)
            if cfg.grad_clip > 0 and self.private is None:  # DP-SGD clips each example's gradient instead
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(self.trained.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            self.units_trained += step_units
            self.step_seconds += time.perf_counter() - started
            window_loss += step_loss
            window_steps += 1
            if compiling:
                seconds = time.perf_counter() - started
                self._write({"event": "compile", "step": self.step, "seconds": seconds})
                log.info("torch.compile: the first step took %.1f s", seconds)
                compiling = False
            else:
                window_units += step_units
                window_time += time.perf_counter() - started
            if self.step % cfg.log_every == 0 or self.step == plan.total_steps:
                stats = {
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    f"{task.unit}_per_s": window_units / max(window_time, 1e-9),
                }
                if self.private is not None:
                    stats["epsilon"] = self.private.epsilon()
                self._write({"event": "train", "step": self.step, **stats})
                bar.update(self.step, stats)
                window_loss, window_units, window_time, window_steps = 0.0, 0, 0.0, 0
            else:
                bar.update(self.step, None)

            if self.step % plan.eval_every == 0 or self.step == plan.total_steps:
                stop = self._evaluate_and_keep()
                self.save_checkpoint()
                if stop:
                    log.info(
                        "early stop at step %d: no improvement in %d evaluations", self.step, self.bad_evals
                    )
                    break
            elif self.step % plan.checkpoint_every == 0:
                self.save_checkpoint()

    def _evaluate_and_keep(self) -> bool:
        """Evaluate on val (rank 0, the others wait for its verdict); save the bundle if it improved.
        Returns True when early stopping triggers."""
        # the average stands for the run; under FSDP, rank 0's copy with the gathered weights
        model = self.ema.module if self.ema is not None else self.parallel.full_model(self.model)
        stop = self._evaluate(model) if self.parallel.is_main else False
        return self.parallel.decide(stop)

    def _evaluate(self, model: nn.Module) -> bool:
        with autocast_to(self.device, self.amp_dtype):
            metrics = self.task.evaluate(model, "val", self.cfg.batch_size, self.device)
        self.model.train()
        self._write({"event": "eval", "step": self.step, "split": "val", **metrics})
        if not isinstance(metrics.get(self.metric), int | float):
            scalars = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
            raise RecipeError(f"train.best_metric {self.metric!r} is not computed; choose from {scalars}")
        value = metrics[self.metric]
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        # with a progress bar the best value shows in the bar; every evaluation is in metrics.jsonl
        log.log(
            logging.DEBUG if self.progress else logging.INFO,
            "step %d: val %s",
            self.step,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float)),
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            self._bar.best(f"best val {self.metric} {value:.4f} @ {self.step}")
            record: dict[str, Any] = {"step": self.step, "val": metrics}
            if self.private is not None:  # the guarantee of these weights: the budget spent up to this step
                record["privacy"] = self.private.report()
            save_bundle(self.bundle_path, model, self.task, record, self.recipe)
        else:
            self.bad_evals += 1
        patience = self.cfg.early_stop_patience
        return bool(patience) and self.bad_evals >= patience

    def _finish(self) -> dict[str, Any]:
        """Reload the best bundle's weights and add held-out metrics to it."""
        from tansuo.bundle import load_bundle

        best = load_bundle(self.bundle_path, device=self.device)
        result = dict(best.metrics)
        if self.task.heldout_split != "val":
            with autocast_to(self.device, self.amp_dtype):
                result[self.task.heldout_split] = self.task.evaluate(
                    best.model, self.task.heldout_split, self.cfg.batch_size, self.device
                )
            update_bundle_metrics(self.bundle_path, result)
        result["bundle"] = str(self.bundle_path)
        return result

    def _diverged(self, value: float) -> None:
        where = (
            f"the last good checkpoint is {self.checkpoint_path}"
            if self.checkpoint_path.exists()
            else "no checkpoint was written yet"
        )
        self._write({"event": "diverged", "step": self.step, "loss": str(value)})
        raise TrainingDiverged(
            f"loss became {value} at step {self.step}; {where}. "
            "Lower train.lr, raise train.warmup_steps or set train.grad_clip, then rerun."
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self._log is None:  # ranks other than 0
            return
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()
