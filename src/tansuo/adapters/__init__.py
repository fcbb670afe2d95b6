"""Adapters: LoRA as an in-place model transform (:mod:`tansuo.adapters.lora`) and its adapters in PEFT's
folder layout, with Hugging Face module names for imported decoders (:mod:`tansuo.adapters.peft`).

Python API::

    lora_(model, LoRAConfig(r=8, alpha=16, targets=["q_proj", "kv_proj"]))  # adapters, recorded
    freeze_base_(model)                                                     # train only them
    save_adapter(model, "adapter/")                                         # PEFT layout
    load_adapter_(base_model, "adapter/", origin)                           # tansuo's or PEFT's adapters
    merge_lora_(model)                                                      # W + alpha / r * B A

LoRA is a registered technique (step ``lora``), so ``save_bundle`` / ``load_bundle`` keep the adapters.
"""

from __future__ import annotations

from tansuo.adapters.lora import (
    ALL_LINEAR,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    freeze_base_,
    lora_,
    lora_layers,
    lora_record,
    merge_lora_,
    resolve_targets,
)
from tansuo.adapters.peft import (
    adapter_state,
    load_adapter_,
    origin_of,
    read_adapter,
    save_adapter,
    write_adapter,
)

__all__ = [
    "ALL_LINEAR",
    "LoRAConfig",
    "LoRAError",
    "LoRALinear",
    "adapter_state",
    "freeze_base_",
    "load_adapter_",
    "lora_",
    "lora_layers",
    "lora_record",
    "merge_lora_",
    "origin_of",
    "read_adapter",
    "resolve_targets",
    "save_adapter",
    "write_adapter",
]
