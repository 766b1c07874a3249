"""A run folder belongs to one run: its lock, its checkpoints, and how a new run may take it over.

The lock is an OS-level ``flock`` on ``RUN/.lock``: the kernel releases it when the process ends,
however it ends (kill -9 included), so there is no stale lock file to clean up by hand. The file
holds the holder's pid, for the one-line refusal a second writer gets. Only the process that writes
the folder (rank 0 of a multi-process job) takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steermoe_core.errors import CheckpointError, UsageError

LOCK_NAME = ".lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# what a checkpoint folder must hold to resume from it (DeepSpeed adds its own files beside these)
CHECKPOINT_FILES = ("adapter.safetensors", "recipe.toml", "meta.json", "train_state.pt")


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the block; a second writer gets a ``UsageError`` naming the holder's pid."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"{out}: another steermoe train (pid {holder}) is writing this run folder; "
                             "wait for it to finish or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def checkpoint_step(path: Path) -> int | None:
    """The step a ``step-NNNNNNN`` folder name stands for (None for anything else)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest step first: by the number, not by the name."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def holds_a_run(out: Path) -> list[str]:
    """What in ``out`` belongs to an earlier run (empty: the folder can take a new run)."""
    found = []
    steps = step_dirs(out)
    if steps:
        found.append(f"{len(steps)} checkpoint(s) up to {steps[-1].name}")
    elif (out / "checkpoints" / "latest").exists():
        found.append("checkpoints/latest")
    if (out / "model").exists():
        found.append("model/")
    return found


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when its adapter, state and meta are all there and agree."""
    missing = [n for n in CHECKPOINT_FILES if not (path / n).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    try:
        meta_step = int(json.loads((path / "meta.json").read_text())["step"])
    except (ValueError, KeyError, TypeError, OSError):
        return "meta.json unreadable"
    if meta_step != checkpoint_step(path):
        return f"meta.json says step {meta_step}"
    return None


def _pointer_step(out: Path) -> int | None:
    marker = out / "checkpoints" / "latest"
    try:
        return checkpoint_step(Path(marker.read_text().strip()))
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a resumed run starts from, and the newer ones it passed over (with why)."""

    path: Path
    step: int
    passed_over: tuple[str, ...] = ()


def resume_point(out: Path) -> ResumePoint:
    """The newest complete checkpoint that ``latest`` had reached: the pointer moves only after a
    checkpoint (every process's part of it) is on disk, so a newer folder was never confirmed.
    Raises ``CheckpointError`` when there is none, rather than starting over from step 0."""
    steps = step_dirs(out)
    pointer = _pointer_step(out)
    passed = []
    for path in reversed(steps):
        step = checkpoint_step(path)
        if pointer is not None and step > pointer:
            passed.append(f"{path.name}: written after checkpoints/latest ({pointer}) last moved")
            continue
        why = incomplete_reason(path)
        if why is None:
            return ResumePoint(path, step, tuple(passed))
        passed.append(f"{path.name}: {why}")
    where = out / "checkpoints"
    if (out / "model").exists() and not steps:
        raise UsageError(f"{out}: this run already finished (model/ exists) and has no checkpoint to continue from")
    if not passed:
        raise CheckpointError(f"{where}: no checkpoint to resume from; run without --resume to start this run")
    raise CheckpointError(f"{where}: no complete checkpoint to resume from ({'; '.join(passed)}); "
                          "start over with --overwrite, or give another --out")


def latest_complete(out: Path) -> Path | None:
    """The checkpoint ``--resume`` would start from, or None."""
    try:
        return resume_point(out).path
    except (CheckpointError, UsageError):
        return None


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what a killed writer leaves behind: ``.latest.*.tmp`` pointers, ``.step-*.tmp`` folders
    of an unfinished checkpoint and ``.*.old`` folders of an unfinished swap. Only while holding the lock."""
    removed = []
    for root in (out, out / "checkpoints"):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                removed.append(p)
    return removed


def clear_run(out: Path) -> None:
    """``--overwrite``: remove the earlier run's checkpoints, model, metrics and recipe. Each is first
    renamed out of the way in one step, so a kill halfway leaves no half-deleted checkpoint that a
    later ``--resume`` could mistake for part of a run."""
    for name in ("checkpoints", "model", "metrics.jsonl", "recipe.toml"):
        p = out / name
        if not p.exists() and not p.is_symlink():
            continue
        trash = out / f".{name}.{os.getpid()}.old"
        os.replace(p, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash)
        else:
            trash.unlink()


def prune(out: Path, current_step: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``current_step``, by step number (0 = all of them).
    Folders of later steps are what an abandoned continuation left (this run resumed from before them):
    removed too."""
    for path in step_dirs(out):
        step = checkpoint_step(path)
        if step > current_step:
            shutil.rmtree(path, ignore_errors=True)
    for path in step_dirs(out)[:-keep] if keep else []:
        shutil.rmtree(path, ignore_errors=True)
