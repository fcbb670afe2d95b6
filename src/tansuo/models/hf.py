"""Importing a local Hugging Face BERT checkpoint folder into tansuo's :class:`~tansuo.models.bert.Bert`.

A folder written by ``save_pretrained`` holds ``config.json`` and either ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``) or ``pytorch_model.bin``. The ``.bin`` file is read with
``torch.load(..., weights_only=True)``: tensors only, never arbitrary unpickling. ``transformers`` itself is
not needed (nor imported) here.

The model is built as ``create_model("bert_base", **fields)``, so its ``model_name`` is a registered preset
and a bundle written from it rebuilds the same architecture.

Name mapping (Hugging Face, with or without the ``bert.`` prefix, to tansuo)::

    embeddings.word_embeddings / position_embeddings / token_type_embeddings -> tok_emb / pos_emb / seg_emb
    embeddings.LayerNorm                           -> emb_norm
    encoder.layer.N.attention.self.query           -> stack.layers.N.attn.q_proj
    encoder.layer.N.attention.self.key, value      -> stack.layers.N.attn.kv_proj (cat([key, value], dim=0))
    encoder.layer.N.attention.output.dense         -> stack.layers.N.attn.out_proj
    encoder.layer.N.attention.output.LayerNorm     -> stack.layers.N.attn_norm
    encoder.layer.N.intermediate.dense             -> stack.layers.N.mlp.in_proj
    encoder.layer.N.output.dense                   -> stack.layers.N.mlp.out_proj
    encoder.layer.N.output.LayerNorm               -> stack.layers.N.mlp_norm
    pooler.dense                                   -> pooler
    cls.predictions.transform.dense / LayerNorm    -> mlm_head.dense / mlm_head.norm
    cls.predictions.bias (or .decoder.bias)        -> mlm_head.decoder.bias (its weight is tok_emb's, tied)
    classifier                                     -> head
"""

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from tansuo.errors import TansuoError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ARCHITECTURES = (
    "BertModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForPreTraining",
)
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
BASE_PRESET = "bert_base"  # the registered name the imported model is built from (every field overridden)


class HFImportError(TansuoError):
    """A Hugging Face checkpoint folder is missing, malformed or of an architecture tansuo cannot import."""


def read_hf_config(folder: str | Path) -> dict:
    """Reads ``folder/config.json`` as a dict.

    Raises:
        HFImportError: If the file is missing or not a JSON object.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path} not found: a Hugging Face checkpoint folder holds config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HFImportError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise HFImportError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _unsupported(what: str, found: object, supported: str) -> HFImportError:
    return HFImportError(
        f"unsupported Hugging Face checkpoint: {what} is {found!r}; tansuo imports {supported}"
    )


def bert_config_from_hf(hf_config: dict, num_classes: int = 2) -> dict:
    """Translates a Hugging Face BERT ``config.json`` into tansuo :class:`~tansuo.models.bert.BertConfig`
    fields.

    Args:
        hf_config: The parsed ``config.json``.
        num_classes: Classes of the classification head (0: none).

    Returns:
        Keyword arguments for ``create_model("bert_base", ...)``.

    Raises:
        HFImportError: For another model type or architecture, an activation other than exact GELU,
            non-absolute positions, a decoder, or an intermediate size that is not a multiple of the width.
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(
            "model_type", model_type, f"model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}"
        )
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported("architecture", arch, f"architectures {', '.join(SUPPORTED_ARCHITECTURES)}")
    hidden_act = hf_config.get("hidden_act", "gelu")
    if hidden_act != "gelu":
        raise _unsupported("hidden_act", hidden_act, "hidden_act 'gelu' (exact, erf-based GELU) only")
    positions = hf_config.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise _unsupported("position_embedding_type", positions, "position_embedding_type 'absolute' only")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise _unsupported("is_decoder / add_cross_attention", True, "encoders only (is_decoder false)")
    if hf_config.get("tie_word_embeddings", True) is False:
        raise _unsupported("tie_word_embeddings", False, "MLM decoders tied to the word embeddings only")
    required = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ]
    absent = [key for key in required if key not in hf_config]
    if absent:
        raise HFImportError(
            f"config.json lacks {', '.join(absent)}; a BERT config needs {', '.join(required)}"
        )
    hidden, intermediate = hf_config["hidden_size"], hf_config["intermediate_size"]
    if intermediate % hidden:
        raise HFImportError(
            f"intermediate_size ({intermediate}) is not a multiple of hidden_size ({hidden}); tansuo's BERT "
            "feed-forward width is an integer mlp_ratio times the width"
        )
    return dict(
        vocab_size=hf_config["vocab_size"],
        max_seq_len=hf_config.get("max_position_embeddings", 512),
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        embed_dim=hidden,
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_ratio=intermediate // hidden,
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        num_classes=num_classes,
        prenorm=False,
    )


def load_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Reads the weights of a checkpoint folder: ``model.safetensors``, its shards (from
    ``model.safetensors.index.json``), or else ``pytorch_model.bin`` (tensors only, ``weights_only=True``).

    Raises:
        HFImportError: If the folder has none of these files, or a file cannot be read.
    """
    folder = Path(folder)
    single, index, pickle = folder / SAFETENSORS_NAME, folder / SAFETENSORS_INDEX_NAME, folder / PYTORCH_NAME
    try:
        if single.is_file():
            from safetensors.torch import load_file

            return load_file(single, device="cpu")
        if index.is_file():
            from safetensors.torch import load_file

            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                state_dict.update(load_file(folder / shard, device="cpu"))
            return state_dict
        if pickle.is_file():
            state_dict = torch.load(pickle, map_location="cpu", weights_only=True)
            if not isinstance(state_dict, dict):
                raise HFImportError(f"{pickle} holds a {type(state_dict).__name__}, not a state dict")
            return state_dict
    except HFImportError:
        raise
    except Exception as error:  # corrupt file, missing shard, non-tensor pickle content
        raise HFImportError(f"cannot read the weights in {folder}: {error}") from error
    raise HFImportError(
        f"no weights in {folder}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} (with its shards) "
        f"or {PYTORCH_NAME}"
    )


_LINEAR = ("weight", "bias")
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_LAYER_MAP = {
    "attention.self.query": "attn.q_proj",
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.in_proj",
    "output.dense": "mlp.out_proj",
    "output.LayerNorm": "mlp_norm",
}
_TOP_MAP = {
    "embeddings.word_embeddings.weight": "tok_emb.weight",
    "embeddings.position_embeddings.weight": "pos_emb.weight",
    "embeddings.token_type_embeddings.weight": "seg_emb.weight",
    "embeddings.LayerNorm.weight": "emb_norm.weight",
    "embeddings.LayerNorm.bias": "emb_norm.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
    "cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_head.norm.bias",
    "cls.predictions.bias": "mlm_head.decoder.bias",
    "cls.predictions.decoder.bias": "mlm_head.decoder.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def _normalise_name(name: str) -> str:
    # Drop the base-model prefix; old TensorFlow conversions call LayerNorm's parameters gamma and beta.
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name or name.startswith("LayerNorm."):
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def convert_bert_state_dict(hf_sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Renames (and fuses) a Hugging Face BERT state dict onto tansuo :class:`~tansuo.models.bert.Bert`
    parameter names.

    Keys without a tansuo counterpart (``embeddings.position_ids``, the next-sentence head
    ``cls.seq_relationship``) are skipped and logged. The tied ``cls.predictions.decoder.weight`` is dropped
    after checking that it equals the word embeddings.

    Args:
        hf_sd: The checkpoint's tensors.
        config: tansuo BERT fields (from :func:`bert_config_from_hf`); ``num_layers`` bounds the layer index.

    Returns:
        A partial tansuo state dict (whatever the checkpoint provides).

    Raises:
        HFImportError: For a key or value without its partner, a layer index beyond ``num_layers``, or an
            MLM decoder not tied to the word embeddings.
    """
    out: dict[str, torch.Tensor] = {}
    keys: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "weight"/"bias") -> key projection
    values: dict[tuple[int, str], torch.Tensor] = {}
    decoder_weight = None
    skipped = []
    for raw_name, tensor in hf_sd.items():
        name = _normalise_name(raw_name)
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = tensor
            continue
        if name == "cls.predictions.decoder.weight":
            decoder_weight = tensor
            continue
        match = _LAYER_RE.fullmatch(name)
        if match:
            index, rest = int(match[1]), match[2]
            module, _, kind = rest.rpartition(".")
            if kind in _LINEAR:
                if index >= config["num_layers"]:
                    raise HFImportError(
                        f"checkpoint tensor {raw_name!r} is for layer {index}, but config.json says "
                        f"num_hidden_layers={config['num_layers']}"
                    )
                if module in _LAYER_MAP:
                    out[f"stack.layers.{index}.{_LAYER_MAP[module]}.{kind}"] = tensor
                    continue
                if module in ("attention.self.key", "attention.self.value"):
                    (keys if module.endswith("key") else values)[(index, kind)] = tensor
                    continue
        skipped.append(raw_name)
    for slot in sorted(keys.keys() | values.keys()):
        if slot not in keys or slot not in values:
            have, lack = ("value", "key") if slot not in keys else ("key", "value")
            raise HFImportError(
                f"checkpoint has layer {slot[0]}'s attention {have} {slot[1]} but not its {lack} {slot[1]}; "
                "tansuo fuses the two into one kv_proj"
            )
        out[f"stack.layers.{slot[0]}.attn.kv_proj.{slot[1]}"] = torch.cat([keys[slot], values[slot]], dim=0)
    if decoder_weight is not None:
        embeddings = out.get("tok_emb.weight")
        if embeddings is None or not torch.equal(decoder_weight, embeddings):
            raise HFImportError(
                "the checkpoint's cls.predictions.decoder.weight differs from the word embeddings; tansuo's "
                "MLM decoder is tied to them (tie_word_embeddings=True only)"
            )
    if skipped:
        logger.info("skipped %d checkpoint tensors tansuo has no place for: %s", len(skipped), skipped)
    return out


def import_bert(
    folder: str | Path, num_classes: int = 2, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, list[str]]:
    """Builds a tansuo BERT from a local Hugging Face checkpoint folder and loads its weights.

    Every tensor the checkpoint provides must fit (same shape); parameters it lacks (the MLM head of a
    ``BertModel`` checkpoint, the classifier of any but a matching ``BertForSequenceClassification``) keep
    their fresh initialisation and are returned by name.

    Args:
        folder: The folder ``save_pretrained`` wrote (``config.json`` and the weights).
        num_classes: Classes of the classification head (0: none).
        state_dict: The checkpoint's tensors if already read (:func:`load_hf_state_dict`).

    Returns:
        ``(model in eval mode, names of the tansuo parameters left freshly initialised)``.

    Raises:
        HFImportError: See :func:`read_hf_config`, :func:`bert_config_from_hf`, :func:`load_hf_state_dict`,
            :func:`convert_bert_state_dict`; or a tensor whose shape does not match the config.
    """
    from tansuo.models import create_model

    config = bert_config_from_hf(read_hf_config(folder), num_classes=num_classes)
    model = create_model(BASE_PRESET, **config)
    converted = convert_bert_state_dict(state_dict or load_hf_state_dict(folder), config)
    expected = model.state_dict()  # the tied decoder weight is left out of it
    for name, tensor in converted.items():
        if name not in expected:  # only the classifier when num_classes=0
            raise HFImportError(
                f"the checkpoint has {name!r}, which this model (num_classes={num_classes}) lacks"
            )
        if tensor.shape != expected[name].shape:
            hint = (
                " (pass num_classes to match the checkpoint's classifier)" if name.startswith("head.") else ""
            )
            raise HFImportError(
                f"checkpoint tensor for {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}{hint}"
            )
    result = model.load_state_dict(converted, strict=False)
    missing = [name for name in result.missing_keys if name != "mlm_head.decoder.weight"]
    if result.unexpected_keys:  # cannot happen after the checks above
        raise HFImportError(f"unexpected tensors {result.unexpected_keys}")
    if missing:
        logger.info("left freshly initialised (not in the checkpoint): %s", missing)
    return model.eval(), missing
