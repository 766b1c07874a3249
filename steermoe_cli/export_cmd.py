"""`steermoe export CKPT --onnx --out DIR`: graphs onnxruntime runs without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, friendly, usage_error


@friendly
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export ONNX graphs (the only format so far)")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (replaced atomically)")] = Path("export"),
    opset: Annotated[int, typer.Option(help="ONNX opset, 18..21")] = 18,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 (fp16 weights and arithmetic, fp32 inputs/outputs)")] = "fp32",
    quantize: Annotated[Optional[str], typer.Option(help="int8: dynamic int8 quantisation of the MatMul weights")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Let the LLM's own Python code run (never read from a checkpoint)")] = False,
):
    """Export a checkpoint: the audio tower and the KV-cached LLM decoder as ONNX graphs, plus the
    embedding table, tokenizer and a manifest, for `steermoe infer --backend onnxruntime --model DIR`."""
    if not onnx:
        usage_error("export: choose a format (--onnx)")
    from steermoe_core.export.onnx_export import check_options, export_onnx

    check_options(opset, dtype, quantize)
    with console.status("exporting") as status:
        manifest = export_onnx(checkpoint, out_dir, opset, dtype, quantize, trust_remote_code, step=lambda msg: status.update(msg))
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}
    total = sum(sizes.values())
    secs = manifest["export_seconds"]
    console.print(
        f"exported {checkpoint} to {out_dir} ({total / 1e6:.1f} MB: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items() if v > 1e6)
        + f"; audio tower {secs['audio_tower']:.1f} s, decoder {secs['decoder']:.1f} s to export)",
        soft_wrap=True,
    )
    console.print(f"run it with: steermoe infer --backend onnxruntime --model {out_dir} AUDIO...", soft_wrap=True)
