"""`[distributed] engine = "deepspeed"`: 2 CPU processes over gloo train what DDP trains."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict
from test_distributed import ROOT, _cli, _sets

from steermoe_core.config import recipe_from_dict
from steermoe_core.errors import CheckpointError, UsageError
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.training.loop import train

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the [deepspeed] extra is not installed")


def _losses(run: Path) -> list[float]:
    return [x["loss"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def _run_sets(backbones, tiny_data, **kw) -> list[str]:
    return _sets(backbones, tiny_data, **{"data.valid": "", "train.max_steps": 6, "train.log_every": 1, "train.save_every": 3, **kw})


@pytest.fixture(scope="module")
def reference_runs(backbones, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The same 6 steps in one plain process and in 2 DDP processes."""
    tmp = tmp_path_factory.mktemp("reference")
    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"]["valid"] = ""
    d["train"].update(max_steps=6, log_every=1, save_every=3)
    train(recipe_from_dict(d), tmp / "one")
    r = _cli("train", str(ROOT / "recipes" / "tiny_random.toml"), "--gpus", "2", "--out", str(tmp / "ddp"),
             *_run_sets(backbones, tiny_data), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"one": tmp / "one", "ddp": tmp / "ddp"}


@pytest.mark.slow
def test_two_ddp_processes_end_where_one_process_ends(reference_runs):
    """Issue 12's bar for DDP: 2 gloo processes with global batch B leave the adapter one process
    with batch B leaves, within 1e-5 (6 AdamW steps, fp32)."""
    a = load_checkpoint(reference_runs["one"] / "model")[0].adapter_state_dict()
    b = load_checkpoint(reference_runs["ddp"] / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_with_zero_match_ddp(backbones, tiny_data, tmp_path, stage, reference_runs):
    """ZeRO-2 (optimizer and gradient partitions) and ZeRO-3 (parameters too, frozen LLM included):
    the loss curve of 2 DDP processes and the final adapter of one plain process; the checkpoint
    keeps our format and DeepSpeed's state holds no frozen weights; a run resumed from its middle
    ends where the uninterrupted one did."""
    run = tmp_path / "ds"
    sets = _run_sets(backbones, tiny_data, **{"distributed.engine": "deepspeed", "distributed.zero_stage": stage})
    r = _cli("train", str(ROOT / "recipes" / "tiny_random.toml"), "--gpus", "2", "--out", str(run), *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(reference_runs["ddp"])), atol=1e-5, rtol=1e-5)
    one = reference_runs["one"]
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["world_size"] == 2
    a = load_checkpoint(one / "model")[0].adapter_state_dict()
    b = load_checkpoint(run / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    ds_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "step-0000003" / "deepspeed").rglob("*.pt"))
    assert ds_bytes < 1_000_000  # adapter + its Adam moments per rank; the backbones are not in it

    # resume from step 3 with the same two processes: ends with the uninterrupted run's weights
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    (run / "checkpoints" / "latest").write_text("step-0000003")
    r = _cli("train", str(ROOT / "recipes" / "tiny_random.toml"), "--gpus", "2", "--out", str(run), "--resume", *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = load_checkpoint(run / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=1e-5, rtol=1e-4, msg=k)


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    from steermoe_core.training.engines import check_engine_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'steermoe\[deepspeed\]'"):
        check_engine_available("deepspeed")
    check_engine_available("ddp")


# -- one process, in this process: what a resume may and may not mix ------------------------------
def _one_process_recipe(backbones, tiny_data, **distributed):
    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"]["valid"] = ""
    d["train"].update(max_steps=2, log_every=1, save_every=1)
    d["distributed"] = distributed
    return recipe_from_dict(d)


def _rewind_to_step_1(run: Path) -> None:
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-0000002")
    (run / "checkpoints" / "latest").write_text("step-0000001")


@pytest.fixture(scope="module")
def zero2_run(backbones, tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero2") / "run"
    train(_one_process_recipe(backbones, tiny_data, engine="deepspeed", zero_stage=2), run)
    return run


@needs_deepspeed
def test_a_deepspeed_checkpoint_resumed_without_deepspeed_says_so(backbones, tiny_data, zero2_run, tmp_path):
    """train_state.pt has no optimizer state (it is in deepspeed/rank*.pt): a ddp resume must not drop it silently."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    _rewind_to_step_1(run)
    with pytest.raises(CheckpointError, match=r"written by the deepspeed engine; resume with distributed.engine = 'deepspeed'"):
        train(_one_process_recipe(backbones, tiny_data), run, resume=True)


@needs_deepspeed
def test_a_zero_checkpoint_resumes_from_its_own_files_with_weights_only(backbones, tiny_data, zero2_run, tmp_path):
    """The optimizer state comes back from deepspeed/rank0.pt (torch.load(weights_only=True)): the
    resumed run ends on the uninterrupted run's weights."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    assert sorted(p.name for p in (run / "checkpoints" / "step-0000001" / "deepspeed").iterdir()) == ["rank0.pt"]
    _rewind_to_step_1(run)
    train(_one_process_recipe(backbones, tiny_data, engine="deepspeed", zero_stage=2), run, resume=True)
    a = load_checkpoint(zero2_run / "model")[0].adapter_state_dict()
    b = load_checkpoint(run / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


@needs_deepspeed
def test_a_ddp_checkpoint_resumed_under_zero_says_so(backbones, tiny_data, tmp_path):
    """ZeRO flattens the optimizer at initialize: Adam state from train_state.pt cannot go in, and
    must not be dropped silently. ZeRO stage 0 keeps our optimizer and reads it."""
    run = tmp_path / "run"
    train(_one_process_recipe(backbones, tiny_data), run)
    _rewind_to_step_1(run)
    with pytest.raises(CheckpointError, match=r"written by the ddp engine; resume with distributed.engine = 'ddp'"):
        train(_one_process_recipe(backbones, tiny_data, engine="deepspeed", zero_stage=1), run, resume=True)
    train(_one_process_recipe(backbones, tiny_data, engine="deepspeed", zero_stage=0), run, resume=True)
    assert json.loads((run / "model" / "meta.json").read_text())["step"] == 2


@needs_deepspeed
def test_zero3_records_the_backbones_and_lora_of_a_one_process_run(backbones, tiny_data, tmp_path, monkeypatch):
    """ZeRO-3 partitions the frozen backbones too (empty tensors outside forward, here for every
    tensor: persistence threshold 0): meta.json's fingerprints and parameter counts are measured
    before that, and every trainable weight (LoRA included) is gathered whole for the checkpoint."""
    from steermoe_core.training import deepspeed_strategy

    real = deepspeed_strategy.deepspeed_config

    def no_persistent_params(*a):
        cfg = real(*a)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return cfg

    monkeypatch.setattr(deepspeed_strategy, "deepspeed_config", no_persistent_params)

    def recipe(**distributed):
        d = tiny_recipe_dict(backbones, tiny_data)
        d["data"]["valid"] = ""
        d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
        d["train"].update(max_steps=2, log_every=1, save_every=1)
        d["distributed"] = distributed
        return recipe_from_dict(d)

    train(recipe(), tmp_path / "one")
    train(recipe(engine="deepspeed", zero_stage=3), tmp_path / "z3")
    one = json.loads((tmp_path / "one" / "model" / "meta.json").read_text())
    z3 = json.loads((tmp_path / "z3" / "model" / "meta.json").read_text())
    assert z3["backbones"] == one["backbones"]
    assert z3["parameters"] == one["parameters"] and z3["parameters"]["lora_llm"] == 896
    a = load_checkpoint(tmp_path / "one" / "model")[0].adapter_state_dict()
    b = load_checkpoint(tmp_path / "z3" / "model")[0].adapter_state_dict()
    assert any(".lora_B." in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)

    # ZeRO-3's optimizer state (fp32 flat partitions) comes back through the weights-only loader too
    _rewind_to_step_1(tmp_path / "z3")
    train(recipe(engine="deepspeed", zero_stage=3), tmp_path / "z3", resume=True)
    c = load_checkpoint(tmp_path / "z3" / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(b[k], c[k], atol=1e-6, rtol=1e-5, msg=k)


def test_zero3_with_a_validation_set_is_refused_up_front(backbones, tiny_data):
    """Ranks decode their own shares while ZeRO-3 fetches parameters collectively: it would hang."""
    from steermoe_core.errors import RecipeError

    d = tiny_recipe_dict(backbones, tiny_data)
    d["distributed"] = {"engine": "deepspeed", "zero_stage": 3}
    with pytest.raises(RecipeError, match=r"zero_stage = 3: in-run validation is not supported; set data.valid = ''"):
        recipe_from_dict(d)
    d["data"]["valid"] = ""
    recipe_from_dict(d)
