"""The `steermoe` command: one thin module per subcommand, registered here. Nothing else."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from .ablate_cmd import ablate
from .analyze_cmd import analyze
from .common import EXIT_CODES_HELP
from .demo_cmd import demo
from .eval_cmd import eval_
from .export_cmd import export
from .infer_cmd import infer
from .prep_cmd import prep_app
from .serve_cmd import serve
from .train_cmd import train

app = typer.Typer(help="SteerMoE: give a frozen LLM ears.", epilog=EXIT_CODES_HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show the progress bars and warnings of the libraries "
                                                           "steermoe loads (transformers, DeepSpeed); hidden by default")] = False,
) -> None:
    """Options before the subcommand. ``--verbose`` travels as ``STEERMOE_VERBOSE=1``, so the processes
    a command starts (torchrun ranks, workers) and the code that loads those libraries see it."""
    if verbose:
        os.environ["STEERMOE_VERBOSE"] = "1"


app.add_typer(prep_app, name="prep")
app.command()(train)
app.command("eval")(eval_)
app.command()(infer)
app.command()(export)
app.command()(demo)
app.command()(ablate)
app.command()(analyze)
app.command()(serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
