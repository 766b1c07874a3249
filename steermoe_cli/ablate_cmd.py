"""`steermoe ablate RECIPE --variants ... --steps N --out DIR`: the paper's comparisons, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, friendly, stdout
from .progress import step_progress


@friendly
def ablate(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe: the base every variant changes")],
    variants: Annotated[str, typer.Option(help="Comma-separated: linear, post_encoder, layer_wise, per_layer_router, "
                                               "encoder_lora, llm_lora, vocab_posterior, experts=N, top_k=N, temperature=T, "
                                               "load_balance=W")] = (
        "linear,post_encoder,layer_wise,per_layer_router,experts=4,experts=16,encoder_lora"),
    steps: Annotated[int, typer.Option(help="Optimizer steps per variant")] = 200,
    out: Annotated[Optional[Path], typer.Option("--out", help="Ablation folder (default runs/ablate-<recipe name>)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Evaluation set (default: the recipe's data.valid)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field for every variant: key=value")] = None,
):
    """Train each variant from the same seed and data, evaluate each on the same set, and write
    ablation.md + ablation.json. Run it again to resume: finished variants are skipped."""
    from steermoe_core.experiments.ablate import run_ablation

    out = out or Path("runs") / f"ablate-{recipe.stem}"
    bars: list = []

    def callbacks_for(v):
        from steermoe_core.training.loop import Callbacks

        console.print(f"[bold]{v.name}[/]: {v.description}")
        bar = bars[0]

        def on_start(info):
            bar.progress.reset(bar.task, total=info["max_steps"], completed=info["start_step"], info="")

        return Callbacks(on_start=on_start, on_step=lambda rec: bar.update(completed=rec["step"], loss=rec["loss"], sps=rec["samples_per_s"]))

    def on_result(r):
        console.print(f"  {r['variant']}: {r['metric']} {r['value']:.4f} · {r['trainable_parameters']:,} trainable · "
                      f"{r['samples_per_s']:.2f} samples/s · {r['train_wall_s']:.0f} s training")

    with step_progress(console, steps, label="variant") as bar:
        bars.append(bar)
        results = run_ablation(recipe, variants, steps, out, data, set_, callbacks_for, on_result)
    t = Table(title=f"ablation: {steps} steps per variant ({out / 'ablation.md'})")
    for col in ("variant", results[0]["metric"], "trainable params", "samples/s", "train wall s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in results:
        t.add_row(r["variant"], f"{r['value']:.4f}", f"{r['trainable_parameters']:,}", f"{r['samples_per_s']:.2f}", f"{r['train_wall_s']:.0f}")
    stdout.print(t)
