"""Bundles: a folder that holds everything needed to use a trained model, and nothing executable.

```
bundle/
  config.json        model name, family and config; tansuo version; origin (of an imported model)
  model.safetensors  weights (tied weights stored once); or
  model.onnx         an ONNX Runtime model instead (int8 bundles of the onnxruntime backend; "runtime" in
                     config.json says which)
  task.json          task name and its state (data source, splits, labels, normalisation)
  tokenizer.json     text tasks only (Hugging Face tokenizers format)
  metrics.json       what the model measured, by split
  recipe.json        the validated recipe that trained it (when trained by tansuo)
  adapter/           with LoRA adapters (a ``lora`` record): them alone, in PEFT's layout
                     (adapter_config.json, adapter_model.safetensors; see tansuo.adapters.peft)
  manifest.json      the sha256 and size of every other file (tansuo.integrity), checked before loading
  manifest.sig       an Ed25519 signature of manifest.json, once `tansuo sign` signed the bundle
```
Loading reads JSON and safetensors only; nothing is unpickled. Bundles are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from tansuo import __version__
from tansuo.atomic import atomic_write_dir, atomic_write_json
from tansuo.errors import BundleError, RecipeError
from tansuo.integrity import verify_manifest, verify_signature, write_manifest
from tansuo.models import create_model
from tansuo.tasks import get_task
from tansuo.tasks.base import Task

FORMAT = 1
REQUIRED = ("config.json", "model.safetensors", "task.json")


@dataclass
class Bundle:
    """A loaded bundle: the model (in eval mode), its task and its recorded metrics."""

    path: Path
    model: nn.Module
    task: Task
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def save_bundle(
    path: str | Path,
    model: nn.Module,
    task: Task,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    origin: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle folder atomically (an existing one is replaced only once the new one is complete).

    ``origin`` (say, the folder a model was imported from) is recorded in config.json.
    """
    path = Path(path)

    def build(tmp: Path) -> None:
        config = {
            "format": FORMAT,
            "tansuo_version": __version__,
            "model_name": model.model_name,
            "family": getattr(model, "family", type(model).__name__),
            "config": dataclasses.asdict(model.config),
            "num_params": model.num_params(),
        }
        if origin is not None:
            config["origin"] = origin
        if getattr(model, "compression", None):
            config["compression"] = model.compression  # replayed by load_bundle before the weights load
        onnx_file = getattr(model, "onnx_file", None)
        if onnx_file is not None:  # an OnnxModel: the graph is the model
            config["runtime"] = "onnxruntime"
            shutil.copyfile(onnx_file, tmp / "model.onnx")
        else:
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        task.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True) + "\n")
        if recipe is not None:
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if any(r.get("step") == "lora" for r in getattr(model, "compression", None) or []):
            from tansuo.adapters import write_adapter

            write_adapter(model, tmp / "adapter", origin)
        write_manifest(tmp)

    atomic_write_dir(path, build)
    return path


def update_bundle_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Replace a bundle's metrics.json (atomically) and its manifest (a signature no longer holds)."""
    atomic_write_json(Path(path) / "metrics.json", metrics)
    write_manifest(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is unreadable ({e}); the bundle is damaged, train it again") from e


def load_bundle(
    path: str | Path,
    device: str | torch.device = "cpu",
    data_path: str | None = None,
    adapter: str | Path | None = None,
    public_key: str | Path | None = None,
) -> Bundle:
    """Load a bundle folder: check its files against its manifest, rebuild the model from the registry, load
    weights, rebuild the task.

    ``adapter``: a LoRA adapter folder (PEFT's layout, written by tansuo or by PEFT) merged into the
    model's weights after loading (see :func:`apply_adapter`). ``public_key``: load only a bundle signed by
    that Ed25519 key (``tansuo sign``).

    Raises:
        BundleError: Not a bundle, a file changed, truncated, missing or foreign, the signature missing or
            by another key, or a config the model cannot be built from; each names the file."""
    path = Path(path)
    if not path.is_dir():
        old = path.with_name(path.name + ".old")
        hint = f" (an interrupted save left a complete copy at {old})" if old.is_dir() else ""
        raise BundleError(f"bundle not found: {path}{hint}; pass the folder a training run wrote")
    weights = "model.safetensors"
    if (path / "config.json").is_file():
        weights = (
            "model.onnx" if _read_json(path / "config.json").get("runtime") == "onnxruntime" else weights
        )
    missing = [name for name in (*REQUIRED[:1], weights, *REQUIRED[2:]) if not (path / name).is_file()]
    if missing:
        raise BundleError(f"{path} is not a complete bundle: missing {', '.join(missing)}")
    if public_key is not None:
        verify_signature(path, public_key)  # the manifest too
    else:
        verify_manifest(path)
    config = _read_json(path / "config.json")
    if config.get("format") != FORMAT:
        raise BundleError(
            f"{path}: bundle format {config.get('format')!r} is not supported (expected {FORMAT})"
        )
    task_info = _read_json(path / "task.json")
    task_name = task_info.get("task")
    try:
        task_class = get_task(task_name)
    except RecipeError:
        from tansuo.tasks import TASKS

        raise BundleError(
            f"{path}: unknown task {task_name!r}; this tansuo knows {sorted(TASKS)} (a task from a plugin "
            "module needs that module in TANSUO_PLUGINS)"
        ) from None
    if config.get("runtime") == "onnxruntime":
        model = _load_onnx(path, config, device)
    else:
        model = _load_torch(path, config, device)
    task = task_class.from_bundle(path, data_path=data_path)
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    if adapter is not None:
        model = apply_adapter(model, adapter, bundle_origin(config))
        metrics = {}  # they were the base model's
    return Bundle(path=path, model=model, task=task, metrics=metrics, config=config)


def bundle_origin(config: dict[str, Any]) -> dict[str, Any] | None:
    """What a bundle's model came from: its ``origin``, or for a bundle trained with LoRA the base its
    adapters were trained on (so their Hugging Face names are known)."""
    if config.get("origin"):
        return config["origin"]
    record = next((r for r in config.get("compression") or [] if r.get("step") == "lora"), None)
    return None if record is None else record.get("base")


def apply_adapter(model: nn.Module, adapter: str | Path, origin: dict[str, Any] | None = None) -> nn.Module:
    """Merge a LoRA adapter folder into ``model`` (after merging any adapters it has already): plain Linear
    layers with ``W + alpha / r * B A``, no ``lora`` record left. Returns the model (changed in place).

    Raises:
        LoRAError: The folder is not an adapter this model can take (another architecture or size).
    """
    from tansuo.adapters import load_adapter_, merge_lora_

    if any(p.device.type == "meta" for p in model.parameters()) or getattr(model, "onnx_file", None):
        raise BundleError("--adapter needs a PyTorch bundle; an ONNX Runtime bundle's graph is fixed")
    device = next(model.parameters()).device
    merge_lora_(model)
    load_adapter_(model, adapter, origin)
    merge_lora_(model)
    return model.to(device)


def merge_bundle(path: str | Path, out: str | Path, adapter: str | Path | None = None) -> Path:
    """``tansuo merge``: the bundle at ``path`` with its LoRA adapters, or with the adapter folder
    ``adapter``, merged into plain weights, written (atomically) as a bundle without adapters at ``out``.

    Raises:
        BundleError: Neither the bundle has adapters nor is an adapter given.
        LoRAError: See :func:`apply_adapter`.
    """
    from tansuo.adapters import merge_lora_

    bundle = load_bundle(path)
    if adapter is None and not any(r.get("step") == "lora" for r in bundle.config.get("compression") or []):
        raise BundleError(f"{path} has no LoRA adapters to merge; name an adapter folder to merge into it")
    origin = bundle_origin(bundle.config)
    metrics = bundle.metrics
    if adapter is not None:
        apply_adapter(bundle.model, adapter, origin)
        metrics = {}
    else:
        merge_lora_(bundle.model)
    recipe = _read_json(Path(path) / "recipe.json") if (Path(path) / "recipe.json").is_file() else None
    merged = {**(origin or {}), "merged_from": str(Path(path).resolve())}
    if adapter is not None:
        merged["adapter"] = str(Path(adapter).resolve())
    return save_bundle(out, bundle.model, bundle.task, metrics, recipe, origin=merged)


def _load_onnx(path: Path, config: dict[str, Any], device: str | torch.device) -> nn.Module:
    from tansuo.export.onnx import OnnxModel

    if torch.device(device).type != "cpu":
        raise BundleError(f"{path} is an ONNX Runtime (CPU) bundle; pass --device cpu")
    with torch.device("meta"):
        reference = _build(path, config)
    reference.model_name = config["model_name"]
    records = config.get("compression", [])
    per_sample = any(r.get("per_sample") for r in records if r.get("step") == "quantize")
    model = OnnxModel(path / "model.onnx", reference, per_sample=per_sample)
    model.compression = list(records)
    return model


def _build(path: Path, config: dict[str, Any]) -> nn.Module:
    try:
        return create_model(config["model_name"], **config["config"])
    except (KeyError, TypeError, ValueError, RecipeError) as e:
        raise BundleError(
            f"{path / 'config.json'} does not describe a model this tansuo can build ({e})"
        ) from e


def _load_torch(path: Path, config: dict[str, Any], device: str | torch.device) -> nn.Module:
    model = _build(path, config)
    if config.get("compression"):
        import tansuo.adapters  # noqa: F401  (registers the "lora" step that bundles with adapters carry)
        from tansuo.compress import restore_structure

        if torch.device(device).type != "cpu" and any(
            r.get("step") == "quantize" for r in config["compression"]
        ):
            raise BundleError(f"{path} holds int8 layers, which run on the CPU only; pass --device cpu")
        restore_structure(model, config["compression"])
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:  # a damaged header, other shapes
        raise BundleError(
            f"{path / 'model.safetensors'} does not fit the model config.json describes ({e})"
        ) from e
    return model.to(device).eval()
