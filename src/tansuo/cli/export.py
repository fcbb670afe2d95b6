"""``tansuo export``: a bundle's model as an ONNX file, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import (
    console,
    setup_logging,
)
from tansuo.errors import TansuoError


def export(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder (bert, vit or resnet classifier)")],
    out: Annotated[Path, typer.Option(help="the .onnx file to write")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    tolerance: Annotated[float, typer.Option(help="largest allowed difference from PyTorch")] = 1e-4,
    portable: Annotated[
        bool,
        typer.Option(
            help="standard ONNX operators only, for runtimes other than ONNX Runtime (default: fused into "
            "ONNX Runtime's transformer operators, faster there)"
        ),
    ] = False,
) -> None:
    """Export a bundle's model to ONNX (dynamic batch and sequence axes), checked against PyTorch."""
    setup_logging(False)
    from tansuo.bundle import load_bundle
    from tansuo.export.onnx import export_checked

    if fmt != "onnx":
        raise TansuoError(f"--format {fmt!r} is not supported; use --format onnx")
    report = export_checked(load_bundle(bundle, device="cpu").model, out, tolerance, fuse=not portable)
    shapes = ", ".join("x".join(map(str, s)) for s in report["checked_shapes"])
    counts = report["fused"]
    fused = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in _SHOWN_FUSIONS if k in counts)
    console.print(
        f"wrote {out} (inputs {', '.join(report['inputs'])}; dynamic batch"
        f"{' and sequence' if 'input_ids' in report['inputs'] else ''} axes)\n"
        f"max abs difference from PyTorch: {report['max_abs_diff']:.2e} on inputs {shapes} "
        f"(allowed {tolerance:.0e})\n"
        + (
            f"fused for ONNX Runtime: {fused or 'nothing matched'} (--portable: standard operators only)"
            if not portable
            else "standard ONNX operators only"
        ),
        highlight=False,
        markup=False,
    )


# the fusions that end as a node of the file (the others are intermediate steps of these)
_SHOWN_FUSIONS = ("attention", "skip_layer_normalization", "bias_gelu")
