"""`steermoe prep ...`: turn a corpus on disk into the prepared Parquet layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import console, friendly, stdout
from .progress import step_progress

prep_app = typer.Typer(help="Prepare a dataset (Parquet shards of FLAC + manifest.json).", no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", help="Output folder")]
Workers = Annotated[int, typer.Option(help="Parallel worker processes (0 = all cores)")]
Resume = Annotated[bool, typer.Option(help="Keep shards finished by an earlier, interrupted run; refused (naming what "
                                              "changed) when the inputs are not the ones it sharded")]
Encoding = Annotated[str, typer.Option(help="Encoding of the transcripts and manifests (a byte-order mark is dropped); "
                                            "a transcript that does not decode is listed as a bad input")]
Strict = Annotated[bool, typer.Option(help="Fail (exit 2) if any input was skipped")]
ShardSize = Annotated[int, typer.Option(help="Utterances per Parquet shard")]


def check_encoding(name: str) -> str:
    from steermoe_core.data.prep.sources import check_encoding as check

    return check(name)


def _run(splits: dict, out: Path, source: str, workers: int, resume: bool, strict: bool, shard_size: int, nested: bool) -> None:
    from steermoe_core.data.prep.pipeline import run_prep

    table = Table(title=f"prepared {source}")
    for col in ("split", "folder", "examples", "hours", "skipped"):
        table.add_column(col)
    all_skipped, empty = [], []
    for split, (items, skipped) in splits.items():
        dest = out / split if nested else out
        with step_progress(console, max(len(items), 1), label=f"prep {split}") as bar:
            res = run_prep(items, dest, source, split, skipped, workers, shard_size, resume, progress=bar.advance)
        m = res.manifest
        table.add_row(split, str(dest), str(m["examples"]), f"{m['hours']:.3f}", str(len(res.skipped)))
        all_skipped += res.skipped
        if m["examples"] == 0:
            empty.append(split)
    stdout.print(table)
    if empty:
        console.print(f"[bold red]error:[/] {escape(source)}: no usable input in {', '.join(empty)}; every input was skipped:",
                      highlight=False, soft_wrap=True)  # one line whatever the terminal's width: grep-able
        _list_skipped(all_skipped)
        raise typer.Exit(2)
    if all_skipped:
        console.print(f"[yellow]warning:[/] {len(all_skipped)} input(s) skipped (all listed in manifest.json):")
        _list_skipped(all_skipped)
        if strict:
            console.print("[bold red]error:[/] --strict: inputs were skipped")
            raise typer.Exit(2)


def _list_skipped(skipped: list[dict], most: int = 20) -> None:
    for s in skipped[:most]:
        console.print(f"  {escape(str(s['input']))}: {escape(str(s['reason']))}", highlight=False, soft_wrap=True)
    if len(skipped) > most:
        console.print(f"  ... and {len(skipped) - most} more")


@prep_app.command()
def librispeech(
    src: Annotated[Path, typer.Argument(help="LibriSpeech root (or one subset folder)")],
    out: Out,
    subset: Annotated[Optional[list[str]], typer.Option(help="Subset folder name(s), e.g. train-clean-100")] = None,
    workers: Workers = 0, resume: Resume = False, strict: Strict = False, shard_size: ShardSize = 1000,
    encoding: Encoding = "utf-8",
):
    """LibriSpeech: SUBSET/SPEAKER/CHAPTER/*.flac with *.trans.txt; all subsets given go in one dataset."""
    from steermoe_core.data.prep.sources import librispeech as read

    def go():
        items, skipped, split = read(src, subset, check_encoding(encoding))
        _run({split: (items, skipped)}, out, "librispeech", workers, resume, strict, shard_size, nested=False)

    friendly(go)()


@prep_app.command()
def aishell(
    src: Annotated[Path, typer.Argument(help="AISHELL-1 root (wav/ and transcript/)")],
    out: Out, workers: Workers = 0, resume: Resume = False, strict: Strict = False, shard_size: ShardSize = 1000,
    encoding: Encoding = "utf-8",
):
    """AISHELL-1: one dataset per split under OUT/train, OUT/dev, OUT/test."""
    from steermoe_core.data.prep.sources import aishell as read

    friendly(lambda: _run(read(src, check_encoding(encoding)), out, "aishell", workers, resume, strict, shard_size, nested=True))()


@prep_app.command()
def clothoaqa(
    src: Annotated[Path, typer.Argument(help="ClothoAQA root (audio_files/ and clotho_aqa_*.csv)")],
    out: Out, workers: Workers = 0, resume: Resume = False, strict: Strict = False, shard_size: ShardSize = 1000,
    encoding: Encoding = "utf-8",
):
    """ClothoAQA: every question of a clip, with all answers and confidences; OUT/train, OUT/val, OUT/test."""
    from steermoe_core.data.prep.sources import clothoaqa as read

    friendly(lambda: _run(read(src, check_encoding(encoding)), out, "clothoaqa", workers, resume, strict, shard_size, nested=True))()


@prep_app.command()
def folder(
    src: Annotated[Path, typer.Argument(help="Folder of audio + sidecar .txt, or a csv/tsv/jsonl manifest")],
    out: Out, workers: Workers = 0, resume: Resume = False, strict: Strict = False, shard_size: ShardSize = 1000,
    encoding: Encoding = "utf-8",
    allow_outside: Annotated[bool, typer.Option("--allow-outside", help="Let a manifest name audio outside its own folder "
                                                                      "(by default such rows are listed as bad inputs)")] = False,
):
    """Any audio (WAV/FLAC/OGG/MP3/M4A/...) with sidecar .txt files, or a manifest of path,text[,prompt,language]."""
    from steermoe_core.data.prep.sources import folder as read

    def go():
        items, skipped = read(src, check_encoding(encoding), allow_outside)
        _run({"all": (items, skipped)}, out, f"folder:{src}", workers, resume, strict, shard_size, nested=False)

    friendly(go)()


@prep_app.command()
def synth(
    texts: Annotated[Path, typer.Argument(help="Text file, one utterance per line")],
    out: Out,
    voice: Annotated[Optional[list[str]], typer.Option(help="ENGINE:NAME[@pSEMITONES]: flite, espeak, kokoro (e.g. kokoro:mix-3), piper, hibari; repeat for several (docs/voices.md)")] = None,
    speed: Annotated[Optional[list[float]], typer.Option(help="Speaking-rate factors; repeat for several")] = None,
    copies: Annotated[int, typer.Option(help="Renditions per line (different voice/speed each)")] = 1,
    for_eval: Annotated[bool, typer.Option("--for-eval", help="An evaluation set: allows the voices reserved for evaluation")] = False,
    workers: Workers = 0, resume: Resume = False, strict: Strict = False, shard_size: ShardSize = 1000,
):
    """Synthesise speech from text, offline: flite / espeak-ng, and Kokoro / Piper / hibari neural voices where installed."""
    from steermoe_core.data.prep.synth import (
        DEFAULT_SPEEDS,
        DEFAULT_VOICES,
        synth_items,
    )

    def go():
        items, skipped = synth_items(texts, voice or DEFAULT_VOICES, speed or DEFAULT_SPEEDS, copies, for_eval=for_eval)
        _run({"synth": (items, skipped)}, out, f"synth:{texts.name}", workers, resume, strict, shard_size, nested=False)

    friendly(go)()
