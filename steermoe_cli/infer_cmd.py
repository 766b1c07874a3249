"""`steermoe infer`: ask a trained model about audio files, folders and long recordings."""

from __future__ import annotations

import contextlib
import itertools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import BackendName, console, friendly, pick_backend
from .launch import processes_for, relaunch
from .progress import audio_progress


class Task(str, Enum):
    transcribe = "transcribe"
    summarize = "summarize"
    qa = "qa"
    sentiment = "sentiment"


class Strategy(str, Enum):
    auto = "auto"
    direct = "direct"
    transcript = "transcript"


class Vad(str, Enum):
    auto = "auto"
    silero = "silero"
    energy = "energy"
    off = "off"


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"
    srt = "srt"
    vtt = "vtt"


@friendly
def infer(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Audio files, folders (recursive) and globs")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint, or a folder from `steermoe export --onnx` (default: $STEERMOE_MODEL, else the demo's)")] = None,
    backend: Annotated[BackendName, typer.Option(envvar="STEERMOE_BACKEND", help="auto (onnxruntime on a CPU, from an export built once and cached; torch on a GPU or with --beams) | torch | onnxruntime (a folder from `steermoe export --onnx`; no torch needed)")] = BackendName.auto,
    prompt: Annotated[Optional[str], typer.Option(help="Free-form instruction, e.g. 'Summarize the main points'")] = None,
    task: Annotated[Task, typer.Option(help="transcribe | summarize | qa (with --question) | sentiment (positive, negative or neutral)")] = Task.transcribe,
    question: Annotated[Optional[str], typer.Option(help="The question, with --task qa")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows decoded together")] = 8,
    fmt: Annotated[Format, typer.Option("--format", help="text | json | jsonl | srt | vtt")] = Format.text,
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout (a folder for srt/vtt of several files)")] = None,
    from_list: Annotated[Optional[Path], typer.Option(help="A file listing input paths, one per line")] = None,
    resume: Annotated[bool, typer.Option(help="With --format jsonl --out FILE: skip inputs already in FILE (same path, size, mtime)")] = False,
    decode_workers: Annotated[int, typer.Option(help="Processes decoding audio ahead of the model (0 = in this process)")] = 1,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation budget per segment / answer (default: each segment's from its duration at the checkpoint's training rate; answers 256)")] = None,
    strategy: Annotated[Strategy, typer.Option(help="Instructions: direct (the LLM reads the audio) | transcript (transcribe, then the frozen LLM answers over the text, map-reduce past its context) | auto (direct for a checkpoint trained for instructions whose audio fits, else transcript)")] = Strategy.auto,
    vad: Annotated[Optional[Vad], typer.Option(help="Cutting long recordings: auto | silero | energy | off (fixed windows) (default: the checkpoint's eval.vad)")] = None,
    beams: Annotated[int, typer.Option(help="1 = greedy")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated (one file)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Let the LLM's own Python code run (never read from a checkpoint)")] = False,
    gpus: Annotated[int, typer.Option(help="Processes, one GPU each: inputs sharded, parts merged in input order into --out")] = 1,
    workers: Annotated[int, typer.Option(help="CPU processes (with --device cpu), sharded like --gpus")] = 1,
    tools: Annotated[Optional[Path], typer.Option(help="A JSON file of OpenAI tools: each recording is a spoken request; its calls are printed as JSON lines")] = None,
    tool_choice: Annotated[str, typer.Option(help="With --tools: auto | none | required | a tool's name (then the call follows its schema)")] = "auto",
    live: Annotated[bool, typer.Option(help="Live: raw PCM16 mono from standard input (the input '-'), each utterance printed as it ends (cut at voice activity, as the server's realtime route cuts)")] = False,
    live_rate: Annotated[int, typer.Option(help="With --live: the input's sample rate")] = 16000,
):
    """Ask a trained model about audio files, folders and long recordings.

    Results stream out as files finish (jsonl lines are flushed one by one); exit code 0 when every
    input succeeded, 1 when some failed, 2 when none did or the command itself was wrong."""
    from steermoe_core.errors import UsageError
    from steermoe_core.inference import SteerMoE, folder_job, iter_inputs
    from steermoe_core.inference.api import TASK_PROMPTS

    if prompt and (task != Task.transcribe or question):
        raise UsageError("--prompt replaces --task/--question: give one or the other")
    if task == Task.qa and not question:
        raise UsageError("--task qa needs --question TEXT")
    if live:
        _live(inputs, live_rate, model, backend, device, trust_remote_code, vad, max_new_tokens, fmt)
        return
    if resume and (fmt != Format.jsonl or out is None):
        raise UsageError("--resume needs --format jsonl --out FILE (the records it continues)")
    if not inputs and from_list is None:
        raise UsageError("no inputs: give audio files, folders or globs, or --from-list FILE")
    if from_list is not None and not from_list.is_file():
        raise UsageError(f"{from_list}: no such list file")
    from steermoe_core.launch_env import launched_by_a_launcher

    nproc = processes_for(gpus, workers, device)
    if (nproc > 1 or launched_by_a_launcher()) and (out is None or stream):
        raise UsageError("several processes need --out FILE (each writes a part, merged there at the end) and no --stream")
    if nproc > 1 and not launched_by_a_launcher():
        relaunch(nproc)
        return
    if tools is not None:
        _spoken_calls(inputs, from_list, tools, tool_choice, model, backend, device, trust_remote_code, max_new_tokens, out)
        return
    text_prompt = prompt or (question if task == Task.qa else TASK_PROMPTS[task.value])
    transcribe = prompt is None and task == Task.transcribe
    paths = iter_inputs(inputs or [], from_list)
    first = next(paths, None)
    if first is None:  # every process of a sharded run finds the same nothing, and says so
        raise UsageError(f"no audio files found in {' '.join(inputs or [str(from_list)])}")
    paths = itertools.chain([first], paths)
    if launched_by_a_launcher():
        model, backend_name = pick_backend(model, backend, device, beams)
        _run_shard(paths, out, fmt, resume, device, model, trust_remote_code, backend_name,
                   dict(prompt=text_prompt, transcribe=transcribe, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        num_beams=beams, workers=decode_workers, strategy=strategy.value, vad=vad.value if vad else None))
        return
    done: set[tuple[str, int | None, int | None]] = set()
    if resume:
        done = folder_job.finished_records(out)
        paths = (p for p in paths if folder_job.record_key(p) not in done)
    if stream:
        paths = list(paths)
        if len(paths) != 1:
            raise UsageError("--stream works on a single file")
    if fmt in (Format.srt, Format.vtt) and out is None:
        paths = list(paths)
        if len(paths) > 1:
            raise UsageError(f"--format {fmt.value} with several inputs needs --out FOLDER (one .{fmt.value} per input)")

    model, backend_name = pick_backend(model, backend, device, beams)  # after the checks: a first export takes a minute
    sm = SteerMoE.load(model, device, trust_remote_code, backend=backend_name)
    streamer = sm.backend.text_streamer() if stream else None
    results = sm.stream(paths, text_prompt, transcribe, 1 if stream else batch_size, max_new_tokens, beams, streamer, workers=decode_workers,
                        strategy=strategy.value, vad=vad.value if vad else None, progress=None if transcribe else _instruction_progress)
    with audio_progress(console, disable=stream) as bar:
        records = folder_job.stream_records(results, fmt.value, out, resume, None if stream else sys.stdout,
                                            on_result=lambda r: bar.add(r.audio_s, r.wall_s, bool(r.segments)))
    if len(records) == 0 and resume:
        console.print(f"nothing left to do: all inputs are already in {out}")
        return
    _finish(records, fmt, out, len(done))


def _spoken_calls(inputs, from_list, tools: Path, tool_choice: str, model, backend, device: str, trust_remote_code: bool,
                  max_new_tokens: Optional[int], out: Optional[Path]) -> None:
    """--tools: each recording transcribed, then the frozen LLM asked with the tools; one JSON line per call."""
    import json

    from steermoe_core.atomic import write_text
    from steermoe_core.inference import SteerMoE, iter_inputs
    from steermoe_core.inference.tools import forced_functions, read_tools, spoken_calls

    offered = read_tools(tools)
    forced_functions(offered, tool_choice)  # a wrong name is an error before the model loads
    model, backend_name = pick_backend(model, backend, device, 1)
    sm = SteerMoE.load(model, device, trust_remote_code, backend=backend_name)
    lines, failed = [], 0
    for rec in spoken_calls(sm, iter_inputs(inputs or [], from_list), offered, tool_choice, max_new_tokens=max_new_tokens or 256):
        failed += "error" in rec
        lines.append(json.dumps(rec, ensure_ascii=False))
        if out is None:
            print(lines[-1], flush=True)
    if out is not None:
        write_text(out, "".join(line + "\n" for line in lines))
    if failed:
        raise typer.Exit(1 if failed < len(lines) else 2)


def _live(inputs, rate: int, model, backend, device: str, trust_remote_code: bool, vad, max_new_tokens, fmt: Format) -> None:
    """--live: utterances of raw PCM16 on standard input, each printed as it ends (``inference.live``)."""
    import json

    from steermoe_core.errors import UsageError
    from steermoe_core.inference import SteerMoE
    from steermoe_core.inference.live import transcribe_live

    if inputs != ["-"]:
        raise UsageError("--live reads raw PCM16 from standard input: give '-' as the only input")
    if fmt not in (Format.text, Format.jsonl):
        raise UsageError("--live prints --format text or jsonl")
    if not 8000 <= rate <= 192000:
        raise UsageError(f"--live-rate {rate}: give the input's sample rate in Hz (8000-192000)")
    model, backend_name = pick_backend(model, backend, device, 1)
    sm = SteerMoE.load(model, device, trust_remote_code, backend=backend_name)
    for utt, r in transcribe_live(sys.stdin.buffer, sm, rate, vad.value if vad else None, max_new_tokens=max_new_tokens):
        if fmt == Format.jsonl:
            print(json.dumps({"start": utt.start_ms / 1000, "end": utt.end_ms / 1000, "text": r.text}, ensure_ascii=False), flush=True)
        elif r.text:
            print(r.text, flush=True)


def _instruction_progress(path: str, what: str, done: int, total: int) -> None:
    """An instruction over a long recording takes a while: say how far it is (segments, then answers)."""
    if total > 1:
        console.print(f"{path}: {what} {done}/{total}", highlight=False, soft_wrap=True)


def _finish(records: list, fmt: Format, out: Optional[Path], skipped: int, wall: float | None = None) -> None:
    """Write the end-of-run formats, print the summary; exit 1 when some inputs failed, 2 when all did."""
    from steermoe_core.inference import folder_job

    folder_job.write_outputs(records, fmt.value, out, sys.stdout, merged=wall is not None)
    s = folder_job.summarize(records, wall)
    if not s.decoded:  # no model time to divide by: no speed to report
        spent = f"{s.audio_s / 3600:.2f} h of audio, no speech was decoded"
    elif s.wall:
        spent = f"{s.audio_s / 3600:.2f} h of audio in {s.seconds:.1f} s wall time ({s.speed:.1f}x real time)"
    else:
        spent = f"{s.audio_s / 3600:.2f} h of audio in {s.seconds:.1f} s of model time ({s.speed:.1f}x real time)"
    console.print(f"{len(s.good)} file(s) done{f' ({skipped} already done before)' if skipped else ''}, "
                  f"{spent}, {len(s.bad)} failed", soft_wrap=True)
    if s.bad:
        console.print(f"[bold red]failed inputs[/] ({len(s.bad)}):")
        for r in s.bad:
            console.print(f"  {r.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1 if s.good or skipped else 2)


def _run_shard(paths, out: Path, fmt: Format, resume: bool, device: str, model, trust_remote_code: bool, backend: str, opts: dict) -> None:
    """One of N processes: its share goes to a part file; rank 0 merges the parts into --out, then drops them
    (kept when writing --out itself failed, so a rerun with --resume loses nothing)."""
    from steermoe_core.inference import folder_job

    @contextlib.contextmanager
    def progress_for(is_main: bool):
        with audio_progress(console, disable=not is_main) as bar:
            yield lambda r: bar.add(r.audio_s, r.wall_s, bool(r.segments))

    merged = folder_job.run_shard(paths, out, resume, device, model, trust_remote_code, backend, opts, progress_for)
    if merged is None:
        return
    records, wall = merged
    try:
        _finish(records, fmt, out, 0, wall=wall)
    except typer.Exit:  # some inputs failed: the merged output is written all the same
        folder_job.drop_parts(out)
        raise
    folder_job.drop_parts(out)
