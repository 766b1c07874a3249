"""Batch transcription at scale: results stream out, a killed run resumes, memory stays bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from conftest import tone_clip, train_tiny

from steermoe_core.inference import SteerMoE, iter_inputs

N_CLIPS = 300


@pytest.fixture(scope="module")
def ckpt(backbones, tiny_data, tmp_path_factory):
    return train_tiny(backbones, tiny_data, tmp_path_factory.mktemp("stream-run"), steps=60)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """300 short clips in nested folders, with two broken files in the middle."""
    d = tmp_path_factory.mktemp("many")
    for i in range(N_CLIPS):
        sub = d / f"part{i // 100}"
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"clip{i:03d}.wav", tone_clip(i % 4, 0.3 + 0.01 * (i % 7)), 16000, subtype="FLOAT")
    (d / "part1" / "clip150b.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (d / "part2" / "empty.flac").write_bytes(b"")
    return d


KILL_AFTER = """
import os, signal, sys
from steermoe_core.inference.api import SteerMoE
real = SteerMoE.stream
def stream(self, *a, **k):
    for i, r in enumerate(real(self, *a, **k)):
        if i == {n}:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill mid-run, at a known point
        yield r
SteerMoE.stream = stream
from steermoe_cli.main import app
sys.argv = ["steermoe", *sys.argv[1:]]
app()
"""


def _infer(ckpt, *args, kill_after: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = ["-c", KILL_AFTER.format(n=kill_after)] if kill_after is not None else ["-m", "steermoe_cli"]
    return subprocess.Popen([sys.executable, *head, "infer", *args, "--model", str(ckpt), "--max-new-tokens", "6",
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (a forked pool worker keeps its parent's)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(proc.name))
    return found


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stream_gives_the_same_text_as_the_in_memory_path(ckpt, folder):
    sm = SteerMoE.load(ckpt, "cpu")
    paths = list(iter_inputs([str(folder)]))
    assert len(paths) == N_CLIPS + 2
    whole = {r.path: (r.text, r.error is None) for r in sm.ask([str(p) for p in paths], max_new_tokens=6)}
    streamed = {r.path: (r.text, r.error is None) for r in sm.stream(iter_inputs([str(folder)]), max_new_tokens=6, lookahead=16)}
    assert streamed == whole
    assert sum(ok for _, ok in whole.values()) == N_CLIPS  # the two broken files are errors, the rest went on


@pytest.mark.slow
def test_lines_appear_as_files_finish_and_a_killed_run_resumes(ckpt, folder, tmp_path):
    full = tmp_path / "full.jsonl"
    p = _infer(ckpt, str(folder), "--format", "jsonl", "--out", str(full))
    p.wait()
    assert p.returncode == 1, p.stderr.read()[-2000:]  # two inputs failed, the rest succeeded
    reference = {r["path"]: r for r in _records(full)}
    assert len(reference) == N_CLIPS + 2

    part = tmp_path / "part.jsonl"
    p = _infer(ckpt, str(folder), "--format", "jsonl", "--out", str(part), kill_after=100)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert len(_records(part)) == 100  # every finished file was on disk, complete, when the kill came
    deadline = time.monotonic() + 10  # its audio-decoding worker (--decode-workers 1) ends with it
    while _processes_mentioning(str(part)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(part)), "a decode worker outlived the killed infer"
    p = _infer(ckpt, str(folder), "--format", "jsonl", "--out", str(part), "--resume")
    p.wait()
    assert p.returncode == 1
    recs = _records(part)
    assert len(recs) == N_CLIPS + 2 and len({r["path"] for r in recs}) == N_CLIPS + 2
    assert {r["path"]: (r["text"], r["error"] is None) for r in recs} == {k: (r["text"], r["error"] is None) for k, r in reference.items()}


def test_srt_outputs_keep_relative_paths(ckpt, tmp_path):
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    for sub, ext in (("a", "wav"), ("b", "flac")):
        (tmp_path / "in" / sub).mkdir(parents=True)
        sf.write(tmp_path / "in" / sub / f"x.{ext}", tone_clip(1, 0.6), 16000)
    r = CliRunner().invoke(app, ["infer", str(tmp_path / "in"), "--model", str(ckpt), "--format", "srt",
                                 "--out", str(tmp_path / "srt"), "--max-new-tokens", "4", "--decode-workers", "0"])
    assert r.exit_code == 0, r.output
    assert sorted(str(p.relative_to(tmp_path / "srt")) for p in (tmp_path / "srt").rglob("*.srt")) == ["a/x.srt", "b/x.srt"]


def test_from_list_and_exit_code_when_nothing_succeeds(ckpt, tmp_path):
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    (tmp_path / "bad.wav").write_bytes(b"junk")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# inputs\n{tmp_path / 'bad.wav'}\n{tmp_path / 'missing.wav'}\n")
    r = CliRunner().invoke(app, ["infer", "--from-list", str(lst), "--model", str(ckpt), "--decode-workers", "0"])
    assert r.exit_code == 2 and "missing.wav" in r.stderr and "bad.wav" in r.stderr
