"""`steermoe eval CKPT --data DIR`: decode a prepared set deterministically and score it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, friendly, stdout
from .launch import processes_for, relaunch
from .progress import step_progress


@friendly
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder (e.g. runs/NAME/model)")],
    data: Annotated[Path, typer.Option(help="Prepared dataset folder")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
    predictions: Annotated[Optional[Path], typer.Option(help="Write per-utterance predictions (JSONL)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override e.g. eval.num_beams=4")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Let the LLM's own Python code run (never read from a checkpoint)")] = False,
    gpus: Annotated[int, typer.Option(help="Processes, one GPU each: the examples are sharded and the predictions gathered")] = 1,
    workers: Annotated[int, typer.Option(help="CPU processes (with --device cpu), sharded like --gpus")] = 1,
):
    """Decode a prepared set deterministically and report WER / CER / QA accuracy."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import evaluate
    from steermoe_core.model.checkpoint import load_checkpoint
    from steermoe_core.runtime import pick_device, resolve_precision
    from steermoe_core.launch_env import launched_by_a_launcher
    from steermoe_core.training.engines import make_strategy

    nproc = processes_for(gpus, workers, device)
    if nproc > 1 and not launched_by_a_launcher():
        relaunch(nproc)
        return
    strategy, dev = make_strategy("ddp", pick_device(device))
    try:
        model, recipe, _ = load_checkpoint(checkpoint, dev, set_, trust_remote_code=trust_remote_code)
        n = len(ShardedDataset(data))
        mine = len(strategy.shard_items(list(range(min(recipe.eval.max_examples or n, n)))))
        if strategy.is_main:
            console.print(f"precision {resolve_precision(recipe.train.precision, dev, 'decode')}", soft_wrap=True)
        with step_progress(console, mine, label="decoding", disable=not strategy.is_main) as bar:
            summary = evaluate(model, data, recipe, predictions if strategy.is_main else None, progress=lambda k: bar.advance(k),
                               shard=strategy.shard_items, gather=strategy.gather)
    finally:
        strategy.close()
    if not strategy.is_main:
        return
    if as_json:
        print(json.dumps(summary))
    else:
        t = Table(title=f"{checkpoint} on {data}")
        for k in summary:
            t.add_column(k)
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in summary.values()])
        stdout.print(t)

