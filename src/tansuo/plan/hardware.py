"""Accelerators a plan prices training on: peak FLOP/s, memory and price per hour, each with its source.

The package ships ``hardware.yaml`` (H100 SXM, H200, A100 80GB, L4 and a 2-core CPU, from their datasheets and
2024 list prices); ``tansuo plan --hardware FILE`` reads a file of the same shape instead. Every entry is
validated and a bad one is a :class:`~tansuo.plan.points.PlanError` naming the file, the entry and the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from tansuo.plan.points import PlanError
from tansuo.recipe import Strict, format_errors


class Accelerator(Strict):
    name: str = Field(min_length=1, description="what --accelerator names it by")
    peak_bf16_tflops: float | None = Field(None, gt=0, description="dense bf16 peak; none: no bf16 units")
    peak_fp32_tflops: float = Field(gt=0, description="fp32 peak (without TF32)")
    memory_gb: float = Field(gt=0, description="memory per device, GB (1e9 bytes)")
    price_per_hour: float = Field(ge=0, description="price per device-hour, in your currency")
    source: str = Field(min_length=1, description="where the peaks and memory come from")
    price_source: str = Field(min_length=1, description="where the price comes from")

    def peak(self, precision: str) -> tuple[float, str]:
        """Peak FLOP/s at ``precision`` ("bf16" or "fp32") and the precision it is for: a device without
        bf16 units trains in fp32."""
        if precision == "bf16" and self.peak_bf16_tflops is not None:
            return self.peak_bf16_tflops * 1e12, "bf16"
        return self.peak_fp32_tflops * 1e12, "fp32"


class HardwareFile(Strict):
    accelerators: list[Accelerator] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> HardwareFile:
        names = [a.name.lower() for a in self.accelerators]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"accelerator {self.accelerators[i].name!r} is listed twice")
        return self


def shipped() -> Path:
    """The hardware file that comes with tansuo."""
    return Path(str(resources.files("tansuo.plan") / "hardware.yaml"))


def load_hardware(path: str | Path | None = None) -> list[Accelerator]:
    """The accelerators of ``path`` (default: the shipped file).

    Raises:
        PlanError: The file is missing, not YAML, or an entry lacks a field or has a wrong value (the
            message names ``accelerators.INDEX.FIELD``).
    """
    path = Path(path) if path is not None else shipped()
    if not path.is_file():
        raise PlanError(f"hardware file {path} not found; start from a copy of {shipped()}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PlanError(f"hardware file {path} is not valid YAML: {e}") from None
    try:
        return HardwareFile.model_validate(raw).accelerators
    except ValidationError as e:
        raise PlanError(format_errors(e, title=f"invalid hardware file {path}")) from None


def pick(accelerators: list[Accelerator], names: list[str] | None) -> list[Accelerator]:
    """The accelerators named (case does not matter), or all of them when ``names`` is empty.

    Raises:
        PlanError: A name the file does not have, listing the names it has.
    """
    if not names:
        return accelerators
    by_name = {a.name.lower(): a for a in accelerators}
    out = []
    for name in names:
        if name.lower() not in by_name:
            raise PlanError(
                f"no accelerator named {name!r} in the hardware file; it has "
                f"{', '.join(a.name for a in accelerators)} (add one with --hardware FILE)"
            )
        out.append(by_name[name.lower()])
    return out
