"""`steermoe infer --workers N` / `eval --workers N`: inputs sharded over N CPU processes, one
merged output in input order, identical to what one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from conftest import tone_clip, train_tiny


@pytest.fixture(scope="module")
def ckpt(backbones, tiny_data, tmp_path_factory):
    return train_tiny(backbones, tiny_data, tmp_path_factory.mktemp("par-run"), steps=3)


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "steermoe_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_infer_with_two_workers_writes_what_one_process_writes_and_resumes(ckpt, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(9):
        sf.write(folder / f"c{i}.wav", tone_clip(i % 4, 0.3 + 0.05 * i), 16000, subtype="FLOAT")
    (folder / "c4b.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")  # a bad file in the middle
    common = ["infer", str(folder), "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "5"]
    # one process, json: every record at the end, in input order (its jsonl lines come as files finish)
    one = _cli(*common, "--format", "json", "--out", str(tmp_path / "one.json"), cwd=tmp_path)
    assert one.returncode == 1, one.stderr[-3000:]  # the bad file failed, the rest went on
    common += ["--format", "jsonl"]
    two = _cli(*common, "--out", str(tmp_path / "two.jsonl"), "--workers", "2", cwd=tmp_path)
    assert two.returncode == 1, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), _lines(tmp_path / "two.jsonl")
    assert [(x["path"], x["text"], x["error"]) for x in a] == [(x["path"], x["text"], x["error"]) for x in b]
    assert len(b) == 10 and "10 file(s)" not in two.stderr and "9 file(s) done" in two.stderr and "1 failed" in two.stderr
    assert "real time" in two.stderr and "wall time" in two.stderr
    assert not list(tmp_path.glob("two.jsonl.part*"))  # parts merged and removed

    # an interrupted 2-process run: rank 0 had finished its first two inputs (indices 0 and 2)
    part = tmp_path / "three.jsonl.part0-of-2"
    part.write_text("".join(json.dumps({**a[i], "index": i}) + "\n" for i in (0, 2)) + '{"path": "cut sho')
    three = _cli(*common, "--out", str(tmp_path / "three.jsonl"), "--workers", "2", "--resume", cwd=tmp_path)
    assert three.returncode == 1, three.stderr[-3000:]
    c = _lines(tmp_path / "three.jsonl")
    assert [(x["path"], x["text"]) for x in c] == [(x["path"], x["text"]) for x in a]

    # a killed one-process run resumed with --workers 2: the records already in --out (inputs 3 and 1,
    # marked to see they are not redone; the last line cut short) are kept and merged in input order
    out = tmp_path / "four.jsonl"
    out.write_text("".join(json.dumps({**b[i], "text": f"kept {i}"}) + "\n" for i in (3, 1)) + '{"path": "cut')
    four = _cli(*common, "--out", str(out), "--workers", "2", "--resume", cwd=tmp_path)
    assert four.returncode == 1, four.stderr[-3000:]
    d = _lines(out)
    assert [x["path"] for x in d] == [x["path"] for x in a]
    assert [x["text"] for x in d] == [f"kept {i}" if i in (1, 3) else x["text"] for i, x in enumerate(a)]
    assert not list(tmp_path.glob("*.part*"))


@pytest.mark.slow
def test_eval_with_two_workers_scores_like_one_process(ckpt, tiny_data, tmp_path):
    common = ["eval", str(ckpt), "--data", str(tiny_data), "--device", "cpu", "--json", "--set", "eval.max_new_tokens=5"]
    one = _cli(*common, "--predictions", str(tmp_path / "one.jsonl"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(*common, "--predictions", str(tmp_path / "two.jsonl"), "--workers", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert s1 == s2 and s2["examples"] == 4
    assert _lines(tmp_path / "one.jsonl") == _lines(tmp_path / "two.jsonl")


def test_workers_need_an_output_file_and_a_cpu_device(ckpt, tmp_path):
    """Refused before anything starts, so checked in this process (two interpreter starts saved)."""
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    r = CliRunner().invoke(app, ["infer", str(tmp_path), "--model", str(ckpt), "--workers", "2", "--device", "cpu"])
    assert r.exit_code == 2 and "need --out FILE" in r.output
    r = CliRunner().invoke(app, ["infer", str(tmp_path), "--model", str(ckpt), "--workers", "2", "--out", "x.jsonl"])
    assert r.exit_code == 2 and "--device cpu" in r.output


@pytest.mark.slow
def test_workers_refuse_no_inputs_as_one_process_does(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("infer", str(tmp_path / "empty"), "--model", str(ckpt), "--device", "cpu", "--workers", "2",
             "--out", str(tmp_path / "none.jsonl"), cwd=tmp_path)
    assert r.returncode == 2 and "no audio files found" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "none.jsonl").exists()
