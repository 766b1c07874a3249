"""The `steermoe` command: parses arguments, prints, and calls steermoe_core. Nothing else."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .progress import step_progress

app = typer.Typer(help="SteerMoE: give a frozen LLM ears.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def friendly(fn):
    """Known failures become one red line and exit code 1; never a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from steermoe_core.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except typer.Exit:  # click's Exit is a RuntimeError: let deliberate exit codes through
            raise
        except USER_ERRORS as e:
            if os.environ.get("STEERMOE_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: resume with --resume")
            raise typer.Exit(130) from None

    return wrapper


def _params_table(counts: dict[str, int]) -> Table:
    t = Table(title="trainable parameters", show_header=True)
    t.add_column("group")
    t.add_column("count", justify="right")
    for k, v in counts.items():
        t.add_row(k, f"{v:,}")
    return t


@app.command()
@friendly
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe name>)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field: key=value")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's latest checkpoint")] = False,
    gpus: Annotated[int, typer.Option(help="GPUs on this node (>1 launches DeepSpeed)")] = 1,
):
    """Train the adapter on one device; checkpoints and metrics.jsonl go to the run folder."""
    from steermoe_core.config import load_recipe
    from steermoe_core.train import Callbacks
    from steermoe_core.train import train as run

    if gpus > 1:
        raise_user("--gpus > 1: multi-GPU launching is not available in this release; train on one device")
    r = load_recipe(recipe, set_)
    run_dir = out_dir or Path("runs") / recipe.stem
    with step_progress(console, r.train.max_steps) as bar:
        def on_start(info):
            console.print(f"device {info['device']} · {info['train_examples']} training examples"
                          + (f" · {info['skipped_too_long']} longer than {r.data.max_duration} s skipped" if info["skipped_too_long"] else ""))
            console.print(_params_table(info["parameters"]))
            bar.update(completed=info["start_step"])

        def on_step(rec):
            bar.update(completed=rec["step"], loss=rec["loss"], lr=rec["lr"], sps=rec["samples_per_s"])

        def on_eval(rec):
            shown = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float))
            console.print(f"step {rec['step']}: {shown}")

        result = run(r, run_dir, resume=resume, callbacks=Callbacks(on_start=on_start, on_step=on_step, on_eval=on_eval))
    console.print(f"[green]done[/]: model in {result.model_dir}")


@app.command("eval")
@friendly
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder (e.g. runs/NAME/model)")],
    data: Annotated[Path, typer.Option(help="Prepared dataset folder")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
    predictions: Annotated[Optional[Path], typer.Option(help="Write per-utterance predictions (JSONL)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override e.g. eval.num_beams=4")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
):
    """Decode a prepared set deterministically and report WER / CER / QA accuracy."""
    from steermoe_core.checkpoint import load_checkpoint
    from steermoe_core.data import ShardedDataset
    from steermoe_core.evaluate import evaluate
    from steermoe_core.weights import pick_device

    model, recipe, _ = load_checkpoint(checkpoint, pick_device(device), set_)
    n = len(ShardedDataset(data))
    with step_progress(console, recipe.eval.max_examples or n, label="decoding") as bar:
        summary = evaluate(model, data, recipe, predictions, progress=lambda k: bar.advance(k))
    if as_json:
        print(json.dumps(summary))
    else:
        t = Table(title=f"{checkpoint} on {data}")
        for k in summary:
            t.add_column(k)
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in summary.values()])
        out.print(t)


@app.command()
@friendly
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export ONNX graphs")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder")] = Path("export"),
):
    """Export a checkpoint (ONNX audio tower + decoder): not available in this release."""
    raise_user("export: ONNX export is not available in this release yet")


def raise_user(msg: str):
    from steermoe_core.errors import UsageError

    raise UsageError(msg)


def _register_subapps() -> None:
    from .prep_cmd import prep_app
    from .infer_cmd import infer

    app.add_typer(prep_app, name="prep")
    app.command()(friendly(infer))


_register_subapps()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


@app.command()
@friendly
def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Work folder (default $STEERMOE_CACHE/demo)")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per adapter")] = 170,
    sentences: Annotated[int, typer.Option(help="Synthesised training sentences")] = 3000,
    workers: Annotated[int, typer.Option(help="Prep worker processes (0 = all cores)")] = 0,
):
    """The offline demo: synthesise data, train SteerMoE and a linear adapter, evaluate, transcribe real clips."""
    import time

    from steermoe_core.demo import DemoConfig, run_demo
    from steermoe_core.weights import cache_root

    t0 = time.perf_counter()
    cfg = DemoConfig(workdir or cache_root() / "demo", train_sentences=sentences, steps=steps, workers=workers)
    res = run_demo(cfg, log=lambda s: console.print(f"[dim]{time.perf_counter() - t0:6.0f}s[/] {s}", highlight=False))
    t = Table(title="steermoe infer on real speech (pytest-audioeval) and a synthesised clip")
    for col in ("file", "reference", "steermoe"):
        t.add_column(col)
    for r in res["transcripts"]:
        t.add_row(r["file"], r["reference"], r["steermoe"])
    out.print(t)
    t = Table(title=f"WER after {res['steps']} steps (normalised, lower is better)")
    sets = list(next(iter(res["wer"].values())))
    t.add_column("model")
    for s in sets:
        t.add_column(s, justify="right")
    for name, row in res["wer"].items():
        t.add_row(name, *[f"{100 * row[s]:.1f}%" for s in sets])
    out.print(t)
    out.print(f"checkpoint: {res['checkpoint']}  (steermoe infer FILE --model {res['checkpoint']})")
