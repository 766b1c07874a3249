"""Re-running a subcommand in N processes under ``torch.distributed.run`` (train, eval, infer).

The CLI process that a user starts with ``--gpus N`` (or ``--nodes``) does no work itself: it runs
the same command line again under torch.distributed.run without the launch options, and exits
with its code. A process already started by a launcher (torchrun, deepspeed, srun) never re-launches.
"""

from __future__ import annotations

import shlex
import sys

LAUNCH_OPTIONS = ("--gpus", "--workers", "--nodes", "--node-rank", "--master-addr", "--master-port")


def without_launch_options(argv: list[str]) -> list[str]:
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


DEFAULT_MASTER_PORT = 29500


def torchrun_args(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
                  master_port: int | None = None) -> list[str]:
    """torch.distributed.run's arguments for ``python -m steermoe_cli *argv`` in ``nproc`` processes per node.
    One node and no port given: ``--standalone`` (a free port), so that concurrent runs on one machine
    never meet on the same rendezvous; across nodes every node must name the same port (29500 unless given)."""
    if nnodes == 1 and master_port is None:
        return ["--standalone", f"--nproc-per-node={nproc}", "--module", "steermoe_cli", *argv]
    return [
        f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port or DEFAULT_MASTER_PORT}", "--module", "steermoe_cli", *argv,
    ]


def launch_command(argv: list[str], *args, **kw) -> str:
    """The exact command ``relaunch`` runs, for ``--dry-run``."""
    return shlex.join([sys.executable, "-m", "torch.distributed.run", *torchrun_args(argv, *args, **kw)])


def subcommand_argv() -> list[str]:
    """This process's subcommand and its arguments, without the launch options."""
    return without_launch_options(sys.argv[1:])


def relaunch(nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
    """Run this very command in ``nproc`` processes per node under torch.distributed.run; raise
    ``SystemExit`` with a failure if any process failed."""
    import typer
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(torchrun_args(subcommand_argv(), nproc, nnodes, node_rank, master_addr, master_port))
    except ChildFailedError as e:  # keep the workers' own exit code (1: some inputs failed, 2: usage)
        code = e.get_first_failure()[1].exitcode  # the others may just have been stopped
        raise typer.Exit(code if 0 < code < 128 else 3) from None


def processes_for(gpus: int, workers: int, device: str) -> int:
    """How many processes `--gpus N` (one GPU each) or `--workers N` (CPU processes) ask for."""
    from steermoe_core.errors import UsageError

    if gpus > 1 and workers > 1:
        raise UsageError("--gpus N runs N GPU processes, --workers N runs N CPU processes: give one of them")
    if workers > 1 and device != "cpu":
        raise UsageError(f"--workers {workers} starts CPU processes: add --device cpu (or use --gpus N for GPUs)")
    if gpus > 1 and device != "cpu":
        import torch

        if torch.cuda.device_count() < gpus:
            raise UsageError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             "use --workers N --device cpu for CPU processes")
    return max(gpus, workers)
