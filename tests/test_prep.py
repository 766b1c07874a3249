"""`steermoe prep`: each corpus's real layout in, the prepared layout out, every bad input listed."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.audio.load import ffmpeg_binary
from steermoe_core.data.dataset import ShardedDataset

runner = CliRunner()


def clip(seed, seconds=0.6, sr=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.02 * rng.standard_normal(len(t))
    return (np.round(x * 32768) / 32768).astype(np.float32)  # exactly representable at 16 bit


def prep(*args):
    return runner.invoke(app, ["prep", *map(str, args)])


def read_back(folder):
    rows = {}
    for shard in sorted(folder.glob("*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            audio, sr = sf.read(__import__("io").BytesIO(r["audio"]), dtype="float32")
            assert sr == 16000
            rows[r["id"]] = (audio, r)
    return rows


@pytest.fixture()
def librispeech_tree(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    texts = {}
    for spk, ch in [("84", "121123"), ("174", "50561")]:
        d = root / spk / ch
        d.mkdir(parents=True)
        lines = []
        for k in range(3):
            uid = f"{spk}-{ch}-{k:04d}"
            sf.write(d / f"{uid}.flac", clip(int(spk) + k), 16000, subtype="PCM_16")
            lines.append(f"{uid} WORDS FOR {uid}")
            texts[uid] = f"WORDS FOR {uid}"
        (d / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    d = root / "84" / "121123"
    (d / "84-121123-0001.flac").write_bytes(b"\x00garbage not flac")  # corrupt
    (d / "84-121123-0002.flac").write_bytes(b"")  # empty
    with open(d / "84-121123.trans.txt", "a") as f:
        f.write("84-121123-0009 A LINE WITH NO AUDIO\n")
    sf.write(d / "84-121123-0077.flac", clip(77), 16000, subtype="PCM_16")  # audio with no transcript
    return tmp_path / "LibriSpeech", texts


def test_librispeech_roundtrip_and_skips(librispeech_tree, tmp_path):
    src, texts = librispeech_tree
    out = tmp_path / "prepared"
    r = prep("librispeech", src, "--out", out, "--subset", "dev-clean", "--shard-size", "2", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "4 input(s) skipped" in r.output
    rows = read_back(out)
    good = {"84-121123-0000", "174-50561-0000", "174-50561-0001", "174-50561-0002"}
    assert set(rows) == good
    for uid in good:
        audio, row = rows[uid]
        spk, _, k = uid.split("-")
        np.testing.assert_array_equal(audio, clip(int(spk) + int(k)))  # FLAC is lossless at 16 bit
        assert row["text"] == texts[uid] and row["language"] == "en"
        assert row["duration"] == pytest.approx(0.6)
    m = json.loads((out / "manifest.json").read_text())
    assert m["examples"] == 4 and m["source"] == "librispeech" and m["split"] == "dev-clean"
    assert m["hours"] == pytest.approx(4 * 0.6 / 3600, rel=1e-3)
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"84-121123-0001", "84-121123-0002", "84-121123-0009", "84-121123-0077"}
    assert "empty file" in reasons["84-121123-0002"]
    assert "without audio" in reasons["84-121123-0009"] and "without transcript" in reasons["84-121123-0077"]
    assert len(m["skipped"]) == 4
    # the core's reader takes it as is
    ds = ShardedDataset(out)
    assert len(ds) == 4 and ds[0].audio.dtype == np.float32


def test_rerun_is_byte_identical_and_resume_keeps_shards(librispeech_tree, tmp_path):
    src, _ = librispeech_tree
    a, b = tmp_path / "a", tmp_path / "b"
    assert prep("librispeech", src, "--out", a, "--shard-size", "2", "--workers", "1").exit_code == 0
    assert prep("librispeech", src, "--out", b, "--shard-size", "2", "--workers", "2").exit_code == 0
    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names == sorted(p.name for p in b.glob("*.parquet")) and len(names) == 3  # 6 inputs, 2 a shard
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    # a half-finished run: one shard gone, the manifest gone; --resume redoes only that shard
    (a / names[1]).unlink()
    (a / "manifest.json").unlink()
    kept = (a / names[0]).stat().st_mtime_ns
    assert prep("librispeech", src, "--out", a, "--shard-size", "2", "--resume").exit_code == 0
    assert (a / names[0]).stat().st_mtime_ns == kept
    assert (a / names[1]).read_bytes() == (b / names[1]).read_bytes()
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())


def test_strict_fails_when_anything_was_skipped(librispeech_tree, tmp_path):
    src, _ = librispeech_tree
    r = prep("librispeech", src, "--out", tmp_path / "s", "--strict")
    assert r.exit_code == 2 and "--strict" in r.output


def test_aishell_layout(tmp_path):
    src = tmp_path / "aishell"
    lines = []
    for split, spk in [("train", "S0002"), ("dev", "S0724"), ("test", "S0764")]:
        d = src / "wav" / split / spk
        d.mkdir(parents=True)
        for k in range(2):
            uid = f"BAC009{spk}W{k:04d}"
            sf.write(d / f"{uid}.wav", clip(k + len(split)), 16000, subtype="PCM_16")
            lines.append(f"{uid} 而 对 楼市 成交 抑制 作用 最 大 的")
    (src / "wav" / "train" / "S0002" / "BAC009S0002W0099.wav").write_bytes(b"RIFF")  # no transcript, corrupt
    (src / "transcript").mkdir()
    (src / "transcript" / "aishell_transcript_v0.8.txt").write_text("\n".join(lines + ["BAC009S0002W0500 没有 音频"]) + "\n")
    out = tmp_path / "out"
    r = prep("aishell", src, "--out", out)
    assert r.exit_code == 0, r.output
    for split in ("train", "dev", "test"):
        rows = read_back(out / split)
        assert len(rows) == 2
        assert all(row["text"] == "而对楼市成交抑制作用最大的" and row["language"] == "zh" for _, row in rows.values())
    skipped = json.loads((out / "train" / "manifest.json").read_text())["skipped"]
    assert {s["id"] for s in skipped} == {"BAC009S0002W0099", "BAC009S0002W0500"}


def test_clothoaqa_keeps_every_answer(tmp_path):
    src = tmp_path / "clotho"
    (src / "audio_files").mkdir(parents=True)
    sf.write(src / "audio_files" / "birds.wav", clip(1, 1.0), 16000, subtype="PCM_16")
    sf.write(src / "audio_files" / "rain.wav", clip(2, 1.0), 16000, subtype="PCM_16")
    csv = "file_name,QuestionText,answer,confidence\n"
    for ans, conf in [("yes", "yes"), ("yes", "maybe"), ("no", "yes")]:
        csv += f"birds.wav,Are birds singing?,{ans},{conf}\n"
    for ans in ["rain", "rain", "water"]:
        csv += f"rain.wav,What is falling?,{ans},yes\n"
    csv += "gone.wav,Is it loud?,yes,yes\n"
    (src / "clotho_aqa_train.csv").write_text(csv)
    out = tmp_path / "out"
    r = prep("clothoaqa", src, "--out", out)
    assert r.exit_code == 0, r.output
    rows = read_back(out / "train")
    by_q = {row["prompt"]: row for _, row in rows.values()}
    assert by_q["Are birds singing?"]["text"] == "yes" and by_q["What is falling?"]["text"] == "rain"
    answers = json.loads(by_q["Are birds singing?"]["extra"])["answers"]
    assert answers == [{"answer": "yes", "confidence": "yes"}, {"answer": "yes", "confidence": "maybe"}, {"answer": "no", "confidence": "yes"}]
    skipped = json.loads((out / "train" / "manifest.json").read_text())["skipped"]
    assert len(skipped) == 1 and "gone.wav" in skipped[0]["input"]


def test_folder_of_mixed_formats_and_a_manifest(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    for k, fmt in enumerate(["wav", "flac", "ogg", "mp3"]):
        wav = tmp_path / f"tmp{k}.wav"
        sf.write(wav, clip(k, 1.0, 22050), 22050, subtype="PCM_16")
        subprocess.run([ffmpeg_binary(), "-y", "-v", "error", "-i", str(wav), str(src / f"u{k}.{fmt}")], check=True)
        (src / f"u{k}.txt").write_text(f"utterance {k}\n")
    (src / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (src / "broken.txt").write_text("broken\n")
    (src / "orphan.txt").write_text("no audio here\n")
    out = tmp_path / "out"
    r = prep("folder", src, "--out", out)
    assert r.exit_code == 0, r.output
    rows = read_back(out)
    assert sorted(rows) == ["u0", "u1", "u2", "u3"]
    for uid, (audio, row) in rows.items():
        assert abs(len(audio) - 16000) < 1200 and row["text"] == f"utterance {uid[1]}"
    skipped = {s["id"]: s["reason"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert set(skipped) == {"broken", "orphan"}
    # the same clips through a jsonl manifest with prompts
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(json.dumps({"path": str(src / f"u{k}.wav"), "text": "t", "prompt": "Q?"}) for k in range(1)) + "\n")
    r = prep("folder", man, "--out", tmp_path / "out2")
    assert r.exit_code == 0, r.output
    ((audio, row),) = read_back(tmp_path / "out2").values()
    assert row["prompt"] == "Q?"


def test_synth_makes_speech_with_several_voices(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("hello there\nthe cat sat on the mat\n\n")
    out = tmp_path / "out"
    r = prep("synth", texts, "--out", out, "--voice", "flite:slt", "--voice", "espeak:en-us", "--copies", "2")
    assert r.exit_code == 0, r.output
    rows = read_back(out)
    assert len(rows) == 4
    assert {row["text"] for _, row in rows.values()} == {"hello there", "the cat sat on the mat"}
    assert all(0.3 < row["duration"] < 5 for _, row in rows.values())
    said = {(row["text"], json.loads(row["extra"])["voice"]) for _, row in rows.values()}  # each line in both voices
    assert said == {(t, v) for t in ("hello there", "the cat sat on the mat") for v in ("flite:slt", "espeak:en-us")}


def test_missing_source_is_one_line(tmp_path):
    r = prep("aishell", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "aishell_transcript_v0.8.txt: missing" in r.output and "Traceback" not in r.output


def test_folder_with_two_files_of_one_stem_keeps_both(tmp_path):
    src = tmp_path / "dup"
    src.mkdir()
    sf.write(src / "trunc.flac", clip(1), 16000)
    subprocess.run([ffmpeg_binary(), "-y", "-v", "error", "-i", str(src / "trunc.flac"), str(src / "trunc.mp3")], check=True)
    (src / "trunc.txt").write_text("same words\n")
    r = prep("folder", src, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert sorted(read_back(tmp_path / "out")) == ["trunc.flac", "trunc.mp3"]


def test_folder_where_every_input_is_bad_fails_and_names_them(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (src / "a.txt").write_text("a\n")
    (src / "b.wav").write_bytes(b"")
    (src / "b.txt").write_text("b\n")
    r = prep("folder", src, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "a.wav" in r.output and "b.wav" in r.output and "no usable input" in r.output


def test_the_large_set_can_start_at_a_later_shard_and_fill_in_earlier_ones_later(tmp_path):
    """tools/synth_corpus.py --first-shard: a machine that lost the set synthesises sentences it never
    trained on first; a later run from shard 0 keeps that shard and makes the ones before it."""
    from steermoe_core.data.prep.corpus import plan, synthesise_chunks

    items = plan([f"Sentence number {w} is here." for w in ("one", "two", "three", "four")], robotic_fraction=1.0)
    m = synthesise_chunks(items, tmp_path, chunk=2, first=1, log=lambda line: None)
    assert list(m["shards"]) == ["shard-00001.parquet"] and m["examples"] == 2
    made = (tmp_path / "shard-00001.parquet").stat().st_mtime_ns
    lines = []
    m = synthesise_chunks(items, tmp_path, chunk=2, log=lines.append)
    assert list(m["shards"]) == ["shard-00000.parquet", "shard-00001.parquet"] and m["examples"] == 4
    assert [json.loads(ln)["shard"] for ln in lines] == ["shard-00000.parquet"]  # shard 1 was kept, not redone
    assert (tmp_path / "shard-00001.parquet").stat().st_mtime_ns == made
    # a new plan (other voices) from shard 1 on: shard 0, made by the old plan, stays listed and is not redone
    other = plan([f"Sentence number {w} is here." for w in ("one", "two", "three", "four")], robotic_fraction=1.0, seed=5)
    assert other[0].extra != items[0].extra
    lines = []
    m = synthesise_chunks(other, tmp_path, chunk=2, first=1, log=lines.append)
    assert list(m["shards"]) == ["shard-00000.parquet", "shard-00001.parquet"] and m["examples"] == 4
    assert [json.loads(ln)["shard"] for ln in lines] == ["shard-00001.parquet"]


def test_the_large_set_is_the_same_made_by_two_workers(tmp_path):
    """tools/synth_corpus.py --workers 2 makes two shards at once: the same shards, clips and manifest as one."""
    import pyarrow.parquet as pq

    from steermoe_core.data.prep.corpus import plan, synthesise_chunks

    items = plan([f"Sentence number {w} is here." for w in ("one", "two", "three", "four", "five")], robotic_fraction=1.0)
    one = synthesise_chunks(items, tmp_path / "one", chunk=2, log=lambda line: None)
    lines = []
    two = synthesise_chunks(items, tmp_path / "two", chunk=2, workers=2, log=lines.append)
    assert sorted(json.loads(ln)["shard"] for ln in lines) == list(two["shards"]) == list(one["shards"])
    assert two["shards"] == one["shards"] and two["examples"] == 5
    for name in one["shards"]:
        a, b = (pq.read_table(tmp_path / d / name, columns=["id", "text"]).to_pylist() for d in ("one", "two"))
        assert a == b


def test_recorded_speech_keeps_spoken_prompts_and_cuts_the_sonnet_at_its_alignment(tmp_path):
    """tools/recorded_speech.py: of Asterisk's prompt list only sentences of 4-40 words with a recording
    (no tones, no silences), evenly spaced when fewer are asked for; the sonnet in clips of two lines."""
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("recorded_speech", Path(__file__).parent.parent / "tools" / "recorded_speech.py")
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)
    text = tmp_path / rs.ASTERISK_TEXT
    text.parent.mkdir(parents=True)
    lines = ["; Core Asterisk Sounds in English", "beep: [this is a simple beep tone]", "silence/5: (5 seconds of silence)",
             "added: Added.", "no-audio: This one has no recording at all.", "", *(f"p{k}: Please hold, caller number {k} is next." for k in range(6))]
    text.write_bytes(gzip.compress("\n".join(lines).encode()))
    audio = tmp_path / rs.ASTERISK_AUDIO
    (audio / "silence").mkdir(parents=True)
    for name in ["beep", "silence/5", "added", *(f"p{k}" for k in range(6))]:
        (audio / f"{name}.wav").write_bytes(b"")
    assert [(w.name, t) for w, t in rs.asterisk_prompts(tmp_path, 0)] == [(f"p{k}.wav", f"Please hold, caller number {k} is next.") for k in range(6)]
    assert [w.name for w, _ in rs.asterisk_prompts(tmp_path, 3)] == ["p0.wav", "p2.wav", "p4.wav"]
    frags = [{"begin": f"{2.0 * k:.3f}", "end": f"{2.0 * k + 2:.3f}", "lines": [line]} for k, line in enumerate(["1", "a b", "c d", "e f"])]
    (tmp_path / "sonnet.json").write_text(json.dumps({"fragments": frags}))
    assert rs.sonnet_lines(tmp_path) == [(2.0, 6.0, "a b c d"), (6.0, 8.0, "e f")]
