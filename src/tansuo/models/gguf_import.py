"""Importing GGUF files (llama.cpp's format) into tansuo's :class:`GPT`, with their tokenizer.

A GGUF file holds the architecture as metadata (``llama.block_count``, ``llama.attention.head_count_kv``,
``llama.rope.freq_base``, ...), the tensors (often quantized: Q4_1, Q8_0, ...) and the tokenizer
(``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``, the chat template). It is read with the ``gguf``
package (llama.cpp's own Python reader; an optional dependency, ``pip install tansuo[hf]``), every tensor
dequantized to float32 with ``gguf.quants.dequantize``.

Tensor names (architectures ``llama``, which Mistral and SmolLM files use too, and ``qwen2``)::

    token_embd                  -> tok_emb
    blk.N.attn_norm             -> stack.layers.N.attn_norm
    blk.N.attn_q                -> stack.layers.N.attn.q_proj   (llama: rows un-permuted, see below)
    blk.N.attn_k, blk.N.attn_v  -> stack.layers.N.attn.kv_proj  (k | v)
    blk.N.attn_output           -> stack.layers.N.attn.out_proj
    blk.N.ffn_norm              -> stack.layers.N.mlp_norm
    blk.N.ffn_gate, ffn_up      -> stack.layers.N.mlp.in_proj   (gate | up)
    blk.N.ffn_down              -> stack.layers.N.mlp.out_proj
    output_norm                 -> stack.final_norm
    output (absent: tied)       -> lm_head

llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` of Llama models so that its rotary
kernel can pair neighbouring dimensions; tansuo pairs dimension i with i + D/2 (as Hugging Face does), so
those rows are put back (:func:`unpermute`). The byte-level BPE vocabulary becomes a Hugging Face
``tokenizers`` tokenizer (:func:`tokenizer_from_gguf`), control tokens kept whole.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tansuo.errors import TansuoError
from tansuo.models.hf_decoders import fuse, load_complete

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2")
#: tensor types dequantized on import (what gguf.quants implements in numpy)
TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

# how text is split before byte-level BPE, by tokenizer.ggml.pre (None: GPT-2's own regex)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
CONTROL = 3  # tokenizer.ggml.token_type of special tokens such as <|im_start|>


class GGUFImportError(TansuoError):
    """A GGUF file is missing, damaged, or of an architecture, tensor type or tokenizer tansuo cannot read."""


def read_gguf(path: str | Path) -> Any:
    """The file opened with ``gguf.GGUFReader`` (memory-mapped).

    Raises:
        GGUFImportError: No ``gguf`` package, no such file, or a file that is not (a whole) GGUF.
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise GGUFImportError(
            "reading GGUF needs the gguf package: pip install 'tansuo[hf]' (or gguf)"
        ) from e
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path} not found: pass a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFImportError(f"{path} is not a GGUF file (it does not start with the magic 'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # numpy's memmap and struct errors on a cut file
        raise GGUFImportError(f"cannot read {path}: the file is damaged or truncated ({e})") from e


def metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field as a Python value (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def decoder_fields(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """:class:`~tansuo.models.gpt.GPTConfig` fields (preset ``llama``) from a GGUF file's metadata.

    Raises:
        GGUFImportError: Another architecture, or a feature tansuo's decoder does not have.
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(
            f"unsupported GGUF architecture {arch!r}; tansuo imports {', '.join(ARCHITECTURES)} "
            "(Llama, Mistral, SmolLM and Qwen2 files)"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"the GGUF metadata lacks {arch}.{key}")
        return value

    if "rope_freqs.weight" in tensor_names:
        raise GGUFImportError(
            "this GGUF file scales its rotary frequencies with a rope_freqs tensor (Llama 3.1): not "
            "supported yet; import the Hugging Face folder instead (tansuo import hf reads rope_scaling)"
        )
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFImportError(
            f"unsupported rotary scaling {meta[f'{arch}.rope.scaling.type']!r} in this GGUF file"
        )
    C, H = int(get("embedding_length")), int(get("attention.head_count"))
    rot = meta.get(f"{arch}.rope.dimension_count", C // H)
    if rot != C // H:
        raise GGUFImportError(
            f"rotary on {rot} of {C // H} head dimensions is not supported (partial rotary)"
        )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    return dict(
        vocab_size=int(vocab),
        max_seq_len=int(get("context_length")),
        num_layers=int(get("block_count")),
        num_heads=H,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", H)),
        embed_dim=C,
        mlp_hidden=int(get("feed_forward_length")),
        bias=False,
        qkv_bias="yes" if arch == "qwen2" else "no",
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        positions="rotary",
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        mlp="swiglu",
        tie_embeddings="output.weight" not in tensor_names,
    )


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a q or k projection's rows (``heads`` of them: query heads for q,
    key/value heads for k): within each head, rows (0, 2, 4, ..., 1, 3, 5, ...) back to (0, 1, 2, ...)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantized(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as float32 in PyTorch's (out, in) order.

    Raises:
        GGUFImportError: A tensor type outside :data:`TENSOR_TYPES`.
    """
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise GGUFImportError(
            f"tensor {tensor.name} is {kind}; tansuo dequantizes {', '.join(TENSOR_TYPES)} (re-quantize the "
            "file to one of those with llama.cpp's llama-quantize)"
        )
    array = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy: the map is read-only


_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_DIRECT = {
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
    "attn_output": "attn.out_proj",
    "ffn_down": "mlp.out_proj",
}
_FUSED = {
    "attn_k": ("attn.kv_proj", 0),
    "attn_v": ("attn.kv_proj", 1),
    "ffn_gate": ("mlp.in_proj", 0),
    "ffn_up": ("mlp.in_proj", 1),
}
_TOP = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "stack.final_norm.weight",
    "output.weight": "lm_head.weight",
}


def convert_tensors(reader: Any, fields: dict[str, Any], arch: str) -> dict[str, torch.Tensor]:
    """The file's tensors, dequantized, under tansuo GPT names."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    permuted = arch == "llama"
    for tensor in reader.tensors:
        name = tensor.name
        if name in _TOP:
            out[_TOP[name]] = dequantized(tensor)
            continue
        m = _BLOCK.fullmatch(name)
        if m is None:
            log.info("skipped GGUF tensor %s (tansuo has no place for it)", name)
            continue
        i, kind, what = int(m[1]), m[2], m[3]
        if i >= fields["num_layers"]:
            raise GGUFImportError(
                f"tensor {name} is for block {i}, but the metadata says {fields['num_layers']}"
            )
        prefix = f"stack.layers.{i}"
        w = dequantized(tensor)
        if permuted and what == "weight" and kind in ("attn_q", "attn_k"):
            w = unpermute(w, fields["num_heads"] if kind == "attn_q" else fields["num_kv_heads"])
        elif permuted and what == "bias" and kind in ("attn_q", "attn_k"):
            w = unpermute(w[:, None], fields["num_heads"] if kind == "attn_q" else fields["num_kv_heads"])[
                :, 0
            ]
        if kind == "attn_q":
            out[f"{prefix}.attn.q_proj.{what}"] = w
        elif kind in _DIRECT:
            out[f"{prefix}.{_DIRECT[kind]}.{what}"] = w
        elif kind in _FUSED:
            target, slot = _FUSED[kind]
            parts.setdefault(f"{prefix}.{target}.{what}", [None, None])[slot] = w
        else:
            log.info("skipped GGUF tensor %s (tansuo has no place for it)", name)
    out.update(fuse(parts, GGUFImportError))
    return out


def import_gguf_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A tansuo GPT with every weight of the GGUF file at ``path`` (dequantized); returns ``(model in eval
    mode, the file's metadata)``.

    Raises:
        GGUFImportError: See :func:`read_gguf`, :func:`decoder_fields`, :func:`dequantized`; or a tensor
            missing or of another shape than the metadata implies.
    """
    from tansuo.models import create_model

    reader = read_gguf(path)
    meta = metadata(reader)
    names = {t.name for t in reader.tensors}
    fields = decoder_fields(meta, names)
    model = create_model("llama", **fields)
    converted = convert_tensors(reader, fields, meta["general.architecture"])
    load_complete(model, converted, GGUFImportError, "the file", "metadata")
    return model.eval(), meta


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (``bytes_to_unicode``): byte-level BPE vocabularies are
    written in it."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_from_gguf(meta: dict[str, Any]) -> Any:
    """A Hugging Face ``tokenizers`` tokenizer from a GGUF file's byte-level BPE vocabulary and merges
    (``tokenizer.ggml.model`` ``gpt2``): the text split by the vocabulary's own regex where
    ``tokenizer.ggml.pre`` names a known one (llama3, qwen2), else GPT-2's; control tokens (type 3) matched
    whole as special tokens.

    Raises:
        GGUFImportError: Another tokenizer model (sentencepiece ``llama`` vocabularies are not supported yet).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"the GGUF tokenizer is {kind!r}; tansuo builds byte-level BPE ('gpt2') vocabularies only "
            "(SmolLM, Llama 3, Qwen2, Mistral Nemo files have one)"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    alphabet = set(_byte_alphabet().values())
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == CONTROL and set(t) <= alphabet
    ]
    tok.add_special_tokens(control)
    return tok
