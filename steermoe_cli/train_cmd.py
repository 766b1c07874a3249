"""`steermoe train RECIPE [--gpus N ...]`: train the adapter; checkpoints and metrics.jsonl go to the run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, friendly, params_table, stdout, usage_error
from .progress import step_progress

LAUNCH_OPTIONS = ("--gpus", "--nodes", "--node-rank", "--master-addr", "--master-port")


def _without_launch_options(argv: list[str]) -> list[str]:
    """The command line again, minus what only the launcher needs (the workers must not re-launch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _launch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500) -> None:
    """Run ``python -m steermoe_cli *argv`` in ``nproc`` processes per node under torch.distributed.run."""
    from torch.distributed.run import main as torchrun

    args = [
        f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port}", "--module", "steermoe_cli", *argv,
    ]
    torchrun(args)



@friendly
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe name>)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key=value")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint (any world size)")] = False,
    gpus: Annotated[int, typer.Option(help="Processes per node: GPUs, or CPU processes with train.device=cpu")] = 1,
    nodes: Annotated[int, typer.Option(help="Nodes in the job")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank")] = 0,
    master_addr: Annotated[str, typer.Option(help="Rendezvous host (node 0)")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option(help="Rendezvous port")] = 29500,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (world size, batches, precision policy) and load nothing")] = False,
):
    """Train the adapter; checkpoints and metrics.jsonl go to the run folder."""
    from steermoe_core.config import load_recipe
    from steermoe_core.training.distributed import launched_by_a_launcher

    r = load_recipe(recipe, set_)
    world = gpus * nodes
    if r.distributed.engine == "deepspeed":
        usage_error(f"{recipe}: distributed.engine = 'deepspeed' is not available in this release; use 'ddp'")
    if r.data.batch_size % world:
        usage_error(f"data.batch_size = {r.data.batch_size} is the global batch: it must divide by the {world} processes")
    run_dir = out_dir or Path("runs") / recipe.stem
    if dry_run:
        stdout.print(f"recipe {recipe} -> run folder {run_dir}{' (resume)' if resume else ''}")
        stdout.print(f"processes: {world} ({gpus} per node x {nodes} node(s)), engine {r.distributed.engine}, device {r.train.device}")
        stdout.print(f"global batch {r.data.batch_size} = {world} x {r.data.batch_size // world} per process, "
                     f"grad_accum {r.train.grad_accum}, {r.train.max_steps} steps, precision {r.train.precision}")
        return
    if world > 1 and not launched_by_a_launcher():
        if r.train.device != "cpu":
            import torch

            have = torch.cuda.device_count()
            if have < gpus:
                usage_error(f"--gpus {gpus}: this node has {have} CUDA GPU(s); use train.device=cpu for CPU processes")
        _launch(["train", *_without_launch_options(sys.argv[2:])], gpus, nodes, node_rank, master_addr, master_port)
        return
    _run(r, run_dir, resume)


def _run(r, run_dir: Path, resume: bool) -> None:
    import os

    from steermoe_core.training.loop import Callbacks
    from steermoe_core.training.loop import train as run

    main = int(os.environ.get("RANK", "0")) == 0
    with step_progress(console, r.train.max_steps, disable=not main) as bar:
        def on_start(info):
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

        result = run(r, run_dir, resume=resume, callbacks=Callbacks(on_start=on_start, on_step=on_step, on_eval=on_eval))
    if main:
        console.print(f"[green]done[/]: model in {result.model_dir}")
