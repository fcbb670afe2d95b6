"""A task defined outside the package, in one file: regression of a number from a few numbers.

This module is the proof that tansuo's seams are open: it registers a task (``regress``), a model family
with a preset (``mlp_regress_test``) and two HTTP endpoints (``POST /v1/predict`` and ``POST /v1/regress``)
without touching ``src/``. Name it in ``TANSUO_PLUGINS=regress`` with this folder on ``PYTHONPATH`` and
``tansuo train / eval / predict / compress / explore / serve`` take ``task: regress`` recipes and bundles.

Data: a CSV file whose last column is the target and the others the features (a header row optional).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from torch import nn

from tansuo.data import split_indices
from tansuo.errors import DataError
from tansuo.models import register_model
from tansuo.models._registry import check_positive, check_types
from tansuo.serve.endpoints import ApiError, Endpoint, register_endpoint
from tansuo.tasks import Batch, TaskBase, register_task
from tansuo.tasks.base import batch_seed

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------ model
@dataclasses.dataclass
class MLPConfig:
    in_features: int = 4
    hidden: int = 32
    num_layers: int = 2

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ("in_features", "hidden", "num_layers"))


class MLPRegressor(nn.Module):
    family = "mlp"
    config_class = MLPConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden), nn.GELU()]
            width = config.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        return torch.randn(batch_size, self.config.in_features, device=self.head.weight.device)


@register_model
def mlp_regress_test(**overrides: Any) -> MLPRegressor:
    return MLPRegressor(MLPConfig(**overrides))


# ------------------------------------------------------------------------------------------- task
class RegressDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: str | None = None
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)


@register_task
class RegressTask(TaskBase):
    """Predict the last column of a CSV file from the others (mean squared error)."""

    name: ClassVar[str] = "regress"
    DataConfig: ClassVar[type[BaseModel]] = RegressDataConfig
    default_metric: ClassVar[str] = "r2"
    unit: ClassVar[str] = "samples"
    heldout_split: ClassVar[str] = "test"

    def __init__(self, data: RegressDataConfig, seed: int, in_features: int) -> None:
        self.data, self.seed, self.in_features = data, seed, in_features
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> RegressTask:
        assert isinstance(data, RegressDataConfig)
        task = cls(data, seed, in_features=0)
        task.in_features = task._load()["train"][0].shape[1]
        return task

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> RegressTask:
        info = json.loads((Path(bundle_dir) / "task.json").read_text(encoding="utf-8"))
        data = RegressDataConfig.model_validate(info["data"])
        if data_path is not None:
            data = data.model_copy(update={"path": data_path})
        return cls(data, info["seed"], info["in_features"])

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._splits is None:
            if self.data.path is None or not Path(self.data.path).is_file():
                raise DataError(f"data.path {self.data.path!r} is not a file; pass a CSV with --data")
            table = np.loadtxt(self.data.path, delimiter=",", dtype=np.float32, ndmin=2)
            x, y = torch.from_numpy(table[:, :-1]), torch.from_numpy(table[:, -1])
            parts = split_indices(len(y), self.data.splits, self.seed)
            self._splits = {s: (x[idx], y[idx]) for s, idx in zip(SPLITS, parts, strict=True)}
        return self._splits

    def state(self) -> dict[str, Any]:
        return {"in_features": self.in_features}

    def model_overrides(self) -> dict[str, Any]:
        return {"in_features": self.in_features}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return max(1, len(self._load()["train"][1]) // batch_size)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        x, y = self._load()["train"]
        n = start
        while True:
            g = torch.Generator().manual_seed(batch_seed(self.seed, n))
            idx = torch.randint(0, len(y), (batch_size,), generator=g)
            yield {"x": x[idx], "y": y[idx]}
            n += 1

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["x"]), batch["y"]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        pred, y = self.logits(model, batch)
        return F.mse_loss(pred.squeeze(-1).float(), y)

    def count(self, batch: Batch) -> int:
        return len(batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        x, y = self._load()[split]
        model.eval()
        pred = torch.cat(
            [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(y), batch_size)]
        ).squeeze(-1)
        mse = float(F.mse_loss(pred, y))
        return {"mse": mse, "r2": 1.0 - mse / max(float(y.var(unbiased=False)), 1e-12)}

    def read_inputs(self, path: Path) -> list[str]:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], device: torch.device) -> list[dict[str, Any]]:
        rows = []
        for i, text in enumerate(inputs):
            try:
                values = [float(v) for v in text.replace(",", " ").split()]
            except ValueError:
                raise DataError(f"input {i + 1}: {text!r} is not a list of numbers") from None
            if len(values) != self.in_features:
                raise DataError(f"input {i + 1}: {len(values)} numbers; the model takes {self.in_features}")
            rows.append(values)
        model.eval()
        out = model(torch.tensor(rows, device=device)).float().cpu().squeeze(-1)
        return [{"input": text, "value": float(v)} for text, v in zip(inputs, out, strict=True)]

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return f"{row['input']}  ->  {row['value']:.4f}"


# -------------------------------------------------------------------------------------- endpoints
class RegressRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[StrictFloat | StrictInt] | list[list[StrictFloat | StrictInt]] = Field(
        description="the features of one example, or a list of examples"
    )


@register_endpoint("regress")
class RegressPredict(Endpoint):
    """``POST /v1/predict``: the predicted value per example."""

    path = "/v1/predict"
    input_kind = "numbers"
    request_model = RegressRequest

    def items(self, request: RegressRequest) -> list[list[float]]:
        rows = request.inputs if request.inputs and isinstance(request.inputs[0], list) else [request.inputs]
        self._count(rows)
        for i, row in enumerate(rows):
            if len(row) != self.task.in_features:
                raise ApiError(
                    422, f"inputs[{i}] has {len(row)} numbers; the model takes {self.task.in_features}"
                )
        return [[float(v) for v in row] for row in rows]

    def run(self, items: list[list[float]]) -> list[float]:
        return self.model(torch.tensor(items, device=self.device)).float().cpu().squeeze(-1).tolist()

    def respond(self, request: RegressRequest, results: list[Any]) -> dict[str, Any]:
        return {"predictions": [{"value": v} for v in results]}

    def warm_up_items(self) -> list[list[float]]:
        return [[0.0] * self.task.in_features]

    def card(self) -> dict[str, Any]:
        return {"in_features": self.task.in_features}


@register_endpoint("regress")
class RegressValues(RegressPredict):
    """``POST /v1/regress``: the values alone, a second route of the same task."""

    path = "/v1/regress"
    summary = "Values only"

    def respond(self, request: RegressRequest, results: list[Any]) -> dict[str, Any]:
        return {"values": results}
