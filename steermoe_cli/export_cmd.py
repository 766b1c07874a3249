"""`steermoe export CKPT --onnx`: deployable graphs (not in this release)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import friendly, usage_error


@friendly
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export ONNX graphs")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder")] = Path("export"),
):
    """Export a checkpoint (ONNX audio tower + decoder): not available in this release."""
    usage_error("export: ONNX export is not available in this release yet")
