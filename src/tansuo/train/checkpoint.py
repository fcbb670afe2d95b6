"""Resumable checkpoints in one safetensors file, written atomically, never unpickled.

A checkpoint holds the model weights, the optimizer state, RNG states and the trainer's own counters. Nested
Python state (the optimizer's ``state_dict``) is split into a flat ``{name: tensor}`` map and a JSON skeleton
in which each tensor is replaced by ``{"__tensor__": name}``; both go into the one file (the skeleton in the
safetensors metadata). A kill during a save leaves the previous checkpoint intact (see ``atomic.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tansuo.atomic import atomic_write
from tansuo.errors import TansuoError

FORMAT = "tansuo-checkpoint-1"


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference, collecting tensors in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot checkpoint a dict with keys {list(obj)[:3]} at {prefix}")
        # JSON keys are strings: remember which were ints so the round trip is exact
        return {
            "__dict__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()],
        }
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skel["__dict__"]}
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, "s", tensors)
    metadata = {"format": FORMAT, "skeleton": json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (CPU tensors)."""
    path = Path(path)
    if not path.is_file():
        raise TansuoError(
            f"no checkpoint at {path}; start without --resume, or point --out to the run folder"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise TansuoError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from e
    if metadata.get("format") != FORMAT:
        raise TansuoError(f"{path} is not a tansuo checkpoint (format {metadata.get('format')!r})")
    return unflatten_state(json.loads(metadata["skeleton"]), tensors)
