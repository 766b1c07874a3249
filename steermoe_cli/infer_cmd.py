"""`steermoe infer`: ask a trained model about audio files, folders and long recordings."""

from __future__ import annotations

import itertools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, friendly
from .launch import processes_for, relaunch


class Task(str, Enum):
    transcribe = "transcribe"
    summarize = "summarize"
    qa = "qa"


class BackendName(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"
    srt = "srt"


@friendly
def infer(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Audio files, folders (recursive) and globs")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint, or an exported folder with --backend onnxruntime (default: $STEERMOE_MODEL, else the demo's)")] = None,
    backend: Annotated[BackendName, typer.Option(help="torch | onnxruntime (a folder from `steermoe export --onnx`; no torch needed)")] = BackendName.torch,
    prompt: Annotated[Optional[str], typer.Option(help="Free-form instruction, e.g. 'Summarize the main points'")] = None,
    task: Annotated[Task, typer.Option(help="transcribe | summarize | qa (with --question)")] = Task.transcribe,
    question: Annotated[Optional[str], typer.Option(help="The question, with --task qa")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows decoded together")] = 8,
    fmt: Annotated[Format, typer.Option("--format", help="text | json | jsonl | srt")] = Format.text,
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout (a folder for srt of several files)")] = None,
    from_list: Annotated[Optional[Path], typer.Option(help="A file listing input paths, one per line")] = None,
    resume: Annotated[bool, typer.Option(help="With --format jsonl --out FILE: skip inputs already in FILE (same path, size, mtime)")] = False,
    decode_workers: Annotated[int, typer.Option(help="Processes decoding audio ahead of the model (0 = in this process)")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per window / answer")] = 256,
    beams: Annotated[int, typer.Option(help="1 = greedy")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated (one file)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Let the LLM's own Python code run (never read from a checkpoint)")] = False,
    gpus: Annotated[int, typer.Option(help="Processes, one GPU each: inputs sharded, parts merged in input order into --out")] = 1,
    workers: Annotated[int, typer.Option(help="CPU processes (with --device cpu), sharded like --gpus")] = 1,
):
    """Ask a trained model about audio files, folders and long recordings.

    Results stream out as files finish (jsonl lines are flushed one by one); exit code 0 when every
    input succeeded, 1 when some failed, 2 when none did or the command itself was wrong."""
    from steermoe_core.errors import UsageError
    from steermoe_core.inference import SteerMoE, iter_inputs
    from steermoe_core.inference.api import TASK_PROMPTS

    if prompt and (task != Task.transcribe or question):
        raise UsageError("--prompt replaces --task/--question: give one or the other")
    if task == Task.qa and not question:
        raise UsageError("--task qa needs --question TEXT")
    if resume and (fmt != Format.jsonl or out is None):
        raise UsageError("--resume needs --format jsonl --out FILE (the records it continues)")
    if not inputs and from_list is None:
        raise UsageError("no inputs: give audio files, folders or globs, or --from-list FILE")
    if from_list is not None and not from_list.is_file():
        raise UsageError(f"{from_list}: no such list file")
    from steermoe_core.training.distributed import launched_by_a_launcher

    nproc = processes_for(gpus, workers, device)
    if (nproc > 1 or launched_by_a_launcher()) and (out is None or stream):
        raise UsageError("several processes need --out FILE (each writes a part, merged there at the end) and no --stream")
    if nproc > 1 and not launched_by_a_launcher():
        relaunch(nproc)
        return
    text_prompt = prompt or (question if task == Task.qa else TASK_PROMPTS[task.value])
    transcribe = prompt is None and task == Task.transcribe
    paths = iter_inputs(inputs or [], from_list)
    first = next(paths, None)
    if first is None:  # every process of a sharded run finds the same nothing, and says so
        raise UsageError(f"no audio files found in {' '.join(inputs or [str(from_list)])}")
    paths = itertools.chain([first], paths)
    if launched_by_a_launcher():
        _infer_shard(paths, out, fmt, resume, device, model, trust_remote_code, backend.value,
                     dict(prompt=text_prompt, transcribe=transcribe, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          num_beams=beams, workers=decode_workers))
        return
    done: set[tuple[str, int | None, int | None]] = set()
    if resume:
        done = _finished_records(out)
        paths = (p for p in paths if _key(p) not in done)
    if stream:
        paths = list(paths)
        if len(paths) != 1:
            raise UsageError("--stream works on a single file")
    if fmt == Format.srt and out is None:
        paths = list(paths)
        if len(paths) > 1:
            raise UsageError("--format srt with several inputs needs --out FOLDER (one .srt per input)")

    sm = SteerMoE.load(model, device, trust_remote_code, backend=backend.value)
    streamer = sm.backend.text_streamer() if stream else None
    results = sm.stream(paths, text_prompt, transcribe, 1 if stream else batch_size, max_new_tokens, beams, streamer, workers=decode_workers)
    records = _emit(results, fmt, out, resume, quiet=stream)
    if len(records) == 0 and resume:
        console.print(f"nothing left to do: all inputs are already in {out}")
        return
    _finish(records, fmt, out, len(done))


def _key(path) -> tuple[str, int | None, int | None]:
    from steermoe_core.inference.api import file_stamp

    return str(path), *file_stamp(path)


def _finished_records(out: Path) -> set[tuple[str, int | None, int | None]]:
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


def _emit(results, fmt: Format, out: Optional[Path], resume: bool, quiet: bool, extra=None) -> list:
    """Consume the stream: jsonl lines and text lines go out as each file finishes; everything is
    also kept (without audio) for the summary and for formats written at the end. ``extra(r)``:
    more fields for a jsonl line (a part file's global input index)."""
    from .progress import audio_progress

    records = []
    sink = None
    if fmt == Format.jsonl and out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        sink = open(out, "a" if resume else "w", encoding="utf-8")
    elif fmt in (Format.jsonl, Format.text) and out is None and not quiet:
        sink = sys.stdout
    try:
        with audio_progress(console, disable=quiet) as bar:
            for r in results:
                records.append(r)
                bar.add(r.audio_s, r.wall_s)
                if sink is not None:
                    if fmt == Format.jsonl:
                        sink.write(json.dumps({**r.to_dict(), **(extra(r) if extra else {})}, ensure_ascii=False) + "\n")
                    elif not r.error:
                        sink.write(f"{r.path}\t{r.text}\n")
                    sink.flush()
    finally:
        if sink is not None and sink is not sys.stdout:
            sink.close()
    return records


def _srt_paths(records: list, out: Path) -> dict[str, Path]:
    """One .srt per input under ``out``, keeping paths relative to the inputs' common folder, so
    a/x.wav and b/x.flac never overwrite each other."""
    good = [r.path for r in records if not r.error]
    if not good:
        return {}
    root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in good]))
    return {p: out / Path(p).resolve().relative_to(root).with_suffix(".srt") for p in good}


def _finish(records: list, fmt: Format, out: Optional[Path], skipped: int, wall: float | None = None) -> None:
    from steermoe_core.atomic import write_text
    from steermoe_core.inference import to_srt

    records.sort(key=lambda r: r.index)
    if fmt == Format.srt:
        if out is None:
            sys.stdout.write(to_srt(records[0]) if not records[0].error else "")
        elif len(records) == 1 and out.suffix:
            write_text(out, to_srt(records[0]) if not records[0].error else "")
        else:
            by_path = {r.path: r for r in records}
            for path, dest in _srt_paths(records, out).items():
                write_text(dest, to_srt(by_path[path]))
    elif fmt == Format.json:
        rendered = json.dumps([r.to_dict() for r in records], ensure_ascii=False, indent=2) + "\n"
        write_text(out, rendered) if out else sys.stdout.write(rendered)
    elif fmt == Format.text and out is not None:
        many = len(records) > 1
        write_text(out, "".join((f"{r.path}\t{r.text}\n" if many else f"{r.text}\n") for r in records if not r.error))
    elif fmt == Format.jsonl and wall is not None:  # merged parts
        write_text(out, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))
    good = [r for r in records if not r.error]
    bad = [r for r in records if r.error]
    audio = sum(r.audio_s for r in good)
    spent = f"{wall:.1f} s wall time" if wall is not None else f"{sum(r.wall_s for r in good):.1f} s of model time"
    seconds = wall if wall is not None else sum(r.wall_s for r in good)
    console.print(f"{len(good)} file(s) done{f' ({skipped} already done before)' if skipped else ''}, "
                  f"{audio / 3600:.2f} h of audio in {spent} ({audio / max(seconds, 1e-9):.1f}x real time), "
                  f"{len(bad)} failed", soft_wrap=True)
    if bad:
        console.print(f"[bold red]failed inputs[/] ({len(bad)}):")
        for r in bad:
            console.print(f"  {r.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1 if good or skipped else 2)


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*-of-*"))


def _drop_parts(out: Path) -> None:
    for p in _parts(out):
        p.unlink()


def _infer_shard(
    paths, out: Path, fmt: Format, resume: bool, device: str, model, trust_remote_code: bool, backend: str, opts: dict
) -> None:
    """One of N processes (started by `--gpus/--workers N` or any launcher): take every N-th input,
    append its records to its own jsonl part beside ``out`` (resumable like one process's output),
    then rank 0 merges every part in input order into ``out`` and prints the summary."""
    import time

    from steermoe_core.inference import SteerMoE
    from steermoe_core.inference.api import Result, Segment
    from steermoe_core.runtime import pick_device
    from steermoe_core.training.engines import make_strategy

    t0 = time.perf_counter()
    strategy, dev = make_strategy("ddp", pick_device(device))
    try:
        rank, world = strategy.rank, strategy.world_size
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = list(paths)  # every process walks the same list: global indices, and a resumed merge's order
        done: set = set()
        if resume:  # what any earlier run finished: one process's --out, or parts of N processes
            for p in [out, *_parts(out)]:
                done |= _finished_records(p)
        elif strategy.is_main:
            _drop_parts(out)
        strategy.barrier()
        part = out.with_name(f"{out.name}.part{rank}-of-{world}")
        index: list[int] = []

        def mine():
            for i, p in enumerate(paths):
                if i % world == rank and (not done or _key(p) not in done):
                    index.append(i)
                    yield p

        def global_index(results):
            for r in results:
                r.index = index[r.index]
                yield r

        sm = SteerMoE.load(model, str(dev), trust_remote_code, backend=backend)
        _emit(global_index(sm.stream(mine(), **opts)), Format.jsonl, part, resume, quiet=not strategy.is_main,
              extra=lambda r: {"index": r.index})
        strategy.barrier()
        if not strategy.is_main:
            return
        # a resumed run merges the records already in --out too, all placed by their input's position now
        order = {_key(p): i for i, p in enumerate(paths)} if resume else {}
        merged: dict = {}
        for p in ([out] if resume and out.exists() else []) + _parts(out):
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
        records = sorted(merged.values(), key=lambda r: r.index)
        try:
            _finish(records, fmt, out, 0, wall=time.perf_counter() - t0)
        except typer.Exit:  # some inputs failed: the merged output is written all the same
            _drop_parts(out)
            raise
        _drop_parts(out)
    finally:
        strategy.close()
