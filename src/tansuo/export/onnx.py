"""ONNX export of a bundle's model, and an ONNX Runtime model that tasks use like the PyTorch one.

``export_onnx`` traces the model with ``torch.onnx.export(dynamo=True)`` into one self-contained ``.onnx``
file (no external data) with dynamic batch (and sequence) axes, then runs it in ONNX Runtime on sample inputs
of several shapes and refuses a file whose outputs differ from PyTorch's by more than ``tolerance``.

:class:`OnnxModel` wraps an ``onnxruntime.InferenceSession`` behind ``forward`` with the same arguments as the
PyTorch model (token ids and attention mask for a text encoder; images for an image model), so
``Task.evaluate`` and ``Task.predict`` run it unchanged. What a model exports is its family's declaration:
``onnx_inputs`` (``("input_ids", "attention_mask")``, ``("pixels",)``, or ``()`` for no export). int8
bundles made by ``tansuo compress --quantize int8`` with the ONNX Runtime backend hold such a file
(``model.onnx``) instead of ``model.safetensors``.

onnx, onnxscript and onnxruntime are optional (``pip install tansuo[onnx]``) and imported only here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tansuo.errors import TansuoError
from tansuo.tasks.base import ONNX

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
TEXT_INPUTS = ("input_ids", "attention_mask")  # a text encoder's inputs: token ids and padding mask
_FOLD_LIMIT = 1 << 28  # elements: fold constant expressions of any weight (slices of kv_proj's)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and ONNX Runtime quantization's chatter (torchvision ops it skips, advice to
    pre-process, deprecation notices); errors still raise."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def onnx_available() -> bool:
    """Whether onnx, onnxscript and onnxruntime import here."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def require_onnx() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise TansuoError(
            "ONNX export and the onnxruntime backend need onnx, onnxscript and onnxruntime: "
            "pip install 'tansuo[onnx]' (make test installs them)"
        ) from e
    return onnxruntime


class _TextWrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask)


def exportable(model: nn.Module) -> bool:
    """Whether the model's family declares ONNX inputs (an ``OnnxModel`` is exported already)."""
    return bool(getattr(type(model), "onnx_inputs", ()))


def input_names(model: nn.Module) -> list[str]:
    """The ONNX inputs the model's family declares (``onnx_inputs``); raises if it declares none."""
    names = list(getattr(type(model), "onnx_inputs", ()))
    if not names:
        raise TansuoError(
            f"the {getattr(model, 'family', type(model).__name__)!r} family does not export to ONNX (its "
            "onnx_inputs are empty); run it with --backend torch"
        )
    return names


def _is_text(names: list[str]) -> bool:
    return tuple(names) == TEXT_INPUTS


def _samples(model: nn.Module, names: list[str]) -> list[tuple[torch.Tensor, ...]]:
    """Inputs of a few shapes: batch sizes 1-3, sequence lengths short and long, some padding."""
    g = torch.Generator().manual_seed(0)
    out = []
    for batch, length in ((1, 128), (3, 9), (2, 40)):
        if _is_text(names):
            length = min(length, model.config.max_seq_len)
            ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
            mask = torch.ones_like(ids)
            mask[0, length // 2 :] = 0  # a padded row
            out.append((ids, mask))
        else:
            with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
                torch.manual_seed(batch)
                out.append((model.example_input(batch),))
    return out


def export_onnx(
    model: nn.Module, path: Path, tolerance: float = 1e-4, *, fuse: bool = True
) -> dict[str, Any]:
    """Export ``model`` (fp32, eval) to ``path`` and check it against PyTorch; returns the check's figures.

    ``fuse``: rewrite the graph into ONNX Runtime's fused transformer operators
    (:func:`fuse_for_onnxruntime`), faster there but readable by ONNX Runtime only; off, the file holds
    standard ONNX operators alone.

    Raises :class:`TansuoError` when the family is not supported or outputs differ by more than
    ``tolerance`` (nothing is left at ``path`` then).
    """
    ort = require_onnx()
    names = input_names(model)
    model = model.float().cpu().eval()
    wrapper = (_TextWrapper(model) if _is_text(names) else model).eval()
    samples = _samples(model, names)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if _is_text(names):
        seq = torch.export.Dim("seq", min=2, max=model.config.max_seq_len)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:  # keyed by the forward's own argument names
        params = list(inspect.signature(model.forward).parameters)[: len(names)]
        shapes = {p: {0: batch} for p in params}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        with quiet():
            fusions = _export(wrapper, samples[1], tmp_file, names, shapes, fuse)
        session = ort.InferenceSession(str(tmp_file), providers=["CPUExecutionProvider"])

        diff = 0.0
        with torch.inference_mode():
            for args in samples:
                ref = wrapper(*args).float().numpy()
                got = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]
                diff = max(diff, float(abs(got - ref).max()))
        if not diff <= tolerance:
            raise TansuoError(
                f"the ONNX model's outputs differ from PyTorch's by {diff:.2e} (allowed {tolerance:.0e}); "
                "nothing was written. Please report this model"
            )
        tmp_file.replace(path)
    shapes_checked = [tuple(a[0].shape) for a in samples]
    log.info("exported %s: max abs difference %.2e on inputs %s", path, diff, shapes_checked)
    log.info("fused for ONNX Runtime: %s", fusions or "nothing")
    return {
        "path": str(path),
        "max_abs_diff": diff,
        "inputs": names,
        "checked_shapes": shapes_checked,
        "fused": fusions,
    }


def export_checked(
    model: nn.Module, path: Path, tolerance: float = 1e-4, *, fuse: bool = True
) -> dict[str, Any]:
    """:func:`export_onnx` for a bundle's model, refusing what cannot be exported with the way out: a model
    that already is an ONNX Runtime model, or one holding int8 torch layers."""
    if getattr(model, "onnx_file", None) is not None:
        raise TansuoError("this bundle already is an ONNX model: copy its model.onnx")
    if any(r.get("step") == "quantize" for r in getattr(model, "compression", None) or []):
        raise TansuoError("this bundle holds int8 torch layers, which do not export; export the fp32 bundle")
    return export_onnx(model, path, tolerance, fuse=fuse)


def _export(
    wrapper: nn.Module, args: tuple, path: Path, names: list[str], shapes: dict, fuse: bool
) -> dict[str, int]:
    program = torch.onnx.export(
        wrapper,
        args,
        input_names=names,
        output_names=["logits"],
        dynamic_shapes=shapes,
        dynamo=True,
        verbose=False,
    )
    fusions = fuse_for_onnxruntime(program.model) if fuse else {}
    program.save(str(path), external_data=False)
    return fusions


def fuse_for_onnxruntime(model: Any) -> dict[str, int]:
    """Rewrites an exported ``onnx_ir.Model`` in place into ONNX Runtime's fused transformer operators
    (``com.microsoft`` Attention, SkipLayerNormalization, BiasGelu, ...) with onnxscript's ``ort_fusions``;
    returns how many of each were made.

    Attention is fused when the exported self-attention has three projections and a float mask, the shape
    ``MultiHeadAttention`` takes while exporting; the slices of ``kv_proj``'s weights it makes are folded into
    constants first (onnxscript's default size limit leaves weights alone). The result needs ONNX Runtime.
    """
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    optimizer.optimize(model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)
    _, counts = optimize_for_ort(model)
    return {k: v for k, v in counts.items() if v}


class OnnxModel(nn.Module):
    """An ONNX Runtime session that tasks call like the PyTorch model it came from (CPU, inference only).

    Args:
        path: The ``.onnx`` file.
        reference: The PyTorch model it was exported from, built on the meta device: gives ``config``,
            ``family``, ``model_name`` (nothing of it runs).
        per_sample: Run one sample at a time (int8 models quantize activations per call, so a sample's result
            then never depends on the rest of its batch).
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        spinning: Let ONNX Runtime's idle threads spin between calls (lowest latency when it has the CPU to
            itself; turn off when other work shares the process, as in a benchmark against PyTorch).
    """

    def __init__(
        self,
        path: Path,
        reference: nn.Module,
        *,
        per_sample: bool = False,
        threads: int | None = None,
        spinning: bool = True,
    ) -> None:
        super().__init__()
        ort = require_onnx()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = self.onnx_file = Path(path)  # save_bundle copies onnx_file
        self.config = reference.config
        self.family = getattr(reference, "family", "")
        self.model_name = getattr(reference, "model_name", "")
        self.text = _is_text(list(getattr(type(reference), "onnx_inputs", ())))
        self.reference_example = reference.example_input
        self.per_sample = per_sample
        self.names = [i.name for i in self.session.get_inputs()]
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)

    def num_params(self) -> int:
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        total = 0
        for init in graph.initializer:
            n = 1
            for d in init.dims:
                n *= d
            total += n
        return total

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        if self.text:
            length = min(seq_len or 16, self.config.max_seq_len)
            return torch.randint(0, self.config.vocab_size, (batch_size, length))
        with torch.device("cpu"):  # the reference lives on the meta device; its example input must not
            return self._example_like(batch_size)

    def _example_like(self, batch_size: int) -> torch.Tensor:
        shape = self.reference_example(batch_size).shape  # meta tensors: the shape, no memory
        return torch.randn(shape)

    def _run(self, arrays: list[Any]) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, dict(zip(self.names, arrays, strict=True)))[0])

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for token ids ``(B, T)`` (with ``attention_mask``) or images ``(B, C, H, W)``."""
        if self.text:
            if token_type_ids is not None and bool(token_type_ids.any()):
                raise TansuoError("this ONNX model takes single texts; sentence pairs need the torch backend")
            mask = torch.ones_like(x) if attention_mask is None else attention_mask
            inputs = [x.cpu().long(), mask.cpu().long()]
        else:
            inputs = [x.cpu().float()]
        if not self.per_sample or inputs[0].shape[0] == 1:
            return self._run([t.numpy() for t in inputs])
        rows = [self._run([t[i : i + 1].numpy() for t in inputs]) for i in range(inputs[0].shape[0])]
        return torch.cat(rows)


def model_for_backend(bundle: Any, backend: str, device: torch.device, workdir: Path | None) -> nn.Module:
    """The model that runs a bundle on ``backend`` ("torch": the bundle's own model; "onnxruntime": an ONNX
    Runtime bundle's model, or the PyTorch model exported into ``workdir``, checked and fused, then loaded in
    ONNX Runtime). Refuses combinations that cannot run, saying what to do instead."""
    if backend not in BACKENDS:
        raise TansuoError(f"--backend {backend!r} is unknown; use {' or '.join(BACKENDS)}")
    is_onnx = getattr(bundle.model, "onnx_file", None) is not None
    if backend == "torch":
        if is_onnx:
            raise TansuoError(f"{bundle.path} is an ONNX Runtime bundle; run it with --backend onnxruntime")
        return bundle.model
    if ONNX not in bundle.task.abilities:
        raise TansuoError(
            "--backend onnxruntime runs tasks whose predictions use the model's plain forward "
            f"(classifiers); this is a {bundle.task.name!r} bundle: use --backend torch"
        )
    if is_onnx:
        return bundle.model
    if device.type != "cpu":
        raise TansuoError("--backend onnxruntime runs on the CPU; pass --device cpu")
    if any(r.get("step") == "quantize" for r in getattr(bundle.model, "compression", None) or []):
        raise TansuoError(
            f"{bundle.path} holds int8 torch layers, which do not export; run it with --backend torch, "
            "or compress with --quantize-backend onnxruntime"
        )
    if workdir is None:
        raise ValueError("exporting to ONNX Runtime needs a workdir")
    report = export_onnx(bundle.model, Path(workdir) / "model.onnx")
    log.info("exported to ONNX (max abs difference from PyTorch %.1e)", report["max_abs_diff"])
    return OnnxModel(Path(workdir) / "model.onnx", bundle.model)
