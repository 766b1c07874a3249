"""`steermoe demo`: the offline demo (synthesise, train SteerMoE and a linear adapter, score, transcribe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, friendly, stdout


@friendly
def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Work folder (default $STEERMOE_CACHE/demo)")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per adapter")] = 170,
    sentences: Annotated[int, typer.Option(help="Synthesised training sentences")] = 3000,
    workers: Annotated[int, typer.Option(help="Prep worker processes (0 = all cores)")] = 0,
):
    """The offline demo: synthesise data, train SteerMoE and a linear adapter, evaluate, transcribe real clips."""
    import time

    from steermoe_core.backbones.weights import cache_root
    from steermoe_core.demo.run import DemoConfig, run_demo

    t0 = time.perf_counter()
    cfg = DemoConfig(workdir or cache_root() / "demo", train_sentences=sentences, steps=steps, workers=workers)
    res = run_demo(cfg, log=lambda s: console.print(f"[dim]{time.perf_counter() - t0:6.0f}s[/] {s}", highlight=False))
    t = Table(title="steermoe infer on real speech (pytest-audioeval) and a synthesised clip")
    for col in ("file", "reference", "steermoe"):
        t.add_column(col)
    for r in res["transcripts"]:
        t.add_row(r["file"], r["reference"], r["steermoe"])
    stdout.print(t)
    t = Table(title=f"WER after {res['steps']} steps (normalised, lower is better)")
    sets = list(next(iter(res["wer"].values())))
    t.add_column("model")
    for s in sets:
        t.add_column(s, justify="right")
    for name, row in res["wer"].items():
        t.add_row(name, *[f"{100 * row[s]:.1f}%" for s in sets])
    stdout.print(t)
    stdout.print(f"checkpoint: {res['checkpoint']}  (steermoe infer FILE --model {res['checkpoint']})")
