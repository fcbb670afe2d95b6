"""Starting a run from existing weights (``model.init_from``): a tansuo bundle or a Hugging Face BERT folder.

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
    "model.safetensors) or a Hugging Face BERT folder (config.json with model_type, plus its weights)"
)

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

    kind: Literal["bundle", "hf"]
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


def load_initial_weights(model: nn.Module, path: str | Path) -> InitReport:
    """Loads a bundle's or Hugging Face BERT folder's weights into ``model`` where names and shapes match.

    Args:
        model: A freshly built tansuo model.
        path: A bundle folder, or a Hugging Face BERT folder written by ``save_pretrained``.

    Returns:
        An :class:`InitReport`.

    Raises:
        TansuoError: For a folder that is neither, a bundle of another family, a Hugging Face folder for a
            non-BERT model, or a Hugging Face config whose hidden size, layers, heads or vocabulary differ.
    """
    path = Path(path)
    if not path.is_dir():
        raise TansuoError(f"init_from {path} is not a folder; {VALID_FOLDER}")
    config = _read_config(path)
    if config is not None and "format" in config and "model_name" in config:
        if not (path / "model.safetensors").is_file():
            raise TansuoError(f"init_from {path} lacks model.safetensors; {VALID_FOLDER}")
        kind: Literal["bundle", "hf"] = "bundle"
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
