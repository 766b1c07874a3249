"""`steermoe train RECIPE [--gpus N ...]`: train the adapter; checkpoints and metrics.jsonl go to the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, friendly, params_table, stdout, usage_error
from .launch import launch_command, relaunch, subcommand_argv
from .progress import step_progress


@friendly
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe name>)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key=value")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's newest complete checkpoint (any world size); "
                                              "refused when it has none")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the earlier run in the run folder (its checkpoints, model/ and "
                                                 "metrics); without it or --resume such a folder is refused")] = False,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Start this new run from a checkpoint's adapter "
                                                      "weights and, where it kept them, its optimizer state (this recipe's "
                                                      "schedule and data from step 0); ignored by --resume")] = None,
    gpus: Annotated[int, typer.Option(help="Processes per node: GPUs, or CPU processes with train.device=cpu")] = 1,
    nodes: Annotated[int, typer.Option(help="Nodes in the job")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank")] = 0,
    master_addr: Annotated[str, typer.Option(help="Rendezvous host (node 0)")] = "127.0.0.1",
    master_port: Annotated[Optional[int], typer.Option(help="Rendezvous port (default: a free one on one node, 29500 across nodes)")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (launch command, world size, per-process batches, engine) and load nothing")] = False,
):
    """Train the adapter; checkpoints and metrics.jsonl go to the run folder.

    A run folder belongs to one run: a second `train` into it while one is running is refused, and so
    is a new run into a folder that holds checkpoints or a model, unless --resume or --overwrite."""
    from steermoe_core.config import load_recipe
    from steermoe_core.launch_env import launched_by_a_launcher
    from steermoe_core.training.engines import check_engine_available

    r = load_recipe(recipe, set_)
    if resume and overwrite:
        usage_error("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    world = gpus * nodes
    if r.data.batch_size % world:
        usage_error(f"data.batch_size = {r.data.batch_size} is the global batch: it must divide by the {world} processes")
    run_dir = out_dir or Path("runs") / recipe.stem
    launch = (gpus, nodes, node_rank, master_addr, master_port)
    if dry_run:
        _print_plan(r, recipe, run_dir, resume, world, launch)
        return
    check_engine_available(r.distributed.engine)
    if world > 1 and not launched_by_a_launcher():
        if r.train.device != "cpu":
            import torch

            have = torch.cuda.device_count()
            if have < gpus:
                usage_error(f"--gpus {gpus}: this node has {have} CUDA GPU(s); use train.device=cpu for CPU processes")
        relaunch(*launch)
        return
    _run(r, run_dir, resume, overwrite, init_from)


def _print_plan(r, recipe: Path, run_dir: Path, resume: bool, world: int, launch: tuple) -> None:
    """What `--dry-run` shows: enough to check a multi-node job before it takes the machines."""
    gpus, nodes = launch[0], launch[1]
    d, t, e = r.data, r.train, r.distributed
    stdout.print(f"recipe {recipe} -> run folder {run_dir}{' (resume)' if resume else ''}", soft_wrap=True, highlight=False)
    argv = [a for a in subcommand_argv() if a not in ("--dry-run", "--no-dry-run")]
    cmd = launch_command(argv, *launch) if world > 1 else "none: runs in this process"
    stdout.print(f"launch: {cmd}", soft_wrap=True, highlight=False)
    stdout.print(f"processes: {world} ({gpus} per node x {nodes} node(s)), engine {e.engine}"
                 + (f" (ZeRO stage {e.zero_stage})" if e.engine == "deepspeed" else "") + f", device {t.device}", soft_wrap=True, highlight=False)
    stdout.print(f"global batch {d.batch_size} = {world} x {d.batch_size // world} per process (micro-batch), "
                 f"grad_accum {t.grad_accum}: {d.batch_size * t.grad_accum} examples per optimizer step; "
                 f"{t.max_steps} steps, precision {t.precision}", soft_wrap=True)


def _run(r, run_dir: Path, resume: bool, overwrite: bool, init_from: Optional[Path] = None) -> None:
    import os

    from steermoe_core.training.loop import Callbacks
    from steermoe_core.training.loop import train as run

    main = int(os.environ.get("RANK", "0")) == 0
    with step_progress(console, r.train.max_steps, disable=not main) as bar:
        def on_start(info):
            if main and info.get("resumed_from"):
                for why in info["passed_over"]:
                    console.print(f"[yellow]passed over[/] {why}", highlight=False, soft_wrap=True)
                console.print(f"resuming from {info['resumed_from']} (step {info['start_step']})", highlight=False, soft_wrap=True)
            if main and info.get("init_from") and not info.get("resumed_from"):
                init = info["init_from"]
                console.print(f"starting from {init['path']} (its step {init['step']}; optimizer state: {init.get('optimizer', 'none')})",
                              highlight=False, soft_wrap=True)
            if main:
                console.print(f"device {info['device']} · precision {info['precision']} · {info['world_size']} process(es) · "
                              f"{info['train_examples']} training examples"
                              + (f" · {info['skipped_too_long']} longer than {r.data.max_duration} s skipped" if info["skipped_too_long"] else ""))
                console.print(params_table(info["parameters"]))
            bar.update(completed=info["start_step"])

        def on_step(rec):
            bar.update(completed=rec["step"], loss=rec["loss"], lr=rec["lr"], sps=rec["samples_per_s"])

        def on_eval(rec):
            if main:
                shown = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float))
                console.print(f"step {rec['step']}: {shown} ({rec['valid_examples']} examples)")

        def on_skip(rec):
            if main:
                console.print(f"[yellow]skipped[/] a step after step {rec['step']}: {rec['skipped']} "
                              f"({rec['bad_steps']} of at most {r.train.max_bad_steps}); batch ids {', '.join(rec['batch_ids'])}",
                              highlight=False, soft_wrap=True)

        callbacks = Callbacks(on_start=on_start, on_step=on_step, on_eval=on_eval, on_skip=on_skip)
        result = run(r, run_dir, resume=resume, callbacks=callbacks, overwrite=overwrite, init_from=init_from)
    if main:
        console.print(f"[green]done[/]: model in {result.model_dir}")
