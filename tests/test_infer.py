"""`steermoe infer` and its Python API on a tiny trained checkpoint."""

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
from conftest import TEXTS, tone_clip
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.audio.load import ffmpeg_binary
from steermoe_core.audio.windows import split_points
from steermoe_core.inference import SteerMoE, expand_inputs, to_srt

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(backbones, tiny_data, tmp_path_factory):
    from conftest import tiny_recipe_dict

    from steermoe_core.config import recipe_from_dict
    from steermoe_core.training.loop import train

    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"]["valid"] = ""
    return train(recipe_from_dict(d), tmp_path_factory.mktemp("infer-run")).model_dir


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The training clips again, one per format, plus a corrupt file and a 95 s recording."""
    d = tmp_path_factory.mktemp("clips")
    for i, fmt in enumerate(["wav", "flac", "ogg", "mp3"]):
        wav = d / f"src{i}.wav"
        sf.write(wav, tone_clip(i, 0.8 + 0.3 * i), 16000, subtype="FLOAT" if fmt == "wav" else "PCM_16")
        if fmt == "wav":
            wav.rename(d / f"c{i}.wav")
        elif fmt == "ogg":
            sf.write(d / f"c{i}.ogg", tone_clip(i, 0.8 + 0.3 * i), 16000, format="OGG", subtype="VORBIS")
            wav.unlink()
        else:
            subprocess.run([ffmpeg_binary(), "-y", "-v", "error", "-i", str(wav), "-b:a", "192k", str(d / f"c{i}.{fmt}")], check=True)
            wav.unlink()
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    long_dir = tmp_path_factory.mktemp("long")
    pieces = [tone_clip(k % 4, 1.0) * (0.0005 if k % 6 == 5 else 1.0) for k in range(95)]
    sf.write(long_dir / "long.wav", np.concatenate(pieces), 16000, subtype="FLOAT")
    return d, long_dir / "long.wav"


def test_every_format_transcribes_and_a_corrupt_file_does_not_stop_the_folder(ckpt, clips):
    folder, _ = clips
    r = runner.invoke(app, ["infer", str(folder), "--model", str(ckpt), "--format", "jsonl", "--max-new-tokens", "12"])
    assert r.exit_code == 1, r.output  # a bad file makes the run fail at the end...
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    by_name = {rec["path"].rsplit("/", 1)[1]: rec for rec in recs}
    assert sorted(by_name) == ["c0.wav", "c1.flac", "c2.ogg", "c3.mp3", "corrupt.wav"]  # ...after all the others
    assert "corrupt.wav" in by_name["corrupt.wav"]["error"]
    for i, name in enumerate(["c0.wav", "c1.flac", "c2.ogg", "c3.mp3"]):
        assert by_name[name]["error"] is None
        assert by_name[name]["text"] == TEXTS[i], by_name[name]
        assert by_name[name]["rtf"] > 0 and by_name[name]["audio_s"] == pytest.approx(0.8 + 0.3 * i, abs=0.06)
    assert "1 failed" in r.stderr and "corrupt.wav" in r.stderr, r.stderr[-1500:]


def test_batched_equals_one_by_one_and_api_equals_cli(ckpt, clips):
    folder, _ = clips
    files = [str(p) for p in sorted(folder.glob("c[0-9].*"))]
    sm = SteerMoE.load(ckpt, "cpu")
    batched = [r.text for r in sm.transcribe(files, batch_size=8, max_new_tokens=12)]
    single = [sm.transcribe(f, batch_size=1, max_new_tokens=12)[0].text for f in files]
    assert batched == single == TEXTS
    r = runner.invoke(app, ["infer", *files, "--model", str(ckpt), "--format", "json", "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    assert [rec["text"] for rec in json.loads(r.stdout)] == batched


def test_long_recording_is_windowed_at_pauses_and_joined(ckpt, clips):
    _, long_wav = clips
    audio = sf.read(long_wav, dtype="float32")[0]
    spans = split_points(audio)
    assert len(spans) == 4 and spans[0][0] == 0 and spans[-1][1] == len(audio)
    assert all(e - s <= 30 * 16000 for s, e in spans)
    for _, cut in spans[:-1]:  # every cut falls in one of the quiet seconds (k % 6 == 5)
        assert int(cut // 16000) % 6 == 5, cut / 16000
    # the checkpoint trained on clips of 0.8-1.7 s: infer cuts long audio into segments no longer than that;
    # --vad off: fixed windows at low-energy points (tones are not speech to a voice activity detector)
    from steermoe_core.inference.longform import policy_from_checkpoint

    pol = policy_from_checkpoint(ckpt)
    assert pol.max_segment_seconds == pytest.approx(1.7, abs=0.06)
    want = split_points(audio, pol.max_segment_seconds, pol.max_segment_seconds * 2 / 3)
    r = runner.invoke(app, ["infer", str(long_wav), "--model", str(ckpt), "--format", "srt", "--max-new-tokens", "8", "--vad", "off"])
    assert r.exit_code == 0, r.output
    cues = [c for c in r.stdout.strip().split("\n\n") if c]
    assert len(cues) == len(want) > 50
    assert cues[0].splitlines()[0] == "1" and cues[0].splitlines()[1].startswith("00:00:00,000 --> 00:00:0")
    assert cues[-1].splitlines()[1].endswith("00:01:35,000")
    res = SteerMoE.load(ckpt, "cpu").transcribe(str(long_wav), max_new_tokens=8, vad="off")[0]
    assert res.text == " ".join(s.text for s in res.segments if s.text) and len(res.segments) == len(want)


def test_other_prompts_put_all_windows_in_one_prompt_and_respect_the_context(ckpt, clips):
    _, long_wav = clips
    sm = SteerMoE.load(ckpt, "cpu")
    res = sm.ask(str(long_wav), "Summarize the main points.", max_new_tokens=6, strategy="direct", vad="off")[0]
    assert res.strategy == "direct" and len(res.segments) == 1 and res.segments[0].end == pytest.approx(95.0)
    assert res.error is None or "empty answer" in res.error  # an empty answer is an error record, never a success
    sm.backend.max_context = 200  # 95 s is ~600 audio tokens
    res = sm.ask(str(long_wav), "Summarize the main points.", max_new_tokens=6, strategy="direct", vad="off")[0]
    assert "too long for the LLM's context" in res.error and "long.wav" in res.error


def test_expand_inputs_keeps_order_and_reads_globs(clips):
    folder, long_wav = clips
    got = expand_inputs([str(long_wav), str(folder / "c*.wav"), str(folder)])
    assert got[0] == long_wav and [p.name for p in got[1:3]] == ["c0.wav", "corrupt.wav"] and len(got) == 1 + 2 + 5


def test_without_a_model_infer_takes_the_shipped_adapter_else_says_how_to_get_one(monkeypatch, tmp_path):
    from steermoe_core.inference import api

    monkeypatch.delenv("STEERMOE_MODEL", raising=False)
    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path))
    assert api.default_model_path() == api.SHIPPED_MODEL  # `make demo-full`'s, ahead of a short demo run
    monkeypatch.setattr(api, "SHIPPED_MODEL", tmp_path / "not-installed")
    r = runner.invoke(app, ["infer", str(tmp_path)])
    assert r.exit_code == 2
    r = runner.invoke(app, ["infer", __file__])
    assert r.exit_code == 2 and "make demo" in r.output and "Traceback" not in r.output


def test_srt_timestamps():
    from steermoe_core.inference import Result, Segment

    srt = to_srt(Result("x", segments=[Segment(0, 28.0826, "a"), Segment(28.0826, 3725.5, "b")]))
    assert srt == "1\n00:00:00,000 --> 00:00:28,083\na\n\n2\n00:00:28,083 --> 01:02:05,500\nb\n\n"
