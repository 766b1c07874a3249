"""Rich progress bars shared by the subcommands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """A progress task that also shows training figures (loss, lr, samples/s) when given them."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def update(self, completed: int | None = None, loss: float | None = None, lr: float | None = None, sps: float | None = None) -> None:
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if sps is not None:
            parts.append(f"{sps:.1f} samples/s")
        fields = {"info": " · ".join(parts)} if parts else {}
        self.progress.update(self.task, completed=completed, **fields)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


@contextlib.contextmanager
def step_progress(console: Console, total: int, label: str = "training", disable: bool = False) -> Iterator[Bar]:
    progress = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=disable,
    )
    with progress:
        yield Bar(progress, progress.add_task(label, total=total, info=""))


class AudioBar:
    """Progress in audio hours (the total is unknown while inputs are still being listed), with the
    files done and the model's running real-time factor, shown once some file had speech decoded
    (before that the model time is next to nothing and the factor meaningless)."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task
        self.audio = self.wall = 0.0
        self.files = 0
        self.decoded = False

    def add(self, audio_s: float, wall_s: float, decoded: bool = True) -> None:
        """``decoded``: some of this file's speech reached the model (not a file found silent)."""
        self.audio += audio_s
        self.wall += wall_s
        self.files += 1
        self.decoded = self.decoded or (decoded and wall_s > 0)
        info = f"{self.files} files · {self.audio / 3600:.3f} h audio"
        if self.decoded:
            info += f" · {self.audio / self.wall:.1f}x real time"
        self.progress.update(self.task, completed=self.audio / 3600, info=info)


@contextlib.contextmanager
def audio_progress(console: Console, disable: bool = False) -> Iterator[AudioBar]:
    progress = Progress(
        TextColumn("[bold]decoding"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        console=console, disable=disable,
    )
    with progress:
        yield AudioBar(progress, progress.add_task("decoding", total=None, info=""))
