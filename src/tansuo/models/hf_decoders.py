"""Importing Hugging Face decoder checkpoints (GPT-2 and the Llama family) into tansuo's :class:`GPT`.

One class holds them all: :class:`~tansuo.models.gpt.GPTConfig` has the switches (norm, positions, MLP,
grouped-query attention, q/k/v biases, tied head, rotary base and Llama 3.1 scaling). A folder written by
``save_pretrained`` is read as for BERT (:func:`tansuo.models.hf.load_hf_state_dict`: safetensors or a
tensors-only ``.bin``); ``transformers`` is not needed here.

GPT-2 (``model_type: gpt2``), with or without the ``transformer.`` prefix; ``Conv1D`` weights are stored
``(in, out)`` and transposed::

    wte / wpe                          -> tok_emb / pos_emb
    h.N.ln_1, h.N.ln_2                 -> stack.layers.N.attn_norm, mlp_norm
    h.N.attn.c_attn (q | k | v)        -> stack.layers.N.attn.q_proj, attn.kv_proj (k | v)
    h.N.attn.c_proj                    -> stack.layers.N.attn.out_proj
    h.N.mlp.c_fc, h.N.mlp.c_proj       -> stack.layers.N.mlp.in_proj, mlp.out_proj
    ln_f                               -> stack.final_norm        (lm_head: tied to wte)

Llama, Mistral, Qwen2 (``model_type: llama | mistral | qwen2``; SmolLM is ``llama``), under ``model.``::

    embed_tokens                       -> tok_emb
    layers.N.input_layernorm           -> stack.layers.N.attn_norm
    layers.N.self_attn.q_proj          -> stack.layers.N.attn.q_proj
    layers.N.self_attn.k_proj, v_proj  -> stack.layers.N.attn.kv_proj (k | v)
    layers.N.self_attn.o_proj          -> stack.layers.N.attn.out_proj
    layers.N.post_attention_layernorm  -> stack.layers.N.mlp_norm
    layers.N.mlp.gate_proj, up_proj    -> stack.layers.N.mlp.in_proj (gate | up)
    layers.N.mlp.down_proj             -> stack.layers.N.mlp.out_proj
    norm                               -> stack.final_norm
    lm_head (untied)                   -> lm_head

The rotary "rotate half" pairing of Hugging Face's Llama is tansuo's, so q and k need no permutation.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tansuo.models.hf import HFImportError, load_hf_state_dict, read_hf_config

log = logging.getLogger(__name__)

LLAMA_TYPES = ("llama", "mistral", "qwen2")
DECODER_TYPES = ("gpt2", *LLAMA_TYPES)
PRESETS = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


def _unsupported(what: str, found: object, supported: str) -> HFImportError:
    return HFImportError(f"unsupported Hugging Face decoder: {what} is {found!r}; tansuo imports {supported}")


def _require(hf: dict, keys: list[str], kind: str) -> None:
    absent = [k for k in keys if k not in hf]
    if absent:
        raise HFImportError(f"config.json lacks {', '.join(absent)}; a {kind} config needs {', '.join(keys)}")


def decoder_config_from_hf(hf: dict) -> tuple[str, dict[str, Any]]:
    """The tansuo preset and :class:`~tansuo.models.gpt.GPTConfig` fields of a Hugging Face decoder
    ``config.json``.

    Raises:
        HFImportError: Another model type, or a feature tansuo's decoder does not have (named, with what is
            supported).
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return "gpt2", _gpt2_fields(hf)
    if model_type in LLAMA_TYPES:
        return "llama", _llama_fields(hf, model_type)
    raise _unsupported("model_type", model_type, f"decoders of model_type {', '.join(DECODER_TYPES)}")


def _gpt2_fields(hf: dict) -> dict[str, Any]:
    _require(hf, ["vocab_size", "n_embd", "n_layer", "n_head"], "GPT-2")
    act = hf.get("activation_function", "gelu_new")
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if act not in activations:
        raise _unsupported("activation_function", act, f"GPT-2 with {', '.join(activations)}")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise _unsupported("scale_attn_by_inverse_layer_idx", True, "GPT-2 with the standard 1/sqrt(d) scale")
    if hf.get("scale_attn_weights") is False:
        raise _unsupported("scale_attn_weights", False, "GPT-2 with the standard 1/sqrt(d) scale")
    if hf.get("add_cross_attention"):
        raise _unsupported("add_cross_attention", True, "decoder-only GPT-2")
    C = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("n_positions", 1024),
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        embed_dim=C,
        mlp_hidden=hf.get("n_inner") or 4 * C,
        bias=True,
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned",
        mlp="gelu",
        activation=activations[act],
        tie_embeddings=True,
    )


def _rope(hf: dict) -> dict[str, Any]:
    """Rotary base and scaling from ``rope_theta`` / ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in (None, "default"):
        return fields
    if kind != "llama3":
        raise _unsupported("rope scaling", kind, "rotary positions without scaling or with 'llama3' scaling")
    return fields | dict(
        rope_scaling="llama3",
        rope_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


def _llama_fields(hf: dict, model_type: str) -> dict[str, Any]:
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    _require(hf, keys, model_type)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, f"{model_type} with hidden_act 'silu' (SwiGLU)")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or C // H
    if head_dim * H != C:
        raise _unsupported("head_dim", head_dim, f"head_dim = hidden_size / num_attention_heads ({C // H})")
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias", True, "feed-forward layers without biases")
    if model_type == "qwen2":
        qkv_bias = "yes"  # Qwen2: biases on q, k, v, none on o
    elif hf.get("attention_bias"):
        raise _unsupported("attention_bias", True, f"{model_type} without attention biases (Qwen2 has q/k/v)")
    else:
        qkv_bias = "no"
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
    if window and window < max_seq_len:  # within the window, sliding-window attention is full attention
        log.warning(
            "%s attends within a sliding window of %d tokens: imported with a context of %d (full attention "
            "there is the same)",
            model_type,
            window,
            window,
        )
        max_seq_len = int(window)
    return dict(
        vocab_size=hf["vocab_size"],
        max_seq_len=max_seq_len,
        num_layers=hf["num_hidden_layers"],
        num_heads=H,
        num_kv_heads=hf.get("num_key_value_heads") or H,
        embed_dim=C,
        mlp_hidden=hf["intermediate_size"],
        bias=False,
        qkv_bias=qkv_bias,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        positions="rotary",
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default for all three
        **_rope(hf),
    )


_GPT2_LAYER = re.compile(r"h\.(\d+)\.(.+)")
_LLAMA_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_GPT2_TOP = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "stack.final_norm.weight",
    "ln_f.bias": "stack.final_norm.bias",
}
_GPT2_DIRECT = {"ln_1": "attn_norm", "ln_2": "mlp_norm"}
_GPT2_CONV = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.in_proj", "mlp.c_proj": "mlp.out_proj"}
_LLAMA_TOP = {
    "embed_tokens.weight": "tok_emb.weight",
    "norm.weight": "stack.final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LLAMA_DIRECT = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.o_proj": "attn.out_proj",
    "mlp.down_proj": "mlp.out_proj",
}
_LLAMA_FUSED = {  # tansuo module <- the Hugging Face modules concatenated along the output rows, in order
    "self_attn.k_proj": ("attn.kv_proj", 0),
    "self_attn.v_proj": ("attn.kv_proj", 1),
    "mlp.gate_proj": ("mlp.in_proj", 0),
    "mlp.up_proj": ("mlp.in_proj", 1),
}


def convert_gpt2_state_dict(
    hf_sd: dict[str, torch.Tensor], fields: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Renames (and transposes, splits) a GPT-2 state dict onto tansuo GPT names."""
    out: dict[str, torch.Tensor] = {}
    skipped = []
    for raw, tensor in hf_sd.items():
        name = raw.removeprefix("transformer.")
        if name in _GPT2_TOP:
            out[_GPT2_TOP[name]] = tensor
            continue
        if name == "lm_head.weight":
            _check_tied(tensor, hf_sd, ("transformer.wte.weight", "wte.weight"))
            continue
        m = _GPT2_LAYER.fullmatch(name)
        if m is None:
            skipped.append(raw)
            continue
        i, rest = _layer_index(m, raw, fields), m[2]
        module, _, kind = rest.rpartition(".")
        prefix = f"stack.layers.{i}"
        if module in _GPT2_DIRECT and kind in ("weight", "bias"):
            out[f"{prefix}.{_GPT2_DIRECT[module]}.{kind}"] = tensor
        elif module == "attn.c_attn" and kind in ("weight", "bias"):
            t = tensor.t() if kind == "weight" else tensor  # Conv1D: (in, out)
            q, k, v = t.chunk(3, dim=0)
            out[f"{prefix}.attn.q_proj.{kind}"] = q.contiguous()
            out[f"{prefix}.attn.kv_proj.{kind}"] = torch.cat([k, v], dim=0).contiguous()
        elif module in _GPT2_CONV and kind in ("weight", "bias"):
            out[f"{prefix}.{_GPT2_CONV[module]}.{kind}"] = (
                tensor.t().contiguous() if kind == "weight" else tensor
            )
        else:
            skipped.append(raw)  # attn.bias / attn.masked_bias: causal-mask buffers
    if skipped:
        log.info("skipped %d checkpoint tensors tansuo has no place for: %s", len(skipped), skipped[:6])
    return out


def convert_llama_state_dict(
    hf_sd: dict[str, torch.Tensor], fields: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Renames (and fuses k|v and gate|up) a Llama-family state dict onto tansuo GPT names."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    skipped = []
    for raw, tensor in hf_sd.items():
        name = raw.removeprefix("model.")
        if name == "lm_head.weight" and fields["tie_embeddings"]:
            _check_tied(tensor, hf_sd, ("model.embed_tokens.weight", "embed_tokens.weight"))
            continue
        if name in _LLAMA_TOP:
            out[_LLAMA_TOP[name]] = tensor
            continue
        m = _LLAMA_LAYER.fullmatch(name)
        if m is None:
            skipped.append(raw)
            continue
        i, rest = _layer_index(m, raw, fields), m[2]
        module, _, kind = rest.rpartition(".")
        prefix = f"stack.layers.{i}"
        if module in _LLAMA_DIRECT and kind in ("weight", "bias"):
            out[f"{prefix}.{_LLAMA_DIRECT[module]}.{kind}"] = tensor
        elif module in _LLAMA_FUSED and kind in ("weight", "bias"):
            target, slot = _LLAMA_FUSED[module]
            parts.setdefault(f"{prefix}.{target}.{kind}", [None, None])[slot] = tensor
        else:
            skipped.append(raw)  # rotary_emb.inv_freq: recomputed from rope_theta
    out.update(fuse(parts, HFImportError))
    if skipped:
        log.info("skipped %d checkpoint tensors tansuo has no place for: %s", len(skipped), skipped[:6])
    return out


def _layer_index(m: re.Match, raw: str, fields: dict[str, Any]) -> int:
    i = int(m[1])
    if i >= fields["num_layers"]:
        raise HFImportError(
            f"checkpoint tensor {raw!r} is for layer {i}, but config.json has {fields['num_layers']}"
        )
    return i


def _check_tied(head: torch.Tensor, hf_sd: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    emb = next((hf_sd[n] for n in names if n in hf_sd), None)
    if emb is not None and not torch.equal(head, emb):
        raise HFImportError(
            "the checkpoint's lm_head.weight differs from its token embeddings, but config.json says "
            "tie_word_embeddings; set it to false in config.json if the head is its own"
        )


def fuse(parts: dict[str, list[torch.Tensor | None]], error: type[Exception]) -> dict[str, torch.Tensor]:
    """Each tansuo tensor from its two source halves concatenated along the rows (k | v, gate | up)."""
    for key, pair in parts.items():
        if None in pair:
            raise error(f"the checkpoint has half of {key} (k without v, or gate without up)")
    return {key: torch.cat(pair, dim=0) for key, pair in parts.items()}  # type: ignore[arg-type]


def load_complete(
    model: nn.Module, converted: dict[str, torch.Tensor], error: type[Exception], source: str, config: str
) -> None:
    """Load ``converted`` into ``model`` (as float32), refusing with ``error`` a tensor the model lacks, one
    of another shape than ``config`` implies, or one the model needs that ``source`` lacks."""
    expected = model.state_dict()  # a tied head is left out of it
    for name, tensor in converted.items():
        if name not in expected:
            raise error(f"{source} has {name!r}, which a decoder of this {config} lacks")
        if tensor.shape != expected[name].shape:
            raise error(
                f"{source}'s tensor for {name!r} has shape {tuple(tensor.shape)}, {config} implies "
                f"{tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise error(f"{source} lacks {len(missing)} tensors the model needs: {missing[:4]}")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)


def import_decoder(
    folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, dict]:
    """Builds a tansuo GPT from a Hugging Face decoder folder and loads every weight (strict: each tensor
    the model has must come from the checkpoint). Returns ``(model in eval mode, the folder's
    config.json)``.

    Raises:
        HFImportError: See :func:`decoder_config_from_hf`, :func:`~tansuo.models.hf.load_hf_state_dict`; or
            a tensor missing, extra, or of another shape than the config says.
    """
    from tansuo.models import create_model

    hf = read_hf_config(folder)
    preset, fields = decoder_config_from_hf(hf)
    model = create_model(preset, **fields)
    raw = state_dict if state_dict is not None else load_hf_state_dict(folder)
    convert = convert_gpt2_state_dict if hf["model_type"] == "gpt2" else convert_llama_state_dict
    converted = convert(raw, fields)
    load_complete(model, converted, HFImportError, "the checkpoint", "config.json")
    return model.eval(), hf
