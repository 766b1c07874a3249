"""The folder job behind `steermoe infer`: records streamed to --out as files finish, --resume,
the N-process shards and their merge, and the final outputs, written atomically.

The CLI keeps argument parsing and printing; everything that touches the output files is here so
any front end (or a script) gets the same resume and merge rules.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from steermoe_core.atomic import write_text
from steermoe_core.errors import SteermoeError, StorageError, storage_error
from steermoe_core.inference.api import Result, Segment, file_stamp
from steermoe_core.inference.formats import jsonl_line, subtitles, text_line, to_json, to_jsonl, to_text

Key = tuple[str, int | None, int | None]


def record_key(path) -> Key:
    """What --resume matches an input on: its path as given, size and mtime."""
    return str(path), *file_stamp(path)


def write_failed(path: Path, e: OSError) -> SteermoeError:
    """One line naming the output and why it could not be written (a full disk, a permission: the
    project's ``StorageError``; any other OS error says its own reason)."""
    if isinstance(e, StorageError):
        return e
    return storage_error(e, path) or SteermoeError(f"{path}: could not be written ({e.strerror or e})")


def write_output(path: Path, text: str) -> None:
    """Atomic: the old file or the new one, never a cut-off or empty one; an OSError becomes a one-line error."""
    try:
        write_text(path, text)
    except OSError as e:
        raise write_failed(path, e) from e


def finished_records(out: Path) -> set[Key]:
    """Inputs already in a jsonl output; a line cut short by a kill is dropped from the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(out, "r+b") as f:
            f.truncate(len(keep))
    done = set()
    for line in keep.decode("utf-8").splitlines():
        rec = json.loads(line)
        done.add((rec["path"], rec.get("size"), rec.get("mtime_ns")))
    return done


def stream_records(
    results: Iterable[Result],
    fmt: str,
    out: Path | None,
    resume: bool,
    stdout: TextIO | None = None,
    on_result: Callable[[Result], None] | None = None,
    extra: Callable[[Result], dict] | None = None,
) -> list[Result]:
    """Consume the stream: jsonl lines (to ``out``, else ``stdout``) and text lines (to ``stdout``)
    go out as each file finishes, flushed one by one so a killed run can be resumed; everything is
    also kept for the summary and for formats written at the end. ``extra(r)``: more fields for a
    jsonl line (a part file's global input index)."""
    records: list[Result] = []
    sink: TextIO | None = None
    if fmt == "jsonl" and out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        existed = out.exists()
        try:
            sink = open(out, "a" if resume else "w", encoding="utf-8")
        except OSError as e:
            raise write_failed(out, e) from e
    elif fmt in ("jsonl", "text") and out is None:
        sink = stdout
    try:
        for r in results:
            records.append(r)
            if on_result:
                on_result(r)
            if sink is not None:
                if fmt == "jsonl":
                    sink.write(jsonl_line(r, extra(r) if extra else None))
                elif not r.error:
                    sink.write(text_line(r))
                sink.flush()
    except OSError as e:
        if sink is None or sink is stdout:
            raise
        with contextlib.suppress(OSError):
            sink.close()
        sink = None
        with contextlib.suppress(OSError):
            if not existed and out.stat().st_size == 0:
                out.unlink()  # no empty file left behind by a write that never got anywhere
        raise write_failed(out, e) from e
    finally:
        if sink is not None and sink is not stdout:
            sink.close()
    return records


def srt_paths(records: list[Result], out: Path, suffix: str = ".srt") -> dict[str, Path]:
    """One .srt (or ``suffix``) per input under ``out``, keeping paths relative to the inputs' common folder, so
    a/x.wav and b/x.flac never overwrite each other."""
    good = [r.path for r in records if not r.error]
    if not good:
        return {}
    root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in good]))
    return {p: out / Path(p).resolve().relative_to(root).with_suffix(suffix) for p in good}


def write_outputs(records: list[Result], fmt: str, out: Path | None, stdout: TextIO, merged: bool = False) -> None:
    """The formats written once every file is done (sorted into input order): srt or vtt (one file, or a
    folder of them), json, text into --out, and a sharded run's merged jsonl (``merged``)."""
    records.sort(key=lambda r: r.index)
    if fmt in ("srt", "vtt"):
        if out is None:
            stdout.write(subtitles(records[0], fmt))
        elif len(records) == 1 and out.suffix:
            write_output(out, subtitles(records[0], fmt))
        else:
            by_path = {r.path: r for r in records}
            for path, dest in srt_paths(records, out, "." + fmt).items():
                write_output(dest, subtitles(by_path[path], fmt))
    elif fmt == "json":
        write_output(out, to_json(records)) if out else stdout.write(to_json(records))
    elif fmt == "text" and out is not None:
        write_output(out, to_text(records))
    elif fmt == "jsonl" and merged:
        write_output(out, to_jsonl(records))


@dataclass
class Summary:
    good: list[Result]
    bad: list[Result]
    audio_s: float
    seconds: float  # wall time of a sharded run, else the model time of the good files
    wall: bool  # which of the two ``seconds`` is

    @property
    def speed(self) -> float:
        return self.audio_s / max(self.seconds, 1e-9)

    @property
    def decoded(self) -> bool:
        """Some segment reached the model. Without one (silence, noise, clips too short to hold
        speech) next to no model time was spent, and a real-time factor would be a meaningless
        division by almost zero."""
        return any(r.segments for r in self.good)


def summarize(records: list[Result], wall: float | None = None) -> Summary:
    good = [r for r in records if not r.error]
    bad = [r for r in records if r.error]
    seconds = wall if wall is not None else sum(r.wall_s for r in good)
    return Summary(good, bad, sum(r.audio_s for r in good), seconds, wall is not None)


def parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*-of-*"))


def drop_parts(out: Path) -> None:
    for p in parts(out):
        p.unlink()


def run_shard(
    paths: Iterable, out: Path, resume: bool, device: str, model, trust_remote_code: bool, backend: str, opts: dict,
    progress: Callable[[bool], contextlib.AbstractContextManager[Callable[[Result], None]]] | None = None,
) -> tuple[list[Result], float] | None:
    """One of N processes (started by `--gpus/--workers N` or any launcher): take every N-th input,
    append its records to its own jsonl part beside ``out`` (resumable like one process's output),
    then rank 0 merges every part in input order and returns (records, wall seconds); the other
    ranks return None. The caller writes the outputs (``write_outputs(..., merged=True)``) and then
    ``drop_parts``. ``progress(is_main)``: a context giving the per-result callback (a progress bar)."""
    from steermoe_core.inference import SteerMoE
    from steermoe_core.process_group import joined
    from steermoe_core.runtime import pick_device

    t0 = time.perf_counter()
    with joined(pick_device(device)) as (group, dev):
        rank, world = group.rank, group.world_size
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = list(paths)  # every process walks the same list: global indices, and a resumed merge's order
        done: set = set()
        if resume:  # what any earlier run finished: one process's --out, or parts of N processes
            for p in [out, *parts(out)]:
                done |= finished_records(p)
        elif group.is_main:
            drop_parts(out)
        group.barrier()
        part = out.with_name(f"{out.name}.part{rank}-of-{world}")
        index: list[int] = []

        def mine() -> Iterator:
            for i, p in enumerate(paths):
                if i % world == rank and (not done or record_key(p) not in done):
                    index.append(i)
                    yield p

        def global_index(results: Iterable[Result]) -> Iterator[Result]:
            for r in results:
                r.index = index[r.index]
                yield r

        sm = SteerMoE.load(model, str(dev), trust_remote_code, backend=backend)
        with progress(group.is_main) if progress else contextlib.nullcontext() as on_result:
            stream_records(global_index(sm.stream(mine(), **opts)), "jsonl", part, resume, on_result=on_result,
                           extra=lambda r: {"index": r.index})
        group.barrier()
        if not group.is_main:
            return None
        return merge_parts(out, paths, resume), time.perf_counter() - t0


def merge_parts(out: Path, paths: list, resume: bool) -> list[Result]:
    """Every part's records (and, resumed, those already in ``out``), each placed by its input's position."""
    order = {record_key(p): i for i, p in enumerate(paths)} if resume else {}
    merged: dict = {}
    for p in ([out] if resume and out.exists() else []) + parts(out):
        for line in p.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            segments = [Segment(**x) for x in d.pop("segments")]
            r = Result(**{k: v for k, v in d.items() if k != "index"}, segments=segments)
            if resume:  # one record per input file, as one process's --resume keeps
                key = (r.path, r.size, r.mtime_ns)
                r.index = order.get(key, len(paths) + len(merged))
            else:
                key = r.index = d["index"]
            merged[key] = r
    return sorted(merged.values(), key=lambda r: r.index)
