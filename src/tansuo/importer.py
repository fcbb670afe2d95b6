"""``tansuo import hf``: a local Hugging Face BERT-family or decoder folder becomes a tansuo bundle.

A decoder (GPT-2, Llama, Mistral, Qwen2, SmolLM: :mod:`tansuo.models.hf_decoders`) becomes an ``lm`` bundle
with the folder's ``tokenizer.json``, ready for ``tansuo generate`` and ``tansuo eval --data TEXT``.

The folder holds ``config.json``, the weights (safetensors, or a PyTorch ``.bin`` read tensors-only) and
the tokenizer (``tokenizer.json`` or ``vocab.txt``; ``tokenizer_config.json``'s ``do_lower_case`` is
honoured for the latter). What the bundle is for follows from the heads in the checkpoint:

- a classifier (``BertForSequenceClassification``): a ``classify`` bundle, its labels from ``id2label`` in
  ``config.json`` or from ``labels`` (one per classifier row), ready for ``tansuo predict``;
- otherwise (``BertModel``, ``BertForMaskedLM``, ``BertForPreTraining``): an ``mlm`` bundle, a pretrained
  encoder to fine-tune with ``model.init_from`` (and to fill ``[MASK]`` with, if the checkpoint has its MLM
  head).

Weights are converted by :mod:`tansuo.models.hf`; the bundle is written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tansuo.data import load_bert_tokenizer, load_tokenizer
from tansuo.errors import TansuoError
from tansuo.models.hf import (
    SUPPORTED_MODEL_TYPES,
    HFImportError,
    bert_config_from_hf,
    import_bert,
    load_hf_state_dict,
    read_hf_config,
)
from tansuo.models.hf_decoders import DECODER_TYPES, decoder_config_from_hf, import_decoder

logger = logging.getLogger(__name__)


@dataclass
class ImportReport:
    """What :func:`import_hf` wrote."""

    bundle: Path
    task: str
    num_params: int
    labels: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # parameters the checkpoint lacked (freshly initialised)


def _labels_from_config(hf_config: dict, num_classes: int) -> list[str]:
    id2label = hf_config.get("id2label") or {}
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        by_id = {}
    if sorted(by_id) == list(range(num_classes)):
        return [by_id[i] for i in range(num_classes)]
    return [f"LABEL_{i}" for i in range(num_classes)]


def _lowercase(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))
        except (OSError, json.JSONDecodeError):
            logger.warning("%s is unreadable; assuming an uncased (lower-casing) vocabulary", config)
    return True


def import_hf(folder: str | Path, out: str | Path, labels: list[str] | None = None) -> ImportReport:
    """Convert a Hugging Face BERT-family folder into a bundle at ``out``.

    Args:
        folder: The folder ``save_pretrained`` wrote (plus its tokenizer files).
        out: The bundle folder to write (replaced atomically if it exists).
        labels: Class names for a classifier checkpoint, in classifier-row order (default: ``id2label``).

    Raises:
        HFImportError: For a missing or unsupported checkpoint (the message names what is supported).
        TansuoError: For ``labels`` on a checkpoint without a classifier, or of the wrong number.
    """
    from tansuo.bundle import save_bundle
    from tansuo.tasks.classify import ClassifyDataConfig, ClassifyTask
    from tansuo.tasks.mlm import MLMDataConfig, MLMTask

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise HFImportError(f"{folder} is not a folder; pass a Hugging Face model folder (with config.json)")
    hf_config = read_hf_config(folder)
    model_type = hf_config.get("model_type")
    if model_type in DECODER_TYPES:
        if labels is not None:
            raise TansuoError(f"--labels names a classifier's classes; {folder} is a {model_type} decoder")
        return import_hf_decoder(folder, out, hf_config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFImportError(
            f"unsupported Hugging Face checkpoint: model_type is {model_type!r}; tansuo imports encoders of "
            f"model_type {', '.join(SUPPORTED_MODEL_TYPES)} and decoders of model_type "
            f"{', '.join(DECODER_TYPES)}"
        )
    bert_config_from_hf(hf_config)  # refuses other architectures before anything is read
    state_dict = load_hf_state_dict(folder)
    classifier = next(
        (v for k, v in state_dict.items() if k.removeprefix("bert.") == "classifier.weight"), None
    )
    num_classes = 0 if classifier is None else int(classifier.shape[0])
    if labels is not None:
        if classifier is None:
            raise TansuoError(
                f"{folder} has no classifier, so --labels has nothing to name; import it without --labels "
                "and fine-tune it with a classify recipe (model.init_from)"
            )
        if len(labels) != num_classes:
            raise TansuoError(
                f"--labels gives {len(labels)} names but the classifier has {num_classes} outputs; "
                f"give {num_classes}, in the order of its rows"
            )
    lowercase = _lowercase(folder)
    try:
        tokenizer = load_bert_tokenizer(folder, lowercase=lowercase)
    except TansuoError as e:
        raise HFImportError(f"cannot import {folder}'s tokenizer: {e}") from e
    model, fresh = import_bert(folder, num_classes=num_classes, state_dict=state_dict)
    seq_len = min(128, model.config.max_seq_len)
    if classifier is not None:
        names = labels or _labels_from_config(hf_config, num_classes)
        data = ClassifyDataConfig(tokenizer=str(folder), max_seq_len=seq_len, lowercase=lowercase)
        task: ClassifyTask | MLMTask = ClassifyTask(data, seed=0, tokenizer=tokenizer, labels=names)
    else:
        names = []
        data_mlm = MLMDataConfig(tokenizer=str(folder), max_seq_len=seq_len, lowercase=lowercase)
        task = MLMTask(data_mlm, seed=0, tokenizer=tokenizer, work_dir=None)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        logger.warning(
            "the tokenizer has %d tokens, the embedding table %d rows",
            tokenizer.get_vocab_size(),
            model.config.vocab_size,
        )
    origin = {"imported_from": str(folder.resolve()), "architectures": hf_config.get("architectures")}
    path = save_bundle(out, model, task, metrics={}, origin=origin)
    return ImportReport(bundle=path, task=task.name, num_params=model.num_params(), labels=names, fresh=fresh)


def import_hf_decoder(folder: Path, out: str | Path, hf_config: dict) -> ImportReport:
    """A Hugging Face decoder folder (``config.json``, weights, ``tokenizer.json``) as an ``lm`` bundle."""
    from tansuo.bundle import save_bundle
    from tansuo.tasks.lm import LMDataConfig, LMTask

    decoder_config_from_hf(hf_config)  # refuses what tansuo's decoder cannot be before anything is read
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise HFImportError(
            f"{folder} has no tokenizer.json: save the model's fast tokenizer beside it "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        tokenizer = load_tokenizer(tok_file)
    except TansuoError as e:
        raise HFImportError(f"cannot import {folder}'s tokenizer: {e}") from e
    model, _ = import_decoder(folder)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise HFImportError(
            f"{tok_file} has {tokenizer.get_vocab_size()} tokens but the embedding table only "
            f"{model.config.vocab_size} rows: the tokenizer belongs to another model"
        )
    data = LMDataConfig(tokenizer=str(tok_file), **_decoder_windows(model))
    task = LMTask(data, seed=0, tokenizer=tokenizer, work_dir=None, chat=_hf_chat(folder))
    origin = {"imported_from": str(folder.resolve()), "architectures": hf_config.get("architectures")}
    path = save_bundle(out, model, task, metrics={}, origin=origin)
    return ImportReport(bundle=path, task=task.name, num_params=model.num_params())


def import_gguf(path: str | Path, out: str | Path) -> ImportReport:
    """A GGUF file (llama.cpp's format) as an ``lm`` bundle at ``out``: the decoder with every tensor
    dequantized to float32 (:mod:`tansuo.models.gguf_import`), ``tokenizer.json`` built from the file's
    vocabulary and merges, the chat template and its special tokens in ``task.json`` (``tansuo chat``), the
    file's name and special tokens in ``config.json``'s origin.

    Raises:
        GGUFImportError: A missing, damaged or unsupported file (the message names what is supported).
    """
    from tansuo.bundle import save_bundle
    from tansuo.models.gguf_import import import_gguf_model, tokenizer_from_gguf
    from tansuo.tasks.lm import LMDataConfig, LMTask

    path = Path(path).expanduser()
    model, meta = import_gguf_model(path)
    tokenizer = tokenizer_from_gguf(meta)
    data = LMDataConfig(tokenizer=str(Path(out) / "tokenizer.json"), **_decoder_windows(model))
    task = LMTask(data, seed=0, tokenizer=tokenizer, work_dir=None)
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    template = meta.get("tokenizer.chat_template")
    if template:
        task.chat = {"template": template, "bos_token": special("bos"), "eos_token": special("eos")}
    origin = {
        "imported_from": str(path.resolve()),
        "gguf": {"architecture": meta.get("general.architecture"), "name": meta.get("general.name")},
        "special_tokens": {k: special(k) for k in ("bos", "eos", "padding", "unknown")},
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    saved = save_bundle(out, model, task, metrics={}, origin=origin)
    return ImportReport(bundle=saved, task=task.name, num_params=model.num_params())


def _hf_chat(folder: Path) -> dict | None:
    """A Hugging Face folder's chat template (``chat_template.jinja``, or ``chat_template`` in
    ``tokenizer_config.json``, the ``default`` one of a list) and its special tokens; None without one."""
    config_file = folder / "tokenizer_config.json"
    config: dict = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise HFImportError(f"{config_file} is unreadable: {e}") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if not template:
        return None

    def token(name: str) -> str | None:
        value = config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    return {"template": template, "bos_token": token("bos_token"), "eos_token": token("eos_token")}


def _decoder_windows(model: object) -> dict[str, int]:
    """Evaluation windows for an imported decoder: 64 windows of up to 512 tokens (32k tokens; the
    defaults for a small model trained here, 2,400 windows, would be hours of a 100M-parameter model on a
    CPU)."""
    return {"block_size": min(model.config.max_seq_len, 512), "eval_windows": 64}  # type: ignore[attr-defined]
