"""Device and precision choice, and seeding.

``auto`` means CUDA with bf16 autocast when a GPU is present, else the CPU in fp32 (bf16 matmuls are slow on
CPUs without AMX; see STACK.md). An explicit precision (``train.precision``) is honoured where torch can
autocast to it and is an error where it cannot: a run never silently trains in another precision.
"""

from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import torch

from tansuo.errors import TansuoError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device, with a clear error if it is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TansuoError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TansuoError(f"device {name!r} asked for but no CUDA GPU is available; use --device cpu")
    return device


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype autocast runs in for ``precision`` on ``device``, or None for plain fp32.

    ``auto`` is bf16 on CUDA and fp32 elsewhere; ``fp32`` is always fp32; ``bf16`` and ``fp16`` are what
    they say, when torch can autocast to them on this device (the CPU can, but slowly without AMX).

    Raises:
        TansuoError: ``precision`` is unknown, or the device cannot autocast to it.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision not in _DTYPES:
        raise TansuoError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    dtype = _DTYPES[precision]
    supported = torch.amp.is_autocast_available(device.type)
    if supported and device.type == "cuda" and dtype == torch.bfloat16:
        supported = torch.cuda.is_bf16_supported()
    if supported:
        # torch disables autocast with a warning (not an error) for a dtype the device lacks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device_type=device.type, dtype=dtype):
                pass
        supported = not any("not supported" in str(w.message) for w in caught)
    if not supported:
        raise TansuoError(
            f"train.precision {precision}: {device.type} cannot autocast to {dtype}; "
            "use train.precision=auto or fp32, or another device"
        )
    return dtype


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast to :func:`autocast_dtype`'s dtype, or nothing (fp32)."""
    return autocast_to(device, autocast_dtype(device, precision))


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (one :func:`autocast_dtype` returned), or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
