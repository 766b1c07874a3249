"""load_audio: every format to float32 mono 16 kHz, and a one-line error for every bad file."""

import numpy as np
import pytest
import soundfile as sf

from steermoe_core.audio.load import AudioError, ffmpeg_binary, load_audio


def speechlike(seconds=1.0, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2 + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_with_ffmpeg(src_wav, dst):
    import subprocess

    subprocess.run([ffmpeg_binary(), "-y", "-loglevel", "error", "-i", str(src_wav), str(dst)], check=True)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_formats_decode_to_16k_mono(tmp_path, fmt):
    audio = speechlike(1.0, 44100)
    stereo = np.stack([audio, audio], axis=1)
    src = tmp_path / "src.wav"
    sf.write(src, stereo, 44100, subtype="PCM_16")
    path = tmp_path / f"clip.{fmt}"
    write_with_ffmpeg(src, path)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) < 1200  # mp3/aac add codec padding of a few ms
    # the tone's energy survives resampling and lossy codecs
    assert 0.05 < float(np.sqrt(np.mean(out**2))) < 0.5


def test_16k_wav_is_read_exactly(tmp_path):
    audio = speechlike(0.5)
    sf.write(tmp_path / "a.wav", audio, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), audio)


def test_bad_files_get_one_line_errors(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.mp3").write_text("this is not audio at all\n" * 20)
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    good = tmp_path / "good.flac"
    sf.write(good, speechlike(2.0), 16000, subtype="PCM_16")
    (tmp_path / "trunc.flac").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {
        "missing.wav": "no such file", "empty.wav": "empty file", "text.mp3": "not audio",
        "silent.wav": "silent", "zero.wav": "", "trunc.flac": "",
    }
    for name, words in cases.items():
        with pytest.raises(AudioError) as e:
            load_audio(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and words in msg and "\n" not in msg, msg
