"""Shared fixtures: tiny random backbones on disk and a tiny prepared dataset, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `infer` and `serve` default to onnxruntime on a CPU, exporting each checkpoint once (seconds for a tiny
# one, into the user's cache): the suite's many throw-away checkpoints run on torch unless a test asks
# (tests/test_backend_auto.py runs the default end to end, in its own cache)
os.environ.setdefault("STEERMOE_BACKEND", "torch")
# `make test` runs the suite in pytest-xdist workers, one per core (-n 2 on the 2-core CI machine): most tests are
# single-threaded Python (tracing an ONNX export, parsing a GGUF, starting processes), so two run side by side.
# Each worker, and every process a test starts, then keeps to its share of the cores: torch's default (every
# core per process) would oversubscribe them, and OpenMP's spinning threads slow down badly when they are.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from steermoe_core.config import recipe_from_dict  # noqa: E402
from steermoe_core.data.prep.shards import Row, write_manifest, write_shard  # noqa: E402
from steermoe_core.testing.random_backbones import write_llm, write_whisper  # noqa: E402

TEXTS = ["hello world", "good morning", "the quick brown fox", "one two three"]


# The longest modules first, by their time on the 2-core AVX2-only CPU: with --dist loadscope each module runs
# whole on one worker (its module fixtures built once), so the last one handed out should be short.
LONGEST_FIRST = ("test_demo.py", "test_backbone_formats.py", "test_onnx.py", "test_deepspeed.py", "test_parallel_infer_eval.py",
                 "test_benchmarks.py", "test_infer_stream.py", "test_distributed.py", "test_bad_steps.py", "test_lora.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


def tone_clip(idx: int, seconds: float = 1.0) -> np.ndarray:
    """A distinct, deterministic chord per utterance: enough for a tiny model to tell clips apart."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    freqs = [200 + 150 * idx, 900 + 310 * idx, 2500 - 170 * idx]
    wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 4
    return (wave * np.hanning(len(t)) ** 0.1).astype(np.float32)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {"whisper": write_whisper(root / "whisper"), "llm": write_llm(root / "llm", init_std=0.2)}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tones"
    out.mkdir()
    rows = [Row(f"utt{i}", tone_clip(i, 0.8 + 0.3 * i), TEXTS[i]) for i in range(len(TEXTS))]
    info = write_shard(rows, out / "shard-00000.parquet")
    write_manifest(out, "test", "train", {"shard-00000.parquet": info}, [])
    return out


def tiny_recipe_dict(backbones: dict[str, Path], data: Path | None = None) -> dict:
    return {
        "model": {
            "encoder": {"path": str(backbones["whisper"])},
            "llm": {"path": str(backbones["llm"])},
            "steering": {"num_experts": 4},
        },
        "data": {"train": str(data or ""), "valid": str(data or ""), "batch_size": 4, "num_workers": 0},
        "train": {"max_steps": 150, "lr": 3e-2, "warmup_steps": 5, "precision": "fp32", "log_every": 10, "device": "cpu"},
        "eval": {"batch_size": 4, "max_new_tokens": 12},
    }


def train_tiny(backbones: dict[str, Path], data: Path, out: Path, steps: int) -> Path:
    """A checkpoint of the tiny recipe trained for ``steps`` without validation: what infer tests decode with."""
    from steermoe_core.training.loop import train

    d = tiny_recipe_dict(backbones, data)
    d["data"]["valid"] = ""
    d["train"]["max_steps"] = steps
    return train(recipe_from_dict(d), out).model_dir


def random_sm(backbones: dict[str, Path], **policy):
    """A ``SteerMoE`` over the tiny backbones with an untrained adapter on torch in fp32: deterministic
    text for planner, server and tool tests that need no trained model. ``policy``: its LongformPolicy."""
    import torch

    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.inference import SteerMoE
    from steermoe_core.inference.longform import LongformPolicy
    from steermoe_core.model.build import build_model

    model = build_model(recipe_from_dict(tiny_recipe_dict(backbones)).model, torch.device("cpu"))
    return SteerMoE(TorchBackend(model, "fp32"), LongformPolicy(**policy))


@pytest.fixture()
def tiny_recipe(backbones, tiny_data):
    return recipe_from_dict(tiny_recipe_dict(backbones, tiny_data))
