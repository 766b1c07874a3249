"""`steermoe analyze CKPT DATA [--out DIR]`: router statistics as JSON, PNG plots and tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, friendly, stdout
from .progress import step_progress


@friendly
def analyze(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder (e.g. runs/NAME/model)")],
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for router_stats.json and the PNGs (default CKPT/analysis)")] = None,
    max_examples: Annotated[int, typer.Option(help="0 = the whole set; N = a seeded random sample")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
):
    """Per layer: mean gate per expert, gate entropy, top-1 frequency, steering norm; overall and per prompt."""
    from steermoe_core.atomic import write_text
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.experiments.plots import plot_router
    from steermoe_core.experiments.router_stats import router_statistics
    from steermoe_core.runtime import pick_device

    out = out or checkpoint / "analysis"
    n = len(ShardedDataset(data))
    with step_progress(console, min(max_examples or n, n), label="routing") as bar:
        stats = router_statistics(checkpoint, data, max_examples, pick_device(device), progress=bar.advance)
    write_text(out / "router_stats.json", json.dumps(stats, indent=2))
    pngs = plot_router(stats, out)
    stdout.print(layer_table(stats["layers"], f"router of {checkpoint} over {stats['examples']} clips ({stats['frames']:,} frames)"))
    if len(stats["by_prompt"]) > 1:
        t = Table(title="gate entropy by prompt (nats, per layer)")
        t.add_column("prompt")
        t.add_column("clips", justify="right")
        t.add_column("entropy by layer")
        for p, g in stats["by_prompt"].items():
            t.add_row(p[:50], str(g["examples"]), " ".join(f"{r['entropy']:.2f}" for r in g["layers"]))
        stdout.print(t)
    console.print(f"wrote {out / 'router_stats.json'} and " + ", ".join(p.name for p in pngs))


def layer_table(layers: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("layer", "scale", "entropy", "steering norm", "rel. norm", "top expert", "mean gate per expert"):
        t.add_column(col, justify="left" if col == "mean gate per expert" else "right")
    for r in layers:
        top = max(range(len(r["top1_frequency"])), key=lambda e: r["top1_frequency"][e])
        t.add_row(
            str(r["layer"]), f"{r['scale']:.3f}", f"{r['entropy']:.2f} / {r['max_entropy']:.2f}", f"{r['steering_norm']:.3f}",
            f"{100 * r['relative_steering']:.1f}%", f"{top} ({100 * r['top1_frequency'][top]:.0f}%)",
            " ".join(f"{g:.2f}" for g in r["mean_gate"]),
        )
    return t
