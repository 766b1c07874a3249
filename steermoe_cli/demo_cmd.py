"""`steermoe demo`: the offline demo (synthesise, train SteerMoE and a linear adapter, score, transcribe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, friendly, stdout


@friendly
def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Work folder (default $STEERMOE_CACHE/demo, or demo-full)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps per adapter (default: the demo's size)")] = None,
    sentences: Annotated[Optional[int], typer.Option(help="Synthesised training sentences (default: the demo's size)")] = None,
    workers: Annotated[int, typer.Option(help="Prep worker processes (0 = all cores)")] = 0,
    full: Annotated[bool, typer.Option(help="The longer run whose adapter ships with steermoe (`make demo-full`)")] = False,
    size: Annotated[str, typer.Option(help="auto | standard | small: auto picks small where the CPU runs fp32 (no native bf16), to stay near 20 minutes")] = "auto",
    ship: Annotated[bool, typer.Option(help="With --full: copy the finished adapter into steermoe_core/demo/pretrained, where `make demo` scores it (maintainers)")] = False,
):
    """The offline demo: synthesise data, train SteerMoE and a linear adapter, score them on held-out
    and out-of-domain speech against Whisper's own decoder, transcribe real clips."""
    import time

    from steermoe_core.backbones.weights import cache_root
    from steermoe_core.config import load_recipe
    from steermoe_core.demo.run import (
        RECIPE,
        full_config,
        run_demo,
        ship_adapter,
        sized_config,
    )
    from steermoe_core.errors import UsageError
    from steermoe_core.runtime import pick_device, resolve_precision

    t0 = time.perf_counter()
    log = lambda s: console.print(f"[dim]{time.perf_counter() - t0:6.0f}s[/] {s}", highlight=False)  # noqa: E731
    if full and size != "auto":
        raise UsageError("--size sets the short demo's size; --full has its own (`steermoe demo --full` alone)")
    if ship and (not full or steps is not None or sentences is not None):
        raise UsageError("--ship copies the adapter of the full run as `make demo-full` makes it: --full, without --steps or --sentences")
    recipe = load_recipe(RECIPE)
    if full:
        cfg, why = full_config(workdir or cache_root() / "demo-full", workers), "--full"
    else:
        device = pick_device(recipe.train.device)
        cfg, why = sized_config(size, cache_root(), resolve_precision(recipe.train.precision, device), workdir, workers, device)
    if steps is not None:
        cfg.steps = steps
    if sentences is not None:
        cfg.train_sentences = sentences
    log(f"size: {cfg.steps} steps of batch {cfg.batch_size or recipe.data.batch_size}, {cfg.train_sentences} training "
        f"sentences, {cfg.valid_sentences} + {cfg.ood_sentences} held-out clips ({why}); work folder {cfg.workdir}")
    res = run_demo(cfg, log=log)
    t = Table(title="steermoe infer on real speech (pytest-audioeval) and a synthesised clip")
    for col in ("file", "reference", "steermoe"):
        t.add_column(col)
    for r in res["transcripts"]:
        t.add_row(r["file"], r["reference"], r["steermoe"])
    stdout.print(t)
    t = Table(title=f"WER, normalised (lower is better); {'full' if full else 'short'} run: {res['steps']} steps on {res['train_utterances']} sentences")
    sets = list(next(iter(res["wer"].values())))
    t.add_column("model")
    for s in sets:
        t.add_column(s, justify="right")
    for name, row in res["wer"].items():
        t.add_row(name, *[f"{100 * row[s]:.1f}%" for s in sets])
    stdout.print(t)
    stdout.print("in-domain: held-out Brown-corpus sentences, training voices; out-of-domain: Harvard sentences, "
                 "voices never trained on; real clips: pytest-audioeval's English recordings")
    stdout.print(f"precision {res['precision']}; checkpoint: {res['checkpoint']}")
    if ship:
        stdout.print(f"shipped: {res['checkpoint']} -> {ship_adapter(Path(res['checkpoint']))}", soft_wrap=True)
    stdout.print(f"demo: {time.perf_counter() - t0:.0f} s in total")
