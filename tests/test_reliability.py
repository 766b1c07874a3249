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
