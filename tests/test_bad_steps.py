"""A NaN/inf loss on any process skips the step on all of them; too many stop the run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict

from steermoe_core.config import recipe_from_dict
from steermoe_core.errors import TrainingError
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.training.loop import Callbacks, train

ROOT = Path(__file__).resolve().parent.parent

# Runs under torch.distributed.run: the forward of rank NAN_RANK returns a NaN loss at the calls in NAN_CALLS.
POISON = """
import os, sys
from steermoe_core.model.steermoe import SteerMoEModel
real, calls = SteerMoEModel.forward, [0]
def forward(self, batch):
    out = real(self, batch)
    calls[0] += 1
    if os.environ["RANK"] == os.environ["NAN_RANK"] and calls[0] in {int(x) for x in os.environ["NAN_CALLS"].split(",")}:
        out["loss"] = out["loss"] * float("nan")
    return out
SteerMoEModel.forward = forward
from steermoe_cli.main import app
sys.argv = ["steermoe", *sys.argv[1:]]
app()
"""


def _poison(monkeypatch, calls: set[int]) -> None:
    real, n = SteerMoEModel.forward, [0]

    def forward(self, batch):
        out = real(self, batch)
        n[0] += 1
        if n[0] in calls:
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(SteerMoEModel, "forward", forward)


def _recipe(backbones, tiny_data, **train_kw):
    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"].update(valid="", batch_size=2)
    d["train"].update(max_steps=4, log_every=1, **train_kw)
    return recipe_from_dict(d)


def _watch(monkeypatch) -> tuple[Callbacks, dict]:
    """Callbacks snapshotting the adapter and the optimizer's step counts after step 1 and at a skip."""
    from steermoe_core.training import loop

    seen: dict = {}
    real_model, real_opt = loop._model_for_run, loop.make_optimizer

    def model_for_run(*a):
        seen["model"] = real_model(*a)
        return seen["model"]

    def make_optimizer(*a):
        seen["opt"] = real_opt(*a)
        return seen["opt"]

    monkeypatch.setattr(loop, "_model_for_run", model_for_run)
    monkeypatch.setattr(loop, "make_optimizer", make_optimizer)

    def snapshot(name: str) -> None:
        seen[name] = ({k: v.detach().clone() for k, v in seen["model"].adapter_state_dict().items()},
                      sorted(float(s["step"]) for s in seen["opt"].state.values()))

    return Callbacks(on_step=lambda rec: rec["step"] == 1 and snapshot("step1"), on_skip=lambda rec: snapshot("skip")), seen


def test_a_nonfinite_loss_skips_the_step_and_is_logged_with_its_batch(backbones, tiny_data, tmp_path, monkeypatch):
    clean = train(_recipe(backbones, tiny_data), tmp_path / "clean")
    _poison(monkeypatch, {2})
    callbacks, seen = _watch(monkeypatch)
    run = train(_recipe(backbones, tiny_data), tmp_path / "bad", callbacks=callbacks)
    # the skipped step (right after step 1) left every weight and the optimizer's step count as they were
    (w1, steps1), (w_skip, steps_skip) = seen["step1"], seen["skip"]
    assert steps1 and set(steps1) == {1.0} and steps_skip == steps1
    assert w1.keys() == w_skip.keys() and all(torch.equal(w1[k], w_skip[k]) for k in w1)
    skipped = [h for h in run.history if "skipped" in h]
    assert len(skipped) == 1 and skipped[0]["step"] == 1 and len(skipped[0]["batch_ids"]) == 2
    assert all(x.startswith("utt") for x in skipped[0]["batch_ids"])
    assert [h["step"] for h in run.history if "loss" in h] == [1, 2, 3, 4]  # 4 real steps still happen
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run.history if "loss" in h)
    # step 1 is the same in both runs (the skipped batch changed nothing); later steps saw other batches
    assert run.history[0]["loss"] == clean.history[0]["loss"]
    w = load_checkpoint(run.model_dir)[0].adapter_state_dict()
    assert all(torch.isfinite(v).all() for v in w.values())
    lines = [json.loads(x) for x in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert any("skipped" in x for x in lines)


def test_too_many_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(backbones, tiny_data, tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 5})
    with pytest.raises(TrainingError, match=r"2 steps had a NaN/inf loss \(train.max_bad_steps = 2\).*step-0000002"):
        train(_recipe(backbones, tiny_data, max_bad_steps=2, save_every=2), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_a_nan_on_one_of_two_processes_skips_the_step_on_both(backbones, tiny_data, tmp_path, engine):
    """Rank 1 alone sees a NaN: both ranks skip that step (no hang, no NaN in the weights), and the
    log names the batch ids of both ranks. DeepSpeed at ZeRO-2 skips it through its overflow check."""
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the [deepspeed] extra is not installed")
    sets = {"distributed.engine": engine, **({"distributed.zero_stage": 2} if engine == "deepspeed" else {}),"model.encoder.path": backbones["whisper"], "model.llm.path": backbones["llm"], "data.train": tiny_data,
            "data.valid": "", "train.max_steps": 3, "train.log_every": 1, "train.device": "cpu", "train.precision": "fp32",
            "data.batch_size": 4}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NAN_RANK": "1", "NAN_CALLS": "2"}
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                        "train", str(ROOT / "recipes" / "tiny_random.toml"), "--out", str(tmp_path / "run"), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if "skipped" in x]
    assert len(skipped) == 1 and len(skipped[0]["batch_ids"]) == 4  # 2 per rank, gathered
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    w = load_checkpoint(tmp_path / "run" / "model")[0].adapter_state_dict()
    assert all(torch.isfinite(v).all() for v in w.values())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the [deepspeed] extra is not installed")
def test_zero_skips_a_nonfinite_step_through_its_overflow_check(backbones, tiny_data, tmp_path, monkeypatch):
    """ZeRO-2 in one process: DeepSpeed's own overflow check drops the step; the run goes on finite."""
    _poison(monkeypatch, {2})
    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"].update(valid="", batch_size=2)
    d["train"].update(max_steps=3, log_every=1)
    d["distributed"] = {"engine": "deepspeed", "zero_stage": 2}
    run = train(recipe_from_dict(d), tmp_path / "run")
    assert [h["step"] for h in run.history if "skipped" in h] == [1]
    assert [h["step"] for h in run.history if "loss" in h] == [1, 2, 3]
    w = load_checkpoint(run.model_dir)[0].adapter_state_dict()
    assert all(torch.isfinite(v).all() for v in w.values())


def test_a_zero_step_taken_on_a_nonfinite_loss_stops_the_run():
    """Skipping at ZeRO 1-3 is DeepSpeed's overflow check: if it ever stepped anyway, stop, loudly."""
    from types import SimpleNamespace

    from steermoe_core.training.deepspeed_strategy import DeepSpeedStrategy

    s = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    s.stage = 2
    s.engine = SimpleNamespace(step=lambda: None, get_global_grad_norm=lambda: 1.0, optimizer=SimpleNamespace(overflow=False))
    with pytest.raises(RuntimeError, match="DeepSpeed stepped on a non-finite loss"):
        s.optimizer_step(None, 1.0, skip=True)
    s.engine.optimizer.overflow = True
    assert s.optimizer_step(None, 1.0, skip=True).isnan()
