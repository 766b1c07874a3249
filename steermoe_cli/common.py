"""What every subcommand shares: the consoles, the error policy, and the backend choice of `infer` and `serve`."""

from __future__ import annotations

import functools
import os
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)  # progress, logs, errors
stdout = Console()  # results

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The exit codes every subcommand keeps (also in `steermoe --help` and docs/reliability.md).
EXIT_OK, EXIT_SOME_INPUTS_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = ("Exit codes: 0 done; 1 some inputs of a batch failed (each listed); 2 bad input or usage, "
                   "one line on stderr naming the file and the cause (also a full disk or a permission); "
                   "3 internal error, with its traceback; 130 interrupted.")


def user_error_line(e: BaseException) -> str | None:
    """The one line for an exception the user's input or machine caused, or None for a programming
    error (whose traceback is kept). A full disk, a permission or undecodable text is the user's to fix
    even when the library that met it raised its own type."""
    from steermoe_core.errors import SteermoeError, decode_error_text, storage_error

    if isinstance(e, SteermoeError):
        return str(e)
    err = storage_error(e)
    if err is not None:
        return str(err)
    if isinstance(e, UnicodeDecodeError):
        return decode_error_text(e, "input text")
    return None


def friendly(fn):
    """A user error (``SteermoeError``, or an OS error the machine caused: no space left, permission
    denied, read-only; or text that is not UTF-8) becomes one red line and exit code 2 (1 is reserved
    for "some inputs of a batch job failed"). Anything else is a bug or a capacity problem (a shape
    mismatch, out of memory): its traceback is printed in full with a hint to report it, exit code
    3. ``STEERMOE_DEBUG=1`` shows the traceback of user errors too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: run the same command with --resume to continue")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            line = user_error_line(e)
            if line is None or os.environ.get("STEERMOE_DEBUG"):
                if line is not None:
                    raise
                traceback.print_exc()
                console.print("[bold red]internal error[/] (above): not caused by your input as far as steermoe can tell; "
                              "please report it with the traceback")
                raise typer.Exit(EXIT_INTERNAL) from None
            console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

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


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"


def pick_backend(model: Optional[Path], backend: BackendName, device: str, beams: int) -> tuple[Path, str]:
    """What runs the model (`infer`, `serve`): ``auto`` is onnxruntime on a CPU (``export.cache``:
    a checkpoint's export is built once and cached), torch elsewhere."""
    from steermoe_core.inference.choice import backend_for
    from steermoe_core.inference import default_model_path

    return backend_for(model or default_model_path(), backend.value, device, beams,
                       say=lambda line: console.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True))
