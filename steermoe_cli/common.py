"""What every subcommand shares: the consoles and the error policy."""

from __future__ import annotations

import functools
import os
import traceback

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)  # progress, logs, errors
stdout = Console()  # results

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def friendly(fn):
    """A user error (``SteermoeError``) becomes one red line and exit code 2 (1 is reserved for
    "some inputs of a batch job failed"). Anything else is a bug or a capacity problem (a shape
    mismatch, out of memory): its traceback is printed in full with a hint to report it, exit code
    3. ``STEERMOE_DEBUG=1`` shows the traceback of user errors too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from steermoe_core.errors import SteermoeError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except SteermoeError as e:
            if os.environ.get("STEERMOE_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: run the same command with --resume to continue")
            raise typer.Exit(130) from None
        except Exception:
            traceback.print_exc()
            console.print("[bold red]internal error[/] (above): not caused by your input as far as steermoe can tell; "
                          "please report it with the traceback")
            raise typer.Exit(3) from None

    return wrapper


def usage_error(msg: str):
    from steermoe_core.errors import UsageError

    raise UsageError(msg)


def params_table(counts: dict[str, int]) -> Table:
    t = Table(title="trainable parameters", show_header=True)
    t.add_column("group")
    t.add_column("count", justify="right")
    for k, v in counts.items():
        t.add_row(k, f"{v:,}")
    return t
