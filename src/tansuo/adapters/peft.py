"""LoRA adapters in PEFT's folder layout, written and read without PEFT.

A folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``, ...)
and ``adapter_model.safetensors`` with one ``lora_A`` ``(r, in)`` and one ``lora_B`` ``(out, r)`` per module,
named ``base_model.model.<module>.lora_A.weight``: what ``peft.PeftModel.from_pretrained(model, folder)``
loads. For a model imported from Hugging Face the module names are the Hugging Face architecture's, so the
adapter goes onto the transformers model:

=========================  ===================================  ===========================================
tansuo (stack.layers.N.)   Llama, Mistral, Qwen2 (model.layers.N.)  GPT-2 (transformer.h.N., Conv1D)
=========================  ===================================  ===========================================
attn.q_proj                self_attn.q_proj                     attn.c_attn rows [0, C)
attn.kv_proj (k | v)       self_attn.k_proj, self_attn.v_proj   attn.c_attn rows [C, 3C)
attn.out_proj              self_attn.o_proj                     attn.c_proj
mlp.in_proj (gate | up)    mlp.gate_proj, mlp.up_proj           mlp.c_fc
mlp.out_proj               mlp.down_proj                        mlp.c_proj
lm_head (untied)           lm_head
=========================  ===================================  ===========================================

Both directions are exact. Where tansuo fuses what Hugging Face splits (k | v, gate | up), the fused
adapter ``(A, B)`` becomes ``(A, B[:n])`` and ``(A, B[n:])``; reading, the two adapters become one of rank
``r_k + r_v`` (``A = [A_k; A_v]``, ``B`` block-diagonal). Where Hugging Face fuses what tansuo splits (GPT-2's
``c_attn`` = q | k | v), the q and kv adapters become one of rank ``2r`` (written in ``rank_pattern`` /
``alpha_pattern``), and reading splits ``B`` by rows (dropping the columns that are zero in a part). Other
models (trained here from scratch, or a layout with no Hugging Face counterpart) are written with tansuo's
module names in the same layout, for ``--adapter`` and ``tansuo merge``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tansuo.adapters.lora import (
    LoRAError,
    add_adapters_,
    linear_names,
    lora_layers,
    lora_record,
)
from tansuo.atomic import atomic_write_dir

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GGUF_LLAMA = ("llama", "qwen2")

_LAYER = re.compile(r"stack\.layers\.(\d+)\.(.+)")
# tansuo module under stack.layers.N -> the Hugging Face modules it feeds: (name, part, parts): the
# tansuo module's output rows are cut into ``parts`` equal parts and part ``part`` goes to that module;
# several tansuo modules feeding one Hugging Face module are stacked in table order
_TABLES: dict[str, dict[str, list[tuple[str, int, int]]]] = {
    "llama": {
        "attn.q_proj": [("self_attn.q_proj", 0, 1)],
        "attn.kv_proj": [("self_attn.k_proj", 0, 2), ("self_attn.v_proj", 1, 2)],
        "attn.out_proj": [("self_attn.o_proj", 0, 1)],
        "mlp.in_proj": [("mlp.gate_proj", 0, 2), ("mlp.up_proj", 1, 2)],
        "mlp.out_proj": [("mlp.down_proj", 0, 1)],
    },
    "gpt2": {
        "attn.q_proj": [("attn.c_attn", 0, 1)],
        "attn.kv_proj": [("attn.c_attn", 0, 1)],
        "attn.out_proj": [("attn.c_proj", 0, 1)],
        "mlp.in_proj": [("mlp.c_fc", 0, 1)],
        "mlp.out_proj": [("mlp.c_proj", 0, 1)],
    },
}
_LAYER_PREFIX = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}."}
_TOP = {"llama": {"lm_head": "lm_head"}, "gpt2": {}}


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` of tansuo module ``module`` are rows ``hf_rows`` of a Hugging Face module."""

    module: str
    rows: slice
    hf_rows: slice


@dataclass
class Layout:
    """How a model's Linear layers are named in an adapter folder: each named module as pieces of tansuo
    modules. ``kind`` is ``"llama"``, ``"gpt2"`` or ``"tansuo"`` (tansuo's own names, one piece each)."""

    kind: str
    modules: dict[str, list[Piece]]
    out_features: dict[str, int]
    in_features: dict[str, int]

    @property
    def task_type(self) -> str | None:
        return None if self.kind == "tansuo" else "CAUSAL_LM"


def origin_kind(origin: dict[str, Any] | None) -> str | None:
    """The Hugging Face layout (``"llama"``, ``"gpt2"``) of a bundle's ``origin``, or None."""
    if not origin:
        return None
    for arch in origin.get("architectures") or []:
        if arch.startswith("GPT2"):
            return "gpt2"
        if arch in LLAMA_ARCHITECTURES:
            return "llama"
    if (origin.get("gguf") or {}).get("architecture") in GGUF_LLAMA:
        return "llama"  # transformers loads these GGUF files as LlamaForCausalLM / Qwen2ForCausalLM
    return None


def layout(model: nn.Module, kind: str) -> Layout:
    """The adapter layout of ``model`` for ``kind`` (``"llama"``, ``"gpt2"`` or ``"tansuo"``).

    Raises:
        LoRAError: ``model`` has no module of that Hugging Face architecture.
    """
    shapes = {n: model.get_submodule(n) for n in linear_names(model)}
    out = {n: m.out_features for n, m in shapes.items()}
    inp = {n: m.in_features for n, m in shapes.items()}
    if kind == "tansuo":
        return Layout(kind, {n: [Piece(n, slice(None), slice(None))] for n in shapes}, out, inp)
    table, top = _TABLES[kind], _TOP[kind]
    modules: dict[str, list[Piece]] = {}
    hf_out: dict[str, int] = {}
    hf_in: dict[str, int] = {}
    for name in shapes:
        m = _LAYER.fullmatch(name)
        if m is not None and m[2] in table:
            targets = [
                (_LAYER_PREFIX[kind].format(m[1]) + hf, part, parts) for hf, part, parts in table[m[2]]
            ]
        elif name in top:
            targets = [(top[name], 0, 1)]
        else:
            continue  # no place in the Hugging Face model (a tied head): never adapted there
        for hf, part, parts in targets:
            n = out[name] // parts
            start = hf_out.get(hf, 0)
            modules.setdefault(hf, []).append(
                Piece(name, slice(part * n, (part + 1) * n), slice(start, start + n))
            )
            hf_out[hf], hf_in[hf] = start + n, inp[name]
    if not modules:
        raise LoRAError(f"this {type(model).__name__} has no module of a {kind} model")
    return Layout(kind, modules, hf_out, hf_in)


def origin_of(folder: str | Path | None) -> dict[str, Any] | None:
    """What a run's ``model.init_from`` folder came from: a bundle's ``origin`` (or, for a bundle trained
    with LoRA, its adapters' base), a Hugging Face folder's architectures; None when unknown."""
    if folder is None:
        return None
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if "model_type" in config:
        return {"imported_from": str(Path(folder).resolve()), "architectures": config.get("architectures")}
    if config.get("origin"):
        return config["origin"]
    record = next((r for r in config.get("compression") or [] if r.get("step") == "lora"), None)
    return None if record is None else record.get("base")


# ------------------------------------------------------------------------------------------------ writing


def _pick_layout(model: nn.Module, origin: dict[str, Any] | None) -> Layout:
    kind = origin_kind(origin)
    record = lora_record(model) or {}
    if kind is not None and record.get("modules_to_save"):
        log.warning("modules_to_save has no Hugging Face names here: the adapter keeps tansuo's module names")
        kind = None
    if kind is not None:
        found = layout(model, kind)
        covered = {p.module for pieces in found.modules.values() for p in pieces}
        missing = sorted(set(lora_layers(model)) - covered)
        if not missing:
            return found
        log.warning("%s has no %s counterpart: the adapter keeps tansuo's module names", missing[0], kind)
    return layout(model, "tansuo")


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _patterns(chosen: dict[str, Any], every: list[str], default: Any) -> dict[str, Any]:
    """PEFT's pattern keys for the modules whose value differs from ``default``: a module's last name when
    every chosen module of that name has the same value, else the full name."""
    out: dict[str, Any] = {}
    by_leaf: dict[str, list[str]] = {}
    for name in chosen:
        by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
    for leaf, names in sorted(by_leaf.items()):
        values = {json.dumps(chosen[n]) for n in names}
        all_of_leaf = [n for n in every if n.rpartition(".")[2] == leaf]
        if len(values) == 1 and sorted(names) == sorted(all_of_leaf):
            if chosen[names[0]] != default:
                out[leaf] = chosen[names[0]]
        else:
            out.update({n: chosen[n] for n in sorted(names) if chosen[n] != default})
    return out


def adapter_state(model: nn.Module, origin: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """``(adapter_config.json's mapping, {key: tensor})`` of ``model``'s adapters, in the Hugging Face
    architecture's names when ``origin`` (default: the LoRA record's ``base``) names one tansuo maps.

    Raises:
        LoRAError: The model has no adapters.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters to save")
    record = lora_record(model) or {}
    origin = origin if origin is not None else record.get("base")
    lay = _pick_layout(model, origin)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for hf, pieces in lay.modules.items():
        adapted = list(dict.fromkeys(p.module for p in pieces if p.module in layers))
        if not adapted:
            continue
        scales = {layers[m].scale for m in adapted}
        scale = scales.pop() if len(scales) == 1 else 1.0
        cols, start = {}, 0
        for m in adapted:
            cols[m], start = slice(start, start + layers[m].r), start + layers[m].r
        A = torch.cat([layers[m].lora_A.detach() for m in adapted])  # (R, in)
        B = A.new_zeros(lay.out_features[hf], start)  # (out, R)
        for p in pieces:
            if p.module in cols:
                layer = layers[p.module]
                B[p.hf_rows, cols[p.module]] = layer.lora_B.detach()[p.rows] * (layer.scale / scale)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = B.cpu().contiguous()
        ranks[hf] = (start, scale * start)
    saved = _modules_to_save(model, record, lay, tensors)
    r, alpha = _common(list(ranks.values()))
    every = list(lay.modules)
    leaves_or_names = _patterns({n: True for n in ranks}, every, None)
    config = {
        "peft_type": "LORA",
        "task_type": lay.task_type,
        "base_model_name_or_path": (origin or {}).get("imported_from"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(record.get("dropout", 0.0)),
        "target_modules": sorted(leaves_or_names),
        "fan_in_fan_out": lay.kind == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": saved or None,
        "rank_pattern": _patterns({n: v[0] for n, v in ranks.items()}, every, r),
        "alpha_pattern": _patterns({n: v[1] for n, v in ranks.items()}, every, alpha),
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return config, tensors


def _modules_to_save(model: nn.Module, record: dict, lay: Layout, tensors: dict[str, torch.Tensor]) -> list:
    """The fully trained modules' tensors under ``<module>.modules_to_save.<param>`` (tansuo layout)."""
    names = []
    for suffix in record.get("modules_to_save") or []:
        for name, module in model.named_modules():
            if name == suffix or name.endswith("." + suffix):
                names.append(name)
                for pname, p in module.named_parameters():
                    tensors[f"{PREFIX}{name}.modules_to_save.{pname}"] = p.detach().cpu().contiguous()
    return names


def write_adapter(model: nn.Module, folder: str | Path, origin: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s adapters into ``folder`` (created; files written in place, for a folder being built
    atomically, as a bundle's ``adapter/``). See :func:`save_adapter`."""
    folder = Path(folder)
    config, tensors = adapter_state(model, origin)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def save_adapter(model: nn.Module, folder: str | Path, origin: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT adapter folder, atomically: Hugging Face names when ``origin``
    (default: the LoRA record's ``base``) is a GPT-2 or Llama-family model, else tansuo's."""
    atomic_write_dir(folder, lambda tmp: write_adapter(model, tmp, origin))
    return Path(folder)


# ------------------------------------------------------------------------------------------------ reading


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter folder's ``adapter_config.json`` and tensors.

    Raises:
        LoRAError: Not an adapter folder, unreadable, or not a plain LoRA adapter (the message says what).
    """
    folder = Path(folder)
    config_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise LoRAError(
            f"{folder} is not a LoRA adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (what PEFT's "
            "save_pretrained and `tansuo train` with train.lora write)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # JSON or safetensors' own error types
        raise LoRAError(f"{folder} is unreadable: {e}") from e
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{folder} holds a {config.get('peft_type')!r} adapter; tansuo reads LoRA adapters")
    for key, bad in (("use_dora", True), ("lora_bias", True)):
        if config.get(key) == bad:
            raise LoRAError(
                f"{folder}: {key} is set; tansuo reads plain LoRA adapters (no DoRA, no LoRA bias)"
            )
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{folder}: bias is {config['bias']!r}; tansuo reads adapters with bias 'none'")
    return config, tensors


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():  # PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _modules(config: dict, tensors: dict[str, torch.Tensor], folder: Path) -> tuple[dict, dict]:
    """``{module: (A, B, scale)}`` and ``{module: {param: tensor}}`` (modules_to_save) of an adapter."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        s = re.fullmatch(r"(.+)\.modules_to_save(?:\.[^.]+)?\.(weight|bias)", name)
        if m is not None:
            pairs.setdefault(m[1], {})[m[2]] = tensor
        elif s is not None:
            saved.setdefault(s[1], {})[s[2]] = tensor
        else:
            raise LoRAError(f"{folder}: tensor {key!r} is not a LoRA A or B matrix; tansuo cannot place it")
    out = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["B"].shape[1] != pair["A"].shape[0]:
            raise LoRAError(f"{folder}: {name} lacks lora_A or lora_B, or their ranks differ")
        r = pair["A"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        out[name] = (pair["A"].float(), pair["B"].float(), scale)
    return out, saved


def load_adapter_(model: nn.Module, folder: str | Path, origin: dict[str, Any] | None = None) -> list[str]:
    """Put the adapter in ``folder`` (written by tansuo or by PEFT) on ``model`` as LoRA layers, in place,
    recorded in ``model.compression``; returns the adapted module names. ``origin`` (the bundle's) says
    which Hugging Face names to expect; tansuo's own names are always understood.

    Raises:
        LoRAError: See :func:`read_adapter`; a module the adapter names that this model does not have (the
            adapter is for another architecture), or of another shape (for another size of it).
    """
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    pairs, saved = _modules(config, tensors, folder)
    kinds = [k for k in (origin_kind(origin), "tansuo") if k is not None]
    layouts = [layout(model, k) for k in kinds]
    everything = {n for n, _ in model.named_modules()}
    lay = next((x for x in layouts if set(pairs) <= set(x.modules) and set(saved) <= everything), None)
    if lay is None:
        unknown = sorted((set(pairs) - set(layouts[0].modules)) | (set(saved) - everything))
        raise LoRAError(
            f"{folder} adapts {unknown[0]}, which this model does not have (an adapter for another "
            f"architecture?); its Linear layers here are named like {sorted(layouts[0].modules)[0]}"
        )
    for hf, (A, B, _) in pairs.items():
        want = (lay.out_features[hf], lay.in_features[hf])
        if (B.shape[0], A.shape[1]) != want:
            raise LoRAError(
                f"{folder}: the adapter of {hf} maps {A.shape[1]} inputs to {B.shape[0]} outputs, but this "
                f"model's {hf} maps {want[1]} to {want[0]}: the adapter belongs to a model of another size"
            )
    built = _to_tansuo(lay, pairs)
    add_adapters_(model, {n: (A.shape[0], scale * A.shape[0]) for n, (A, B, scale) in built.items()})
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (A, B, _) in built.items():
            layers[name].lora_A.copy_(A)
            layers[name].lora_B.copy_(B)
        for name, params in saved.items():
            module = model.get_submodule(name)
            for pname, tensor in params.items():
                getattr(module, pname).copy_(tensor)
    record = {
        "step": "lora",
        "r": int(config.get("r", 8)),
        "alpha": float(config.get("lora_alpha", 8)),
        "dropout": 0.0,
        "modules": {n: [layers[n].r, layers[n].alpha] for n in built},
        "modules_to_save": list(saved),
        "adapter": str(folder),
    }
    if origin is not None:
        record["base"] = origin
    model.compression = [*(getattr(model, "compression", None) or []), record]
    return list(built)


def _to_tansuo(lay: Layout, pairs: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapters by tansuo module: each from the pieces of the adapted modules that feed it."""
    feeds: dict[str, list[tuple[str, Piece]]] = {}
    for hf, pieces in lay.modules.items():
        if hf in pairs:
            for p in pieces:
                feeds.setdefault(p.module, []).append((hf, p))
    built = {}
    for name, parts in feeds.items():
        sources = list(dict.fromkeys(hf for hf, _ in parts))
        scales = {pairs[hf][2] for hf in sources}
        scale = scales.pop() if len(scales) == 1 else 1.0
        out = lay.out_features[name] if lay.kind == "tansuo" else _tansuo_out(lay, name)
        cols, start = {}, 0
        for hf in sources:
            r = pairs[hf][0].shape[0]
            cols[hf], start = slice(start, start + r), start + r
        A = torch.cat([pairs[hf][0] for hf in sources])  # (R, in)
        B = A.new_zeros(out, start)  # (out, R)
        for hf, p in parts:
            B[p.rows, cols[hf]] = pairs[hf][1][p.hf_rows] * (pairs[hf][2] / scale)
        keep = B.abs().amax(dim=0) > 0  # a part's columns that only fed other parts are zero here
        if keep.any() and not keep.all():
            A, B = A[keep], B[:, keep]
        built[name] = (A.contiguous(), B.contiguous(), scale)
    return built


def _tansuo_out(lay: Layout, name: str) -> int:
    return max(p.rows.stop for pieces in lay.modules.values() for p in pieces if p.module == name)
