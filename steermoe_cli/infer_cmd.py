"""`steermoe infer`: ask a trained model about audio files, folders and long recordings."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, friendly


class Task(str, Enum):
    transcribe = "transcribe"
    summarize = "summarize"
    qa = "qa"


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"
    srt = "srt"


@friendly
def infer(
    inputs: Annotated[list[str], typer.Argument(help="Audio files, folders (recursive) and globs")],
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint (default: $STEERMOE_MODEL, else the demo's)")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Free-form instruction, e.g. 'Summarize the main points'")] = None,
    task: Annotated[Task, typer.Option(help="transcribe | summarize | qa (with --question)")] = Task.transcribe,
    question: Annotated[Optional[str], typer.Option(help="The question, with --task qa")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows decoded together")] = 8,
    fmt: Annotated[Format, typer.Option("--format", help="text | json | jsonl | srt")] = Format.text,
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout (a folder for srt of several files)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per window / answer")] = 256,
    beams: Annotated[int, typer.Option(help="1 = greedy")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated (one file)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Let the LLM's own Python code run (never read from a checkpoint)")] = False,
):
    """Ask a trained model about audio files, folders and long recordings."""
    from steermoe_core.errors import UsageError
    from steermoe_core.inference import SteerMoE, expand_inputs, to_srt
    from steermoe_core.inference.api import TASK_PROMPTS

    from .progress import step_progress

    if prompt and (task != Task.transcribe or question):
        raise UsageError("--prompt replaces --task/--question: give one or the other")
    if task == Task.qa and not question:
        raise UsageError("--task qa needs --question TEXT")
    text_prompt = prompt or (question if task == Task.qa else TASK_PROMPTS[task.value])
    transcribe = prompt is None and task == Task.transcribe
    paths = expand_inputs(inputs)
    if not paths:
        raise UsageError(f"no audio files found in {' '.join(inputs)}")
    if stream and len(paths) != 1:
        raise UsageError("--stream works on a single file")
    if fmt == Format.srt and len(paths) > 1 and (out is None or out.suffix):
        raise UsageError("--format srt with several inputs needs --out FOLDER (one .srt per input)")

    sm = SteerMoE.load(model, device, trust_remote_code)
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(sm.backend.tokenizer, skip_special_tokens=True)
        results = sm.ask([str(p) for p in paths], text_prompt, transcribe, 1, max_new_tokens, beams, streamer)
    else:
        with step_progress(console, 1, label="decoding") as bar:
            def progress(done: int, total: int) -> None:
                bar.progress.update(bar.task, total=total)
                bar.advance(done)

            results = sm.ask([str(p) for p in paths], text_prompt, transcribe, batch_size, max_new_tokens, beams, progress=progress)

    if not stream:
        if fmt == Format.srt and len(paths) > 1:
            out.mkdir(parents=True, exist_ok=True)
            for r in results:
                if not r.error:
                    (out / (Path(r.path).stem + ".srt")).write_text(to_srt(r), encoding="utf-8")
            rendered = None
        elif fmt == Format.srt:
            rendered = to_srt(results[0]) if not results[0].error else ""
        elif fmt == Format.json:
            rendered = json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2) + "\n"
        elif fmt == Format.jsonl:
            rendered = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results)
        else:
            many = len(results) > 1
            rendered = "".join((f"{r.path}\t{r.text}\n" if many else f"{r.text}\n") for r in results if not r.error)
        if rendered is not None:
            if out:
                from steermoe_core.atomic import write_text

                write_text(out, rendered)
            else:
                sys.stdout.write(rendered)
    good = [r for r in results if not r.error]
    if good:
        audio, wall = sum(r.audio_s for r in good), sum(r.wall_s for r in good)
        console.print(f"{len(good)} file(s), {audio:.1f} s of audio in {wall:.1f} s ({audio / max(wall, 1e-9):.1f}x real time)")
    bad = [r for r in results if r.error]
    for r in bad:
        console.print(f"[bold red]error:[/] {r.error}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)
