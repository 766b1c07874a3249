"""What a user relies on when things go wrong: one writer per run folder, resume from the newest
complete checkpoint or a clear refusal, prep resume exact or refused, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.config import dump_recipe, recipe_from_dict
from steermoe_core.errors import CheckpointError, UsageError
from steermoe_core.training.loop import Callbacks, train

ROOT = Path(__file__).resolve().parent.parent


def _small(backbones, tiny_data, **train_kw) -> dict:
    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"].update(valid="", batch_size=2)
    d["train"].update({"max_steps": 4, "save_every": 2, "log_every": 1, **train_kw})
    return d


def _recipe_file(tmp_path: Path, d: dict, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(dump_recipe(recipe_from_dict(d)))
    return path


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steermoe_cli", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _wait_for(cond, timeout: float = 120.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


# -- one writer per run folder ------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(backbones, tiny_data, tmp_path):
    """Two `steermoe train` into one --out: the second gets one line naming the first one's pid; after
    kill -9 of the first, the kernel has released the lock and the folder can be taken again."""
    recipe = _recipe_file(tmp_path, _small(backbones, tiny_data, max_steps=100000, save_every=0, log_every=1))
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "steermoe_cli", "train", str(recipe), "--out", str(run)],
                             cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip(), what="first run's steps")
        second = _cli("train", recipe, "--out", run, "--set", "train.lr=0.001", cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        errors = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and str(run) in errors[0], second.stderr
        assert "Traceback" not in second.stderr
        # the second run wrote nothing: the folder's recipe is still the first run's
        assert "lr = 0.001" not in (run / "recipe.toml").read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # a killed holder leaves no stale lock: the next run (replacing it) goes ahead
    third = _cli("train", recipe, "--out", run, "--overwrite", "--set", "train.max_steps=2", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert _steps(run) == [1, 2]


# -- a new run never mixes with an earlier one ----------------------------------------------------------
def test_a_new_run_into_a_finished_run_is_refused_unless_overwrite(backbones, tiny_data, tmp_path):
    d = _small(backbones, tiny_data, max_steps=6)
    run = tmp_path / "run"
    train(recipe_from_dict(d), run)
    model_before = (run / "model" / "adapter.safetensors").read_bytes()
    d["train"]["max_steps"] = 3
    with pytest.raises(UsageError, match=r"holds an earlier run .*step-0000006.*model/.*--resume.*--overwrite"):
        train(recipe_from_dict(d), run)
    assert (run / "model" / "adapter.safetensors").read_bytes() == model_before  # untouched
    result = train(recipe_from_dict(d), run, overwrite=True)
    # the old run is gone entirely: its checkpoints, its metrics; the new one's are all there
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-0000002", "step-0000003"]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000003"
    assert [r["step"] for r in result.history] == [1, 2, 3] and _steps(run) == [1, 2, 3]
    assert json.loads((run / "model" / "meta.json").read_text())["step"] == 3


def test_cli_refuses_without_resume_or_overwrite_and_both_together(backbones, tiny_data, tmp_path):
    d = _small(backbones, tiny_data, max_steps=2)
    recipe = _recipe_file(tmp_path, d)
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(recipe), "--out", str(run)]).exit_code == 0
    r = runner.invoke(app, ["train", str(recipe), "--out", str(run)])
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", str(recipe), "--out", str(run), "--resume", "--overwrite"])
    assert r.exit_code == 2 and "give one of them" in r.output


# -- resume from the newest complete checkpoint, or refuse ---------------------------------------------
def test_resume_passes_over_an_incomplete_checkpoint_and_prunes_by_step(backbones, tiny_data, tmp_path):
    """`latest` names a checkpoint without its train state: --resume starts from the complete one
    before it, says so, and the abandoned folder is pruned (by step, not by name) once passed."""
    d = _small(backbones, tiny_data, max_steps=6)
    full = train(recipe_from_dict(d), tmp_path / "full")

    def kill(path):
        if path.name == "step-0000004":
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(recipe_from_dict(d), run, callbacks=Callbacks(on_save=kill))
    ckpts = run / "checkpoints"
    (ckpts / "step-0000004" / "train_state.pt").unlink()  # as a copy cut short, or a disk that filled
    (ckpts / ".latest.abc123.tmp").write_text("step-0000006")  # a kill during the pointer's write
    seen = {}
    resumed = train(recipe_from_dict(d), run, resume=True, callbacks=Callbacks(on_start=seen.update))
    assert seen["resumed_from"] == str(ckpts / "step-0000002") and seen["start_step"] == 2
    assert seen["passed_over"] == ["step-0000004: no train_state.pt"]
    assert [r["step"] for r in resumed.history] == [3, 4, 5, 6] and _steps(run) == [1, 2, 3, 4, 5, 6]
    assert not list(ckpts.glob(".latest.*.tmp"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000004", "step-0000006"]
    import torch

    from steermoe_core.model.checkpoint import load_checkpoint

    a, b = load_checkpoint(full.model_dir)[0].adapter_state_dict(), load_checkpoint(resumed.model_dir)[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_keep_checkpoints_zero_keeps_every_one_for_a_learning_curve(backbones, tiny_data, tmp_path):
    """train.keep_checkpoints = 0 keeps every checkpoint (scored afterwards as a curve); 1 only the newest."""
    for keep, want in ((0, ["step-0000002", "step-0000004", "step-0000006"]), (1, ["step-0000006"])):
        train(recipe_from_dict(_small(backbones, tiny_data, max_steps=6, keep_checkpoints=keep)), tmp_path / str(keep))
        assert sorted(p.name for p in (tmp_path / str(keep) / "checkpoints").glob("step-*")) == want


def test_resume_refuses_when_no_checkpoint_is_complete(backbones, tiny_data, tmp_path):
    d = _small(backbones, tiny_data, max_steps=4, save_every=0)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(recipe_from_dict(d), run, resume=True)
    train(recipe_from_dict(d), run)
    (run / "checkpoints" / "step-0000004" / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from \(step-0000004: no train_state.pt\).*--overwrite"):
        train(recipe_from_dict(d), run, resume=True)
    assert _steps(run) == [1, 2, 3, 4]  # nothing started over


def test_cli_resume_says_which_checkpoint(backbones, tiny_data, tmp_path):
    d = _small(backbones, tiny_data, max_steps=4)
    recipe = _recipe_file(tmp_path, d)
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(recipe), "--out", str(run), "--set", "train.max_steps=2"]).exit_code == 0
    r = runner.invoke(app, ["train", str(recipe), "--out", str(run), "--resume"])
    assert r.exit_code == 0, r.output
    assert f"resuming from {run / 'checkpoints' / 'step-0000002'} (step 2)" in r.output


# -- one-line errors for what the machine or a foreign file caused ---------------------------------------
def _one_error_line(output: str) -> str:
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [x for x in output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.mark.parametrize("fails", ["torch.save", "safetensors"])
def test_a_full_disk_is_one_line_naming_the_checkpoint_and_resume_works_after(backbones, tiny_data, tmp_path, monkeypatch, fails):
    """The disk fills while the step-4 checkpoint is written: torch.save's zip writer reports it as
    `RuntimeError: ... unexpected pos`, safetensors as OSError ENOSPC. Either way: exit 2, one line
    naming the checkpoint, no temporary left, step 2 intact, and --resume continues from it."""
    import errno

    import safetensors.torch
    import torch

    recipe = _recipe_file(tmp_path, _small(backbones, tiny_data, max_steps=6))
    run = tmp_path / "run"
    calls = [0]
    if fails == "torch.save":
        real = torch.save

        def full(obj, f, *a, **kw):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2880 vs 2772")
            return real(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", full)
    else:
        real = safetensors.torch.save_file

        def full(*a, **kw):
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **kw)

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run)])
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output)
    assert str(run / "checkpoints" / "step-0000004") in line and "no space left on the device" in line
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002"]  # no temporary, no 0-byte file
    monkeypatch.undo()
    r = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--resume"])
    assert r.exit_code == 0 and "(step 2)" in r.output, r.output
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_permission_denied_is_one_line_naming_the_folder(backbones, tiny_data, tmp_path, monkeypatch):
    import errno

    recipe = _recipe_file(tmp_path, _small(backbones, tiny_data, max_steps=2))
    run = tmp_path / "readonly" / "run"
    real = Path.mkdir

    def mkdir(self, *a, **kw):  # as a folder the user may not write to (the tests run as root, who may)
        if self == run:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    r = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run)])
    assert r.exit_code == 2
    assert _one_error_line(r.output) == f"error: {run}: permission denied"


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_foreign_pickle_in_a_checkpoint_is_refused_unloaded(backbones, tiny_data, tmp_path):
    """A train_state.pt that would run code when unpickled: --resume refuses it in one line, never
    runs it, and never suggests weights_only=False."""
    d = _small(backbones, tiny_data, max_steps=2)
    recipe = _recipe_file(tmp_path, d)
    run = tmp_path / "run"
    train(recipe_from_dict(d), run)
    _Payload.marker = tmp_path / "pwned"
    import torch

    torch.save({"step": _Payload()}, run / "checkpoints" / "step-0000002" / "train_state.pt")
    r = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--resume"])
    assert r.exit_code == 2
    line = _one_error_line(r.output)
    assert line == f"error: {run / 'checkpoints' / 'step-0000002' / 'train_state.pt'}: not a steermoe train state; refusing to unpickle it"
    assert "weights_only" not in r.output and not _Payload.marker.exists()


def test_help_states_the_exit_codes():
    r = CliRunner().invoke(app, ["--help"])
    assert "2 bad input or usage" in " ".join(r.output.split())


def _onnx_folder(tmp_path: Path, manifest_patch: dict) -> Path:
    """A hand-made exported folder: a valid (trivial) audio tower, a decoder.onnx cut short."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from steermoe_core.inference.onnx_manifest import FORMAT, FORMAT_VERSION

    folder = tmp_path / "onnx"
    folder.mkdir()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "audio_tower.onnx")
    (folder / "decoder.onnx").write_bytes(b"\x08\x07\x12\x04this is not a protobuf")
    files = {"audio_tower": "audio_tower.onnx", "decoder": "decoder.onnx", "embeddings": "embeddings.npy",
             "mel_filters": "mel_filters.npy", "tokenizer": "tokenizer/tokenizer.json"}
    for name in ("embeddings.npy", "mel_filters.npy", "tokenizer/tokenizer.json"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, "audio": {}, "prompt": {"known": {}},
                "llm": {"max_context": 64, "layers": 1}, "generation": {"stop_ids": [0], "pad_id": 0}}
    manifest.update(manifest_patch)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("patch,expect", [
    ({"files": None}, r"manifest.json: damaged ONNX manifest \(no 'files'\)"),
    ({}, r"decoder.onnx: damaged ONNX graph \(InvalidProtobuf"),
])
def test_a_damaged_onnx_folder_is_one_line_naming_the_file(tmp_path, patch, expect):
    from steermoe_cli.common import user_error_line
    from steermoe_core.inference.onnx_backend import OnnxBackend

    folder = _onnx_folder(tmp_path, patch)
    with pytest.raises(CheckpointError, match=expect) as e:
        OnnxBackend(folder, "cpu")
    assert "\n" not in user_error_line(e.value)


# -- numbers that cannot train ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_recipe_rejects_non_finite_numbers_naming_the_key(backbones, tiny_data, tmp_path, value):
    d = _small(backbones, tiny_data)
    text = dump_recipe(recipe_from_dict(d)).replace("lr = 0.03\n", f"lr = {value}\n")
    assert f"lr = {value}\n" in text
    (tmp_path / "r.toml").write_text(text)
    r = CliRunner().invoke(app, ["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and _one_error_line(r.output).endswith(f"train.lr: {float(value)!r} is not a finite number")
    r = CliRunner().invoke(app, ["train", str(_recipe_file(tmp_path, d)), "--out", str(tmp_path / "run"),
                                 "--set", f"train.clip_grad={value}"])
    assert r.exit_code == 2 and "train.clip_grad:" in _one_error_line(r.output)


def test_the_nan_stop_names_the_learning_rates_when_they_diverged_the_run(backbones, tiny_data, tmp_path):
    from steermoe_core.errors import TrainingError

    d = _small(backbones, tiny_data, max_steps=20, lr=1e30, warmup_steps=1, max_bad_steps=3, save_every=0)
    with pytest.raises(TrainingError, match=r"NaN/inf loss.*the likely cause is a learning rate too high: train.lr = 1e\+30"):
        train(recipe_from_dict(d), tmp_path / "run")


# -- prepared data: resume exact or refused, every bad input listed ------------------------------------
def _tone(path: Path, k: int, seconds: float = 0.5, sr: int = 16000) -> None:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * (200 + 37 * k) * t)).astype(np.float32), sr, subtype="PCM_16")


def _sidecar_folder(root: Path, n: int, sr: int = 16000, seconds: float = 0.5) -> Path:
    root.mkdir(parents=True)
    for k in range(n):
        _tone(root / f"u{k:04d}.wav", k, seconds, sr)
        (root / f"u{k:04d}.txt").write_text(f"words {k}\n")
    return root


def _prep(*args):
    return CliRunner().invoke(app, ["prep", *map(str, args)])


def _ids(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [i for shard in sorted(folder.glob("shard-*.parquet")) for i in pq.read_table(shard, columns=["id"]).column("id").to_pylist()]


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left for its new parent


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_prep_workers_end_with_a_killed_parent_and_resume_is_exact_then_refused_after_a_change(tmp_path):
    """kill -9 of `steermoe prep` mid-run: its pool workers end too (none left orphaned). --resume
    with the same inputs then ends with every id exactly once; after a file is added it refuses,
    naming the new file, instead of keeping shards cut from the old list."""
    src = _sidecar_folder(tmp_path / "src", 240, sr=8000, seconds=4.0)  # resampled: slow enough to catch mid-run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "steermoe_cli", "prep", "folder", str(src), "--out", str(out), "--workers", "2", "--shard-size", "3"]
    parent = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_children(parent.pid)) >= 2 and any(out.glob("shard-*.parquet")), timeout=120, what="two workers")
        workers = _children(parent.pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_for(lambda: not any(_alive(w) for w in workers), timeout=10, what=f"workers {workers} to end")
    finally:
        if parent.poll() is None:
            parent.kill()
    assert not (out / "manifest.json").exists(), "the prep finished before the kill: nothing was tested"
    done_before = len(list(out.glob("shard-*.parquet")))
    r = _cli("prep", "folder", src, "--out", out, "--workers", "2", "--shard-size", "3", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ids = _ids(out)
    assert ids == [f"u{k:04d}" for k in range(240)] and done_before < 80  # each once, in order
    assert json.loads((out / "manifest.json").read_text())["examples"] == 240
    # the inputs change between a kill and the resume: refused, naming what changed
    (out / "shard-00003.parquet").unlink()
    (out / "manifest.json").unlink()
    _tone(src / "u0100b.wav", 999)
    (src / "u0100b.txt").write_text("a new one\n")
    r = _prep("folder", src, "--out", out, "--workers", "1", "--shard-size", "3", "--resume")
    assert r.exit_code == 2
    line = _one_error_line(r.output)
    assert "the inputs changed" in line and "1 added" in line and "u0100b.wav" in line and "fresh --out" in line
    r = _prep("folder", src, "--out", tmp_path / "fresh", "--workers", "1", "--shard-size", "3")
    assert r.exit_code == 0 and len(_ids(tmp_path / "fresh")) == 241 == len(set(_ids(tmp_path / "fresh")))


def test_prep_resume_refuses_a_changed_transcript_and_a_new_shard_size(tmp_path):
    src = _sidecar_folder(tmp_path / "src", 6)
    out = tmp_path / "out"
    assert _prep("folder", src, "--out", out, "--workers", "1", "--shard-size", "2").exit_code == 0
    r = _prep("folder", src, "--out", out, "--workers", "1", "--shard-size", "3", "--resume")
    assert r.exit_code == 2 and "--shard-size was 2, now 3" in _one_error_line(r.output)
    (src / "u0002.txt").write_text("other words\n")
    r = _prep("folder", src, "--out", out, "--workers", "1", "--shard-size", "2", "--resume")
    assert r.exit_code == 2 and f"1 changed ({src / 'u0002.wav'}: text)" in _one_error_line(r.output)
    # without --resume the folder is redone from the inputs as they are now
    assert _prep("folder", src, "--out", out, "--workers", "1", "--shard-size", "2").exit_code == 0
    assert _ids(out) == [f"u{k:04d}" for k in range(6)]


def test_prep_lists_a_transcript_in_another_encoding_and_goes_on_and_strips_a_bom(tmp_path):
    import pyarrow.parquet as pq

    src = _sidecar_folder(tmp_path / "src", 3)
    (src / "u0001.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (src / "u0002.txt").write_bytes("\ufeffhello there\n".encode("utf-8"))
    out = tmp_path / "out"
    r = _prep("folder", src, "--out", out, "--workers", "1")
    assert r.exit_code == 0 and "Traceback" not in r.output
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert skipped == [{"id": "u0001", "input": str(src / "u0001.txt"),
                        "reason": f"{src / 'u0001.txt'}: not UTF-8 text (byte 0xe9 at byte offset 3); UTF-8 expected "
                                  "(re-save it as UTF-8, or give its encoding with --encoding)"}]
    texts = dict(zip(*pq.read_table(out / "shard-00000.parquet", columns=["id", "text"]).to_pydict().values()))
    assert texts == {"u0000": "words 0", "u0002": "hello there"}
    r = _prep("folder", src, "--out", tmp_path / "latin", "--workers", "1", "--encoding", "latin-1")
    texts = dict(zip(*pq.read_table(tmp_path / "latin" / "shard-00000.parquet", columns=["id", "text"]).to_pydict().values()))
    assert r.exit_code == 0 and texts["u0001"] == "caf\u00e9 cr\u00e8me"
    r = _prep("folder", src, "--out", tmp_path / "x", "--encoding", "klingon")
    assert r.exit_code == 2 and "--encoding klingon" in _one_error_line(r.output)


def test_a_manifest_in_another_encoding_is_one_line_naming_it(tmp_path):
    src = _sidecar_folder(tmp_path / "src", 2)
    (src / "manifest.csv").write_bytes("path,text\nu0000.wav,caf\u00e9\nu0001.wav,two\n".encode("latin-1"))
    r = _prep("folder", src, "--out", tmp_path / "out")
    assert r.exit_code == 2
    assert _one_error_line(r.output).startswith(f"error: {src / 'manifest.csv'}: not UTF-8 text (byte 0xe9 at byte offset 23)")
    r = _prep("folder", src, "--out", tmp_path / "out", "--encoding", "latin-1", "--workers", "1")
    assert r.exit_code == 0 and _ids(tmp_path / "out") == ["u0000", "u0001"]


def test_manifest_paths_outside_its_folder_are_listed_not_read(tmp_path):
    src = _sidecar_folder(tmp_path / "src", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _tone(elsewhere / "meet40.wav", 40)
    (src / "manifest.csv").write_text("path,text\nu0000.wav,inside\n../../../../../../etc/passwd,root\n/etc/hostname,host\n"
                                      "../elsewhere/meet40.wav,outside\n")
    out = tmp_path / "out"
    r = _prep("folder", src, "--out", out, "--workers", "1")
    assert r.exit_code == 0 and _ids(out) == ["u0000"]
    reasons = [s["reason"] for s in json.loads((out / "manifest.json").read_text())["skipped"]]
    assert len(reasons) == 3 and all("outside" in x and "--allow-outside" in x for x in reasons)
    r = _prep("folder", src, "--out", tmp_path / "allowed", "--workers", "1", "--allow-outside")
    assert r.exit_code == 0 and "..__elsewhere__meet40" in _ids(tmp_path / "allowed")


def test_a_recipe_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "r.toml").write_bytes('[train]\nlr = 0.01 # caf\u00e9\n'.encode("latin-1"))
    r = CliRunner().invoke(app, ["train", str(tmp_path / "r.toml")])
    assert r.exit_code == 2
    assert _one_error_line(r.output) == f"error: {tmp_path / 'r.toml'}: not UTF-8 text (byte 0xe9 at byte offset 23); UTF-8 expected"


def test_a_synth_sentence_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    texts = tmp_path / "sentences.txt"
    texts.write_bytes("Hello there.\nThe caf\u00e9 opens at nine.\n".encode("latin-1"))
    r = CliRunner().invoke(app, ["prep", "synth", str(texts), "--voice", "flite:kal", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert _one_error_line(r.output) == (f"error: {texts}: not UTF-8 text (byte 0xe9 at byte offset 20); UTF-8 expected "
                                         "(re-save it as UTF-8)")
