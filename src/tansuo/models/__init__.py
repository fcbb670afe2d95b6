"""Model families and the registry. Importing this package registers every preset.

Build models by name: ``create_model("gpt_mini", vocab_size=50304)``; list them with ``list_models("vit_*")``.
"""

from tansuo.models import (  # noqa: F401
    bert,
    bert4rec,
    cnn,
    cnn_det,
    dpcnn,
    effnet,
    effnet_det,
    gpt,
    rec_baselines,
    sasrec,
    segmenter,
    seq2seq,
    unet,
    vit,
    vit_det,
)
from tansuo.models._registry import (
    ModelEntry,
    check_overrides,
    create_model,
    get_model_entry,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "ModelEntry",
    "check_overrides",
    "create_model",
    "get_model_entry",
    "list_models",
    "model_info",
    "register_model",
]
