"""`steermoe train RECIPE`: train the adapter; checkpoints and metrics.jsonl go to the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, friendly, params_table, usage_error
from .progress import step_progress


@friendly
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe name>)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key=value")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint")] = False,
    gpus: Annotated[int, typer.Option(help="Processes (GPUs) on this node")] = 1,
):
    """Train the adapter; checkpoints and metrics.jsonl go to the run folder."""
    from steermoe_core.config import load_recipe
    from steermoe_core.training.loop import Callbacks
    from steermoe_core.training.loop import train as run

    if gpus > 1:
        usage_error("--gpus > 1: multi-GPU launching is not available in this release; train on one device")
    r = load_recipe(recipe, set_)
    if r.distributed.engine == "deepspeed":
        usage_error(f"{recipe}: distributed.engine = 'deepspeed' is not available in this release; use 'ddp'")
    run_dir = out_dir or Path("runs") / recipe.stem
    with step_progress(console, r.train.max_steps) as bar:
        def on_start(info):
            console.print(f"device {info['device']} · precision {info['precision']} · {info['train_examples']} training examples"
                          + (f" · {info['skipped_too_long']} longer than {r.data.max_duration} s skipped" if info["skipped_too_long"] else ""))
            console.print(params_table(info["parameters"]))
            bar.update(completed=info["start_step"])

        def on_step(rec):
            bar.update(completed=rec["step"], loss=rec["loss"], lr=rec["lr"], sps=rec["samples_per_s"])

        def on_eval(rec):
            shown = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float))
            console.print(f"step {rec['step']}: {shown} ({rec['valid_examples']} examples)")

        result = run(r, run_dir, resume=resume, callbacks=Callbacks(on_start=on_start, on_step=on_step, on_eval=on_eval))
    console.print(f"[green]done[/]: model in {result.model_dir}")
