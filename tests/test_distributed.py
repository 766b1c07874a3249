"""`steermoe train --gpus N` with train.device = cpu: N gloo processes under torch.distributed.run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict

from steermoe_core.config import recipe_from_dict
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.training.loop import train

ROOT = Path(__file__).resolve().parent.parent


def _sets(backbones, data, **train_kw) -> list[str]:
    d = {"model.encoder.path": backbones["whisper"], "model.llm.path": backbones["llm"], "data.train": data,
         "data.valid": data, "model.steering.num_experts": 4, "train.max_steps": 12, "train.save_every": 6,
         "train.log_every": 6, "train.device": "cpu", "train.precision": "fp32", "data.batch_size": 4, "eval.max_new_tokens": 6, **train_kw}
    return [x for k, v in d.items() for x in ("--set", f"{k}={v}")]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "steermoe_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_trains(backbones, tiny_data, tmp_path):
    """Same global batches, gradients averaged by DDP: the adapter matches a one-process run; only
    rank 0 writes; meta.json records engine and world size; resume works with a different N."""
    recipe = str(ROOT / "recipes" / "tiny_random.toml")
    r = _cli("train", recipe, "--gpus", "2", "--out", str(tmp_path / "two"), *_sets(backbones, tiny_data), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "two" / "model" / "meta.json").read_text())
    assert meta["engine"] == "ddp" and meta["world_size"] == 2
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [6, 12]  # one writer: no duplicated lines
    assert lines[-1]["valid_examples"] == 4  # validation sharded over both ranks, gathered

    d = tiny_recipe_dict(backbones, tiny_data)
    d["train"].update(max_steps=12, save_every=6, log_every=6)
    d["eval"]["max_new_tokens"] = 6
    one = train(recipe_from_dict(d), tmp_path / "one")
    a = load_checkpoint(one.model_dir)[0].adapter_state_dict()
    b = load_checkpoint(tmp_path / "two" / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=2e-3, msg=k)

    # a run started with 2 processes, resumed by 1: the data position is in global batches
    import shutil

    shutil.rmtree(tmp_path / "two" / "model")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000012")
    (tmp_path / "two" / "checkpoints" / "latest").write_text("step-0000006")
    r = _cli("train", recipe, "--out", str(tmp_path / "two"), "--resume", *_sets(backbones, tiny_data), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = load_checkpoint(tmp_path / "two" / "model")[0].adapter_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=2e-4, rtol=2e-3, msg=k)


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    r = _cli("train", str(ROOT / "recipes" / "librispeech_whisper_qwen7b.toml"), "--gpus", "4", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "processes: 4" in r.stdout and "per process" in r.stdout


def test_global_batch_must_divide_by_the_processes(tmp_path):
    r = _cli("train", str(ROOT / "recipes" / "tiny_random.toml"), "--gpus", "3", "--set", "train.device=cpu", cwd=tmp_path)
    assert r.returncode == 2 and "must divide by the 3 processes" in r.stderr


def test_one_node_launches_on_a_free_port_unless_told_otherwise():
    """Two runs on one machine must not meet on torchrun's default port 29500."""
    from steermoe_cli.launch import torchrun_args

    one = torchrun_args(["train", "r.toml"], 2)
    assert one[:2] == ["--standalone", "--nproc-per-node=2"] and not any(a.startswith("--master-port") for a in one)
    assert "--master-port=29600" in torchrun_args(["train", "r.toml"], 2, master_port=29600)
    multi = torchrun_args(["train", "r.toml"], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1")
    assert "--master-port=29500" in multi and "--master-addr=10.0.0.1" in multi and "--standalone" not in multi
