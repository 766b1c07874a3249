"""`infer --out`: what a failed write (a full disk) leaves behind and says. No model needed: the
folder job's writers are fed records directly."""

from __future__ import annotations

import builtins
import errno
import io

import pytest

from steermoe_core.errors import SteermoeError
from steermoe_core.inference import folder_job
from steermoe_core.inference.api import Result, Segment


def _records() -> list[Result]:
    return [Result(f"a{i}.wav", text=f"text {i}", audio_s=1.0, segments=[Segment(0.0, 1.0, f"text {i}")], index=i) for i in range(3)]


class _FullDisk(io.StringIO):
    def write(self, s):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fmt", ["text", "json", "srt", "vtt"])
def test_a_full_disk_leaves_no_file_and_names_the_path(tmp_path, monkeypatch, fmt):
    out = tmp_path / f"out.{fmt}"
    real_open = builtins.open

    def full(path, mode="r", *a, **k):  # the temp file beside --out cannot be written
        if "w" in str(mode) and str(path).startswith(str(tmp_path)):
            return _FullDisk()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("os.fdopen", lambda fd, mode="r", *a, **k: _FullDisk())
    monkeypatch.setattr(builtins, "open", full)
    records = _records()[:1]
    with pytest.raises(SteermoeError) as e:
        folder_job.write_outputs(records, fmt, out, io.StringIO())
    assert str(e.value) == f"{out}: no space left on the device"
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary


def test_a_failed_write_keeps_the_previous_output_whole(tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    folder_job.write_outputs(_records(), "json", out, io.StringIO())
    before = out.read_bytes()
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SteermoeError):
        folder_job.write_outputs(_records()[:1], "json", out, io.StringIO())
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_jsonl_streaming_to_a_full_disk_leaves_no_empty_file(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    real_open = builtins.open

    def opened(p, mode="r", *a, **k):
        if str(p) == str(out):
            real_open(p, mode, *a, **k).close()  # the file exists, empty, as a real open leaves it
            return _FullDisk()
        return real_open(p, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", opened)
    with pytest.raises(SteermoeError) as e:
        folder_job.stream_records(iter(_records()), "jsonl", out, resume=False)
    assert str(e.value) == f"{out}: no space left on the device" and not out.exists()


def _summary_line(monkeypatch, records: list[Result], wall: float | None = None) -> str:
    """What `infer` prints at the end of a run over ``records``."""
    from rich.console import Console

    from steermoe_cli import infer_cmd

    err = io.StringIO()
    monkeypatch.setattr(infer_cmd, "console", Console(file=err, width=400))
    infer_cmd._finish(records, infer_cmd.Format.text, None, 0, wall=wall)  # text to stdout: written as it streamed
    return err.getvalue()


@pytest.mark.parametrize("wall", [None, 3.5])
def test_no_speed_is_reported_when_no_speech_was_decoded(monkeypatch, wall):
    """10 minutes of low noise and a 0.05 s clip: both rightly 'no speech found', no segment ever
    reached the model, and the summary used to divide 0.17 h by next to no model time
    ('600050000000.0x real time')."""
    silent = [Result("noise.wav", audio_s=600.0, wall_s=1e-8, warnings=["no speech found"], index=0),
              Result("short.wav", audio_s=0.05, wall_s=0.0, warnings=["no speech found"], index=1)]
    line = _summary_line(monkeypatch, silent, wall)
    assert "2 file(s) done, 0.17 h of audio, no speech was decoded, 0 failed" in line, line
    assert "real time" not in line
    assert not folder_job.summarize(silent).decoded


def test_the_speed_is_reported_once_a_segment_was_decoded(monkeypatch):
    records = _records()
    for r in records:
        r.wall_s = 0.5
    line = _summary_line(monkeypatch, records)
    assert "3 file(s) done, 0.00 h of audio in 1.5 s of model time (2.0x real time), 0 failed" in line, line
    line = _summary_line(monkeypatch, records, wall=6.0)
    assert "in 6.0 s wall time (0.5x real time)" in line, line


def test_the_progress_bar_shows_no_speed_before_speech_was_decoded():
    from rich.console import Console

    from steermoe_cli.progress import audio_progress

    with audio_progress(Console(file=io.StringIO()), disable=True) as bar:
        bar.add(600.0, 0.0, decoded=False)
        assert "real time" not in bar.progress.tasks[0].fields["info"]
        bar.add(2.0, 0.5, decoded=True)
        assert bar.progress.tasks[0].fields["info"].endswith("· 1204.0x real time")
