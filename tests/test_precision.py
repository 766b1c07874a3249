"""The precision policy per phase: `auto` trains in bf16 where a CPU runs it natively, and decodes in
fp32 on every CPU (token-by-token steps ran 2.6-3.4x slower in bf16 on an AMX CPU)."""

from __future__ import annotations

import pytest
import torch

from steermoe_core import runtime


@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend the CPU has (or lacks) native bf16, whatever this machine has."""

    def set_kind(native: bool) -> None:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)

    return set_kind


CPU = torch.device("cpu")


def test_auto_trains_in_bf16_and_decodes_in_fp32_on_a_cpu_with_native_bf16(cpu_kind):
    cpu_kind(True)
    train = runtime.resolve_precision("auto", CPU, "train")
    decode = runtime.resolve_precision("auto", CPU, "decode")
    assert train.name == "bf16" and "training" in train.reason
    assert decode.name == "fp32"
    assert "decoding" in decode.reason and "fp32" in decode.reason  # the printed reason says why
    assert runtime.resolve_precision("auto", CPU).name == "bf16"  # the default phase is training


def test_auto_is_fp32_for_both_phases_on_a_cpu_without_native_bf16(cpu_kind):
    cpu_kind(False)
    for phase in runtime.PHASES:
        p = runtime.resolve_precision("auto", CPU, phase)
        assert p.name == "fp32" and "without native bf16" in p.reason


@pytest.mark.parametrize("phase", runtime.PHASES)
def test_a_precision_set_in_the_recipe_holds_for_both_phases(cpu_kind, phase):
    cpu_kind(True)
    assert runtime.resolve_precision("bf16", CPU, phase).name == "bf16"
    assert runtime.resolve_precision("fp32", CPU, phase).name == "fp32"


def test_auto_decodes_in_bf16_on_a_gpu_with_it(monkeypatch):
    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda dev: True)
    assert runtime.resolve_precision("auto", torch.device("cuda"), "decode").name == "bf16"


def test_an_unknown_phase_is_a_programming_error():
    with pytest.raises(ValueError):
        runtime.resolve_precision("auto", CPU, "serve")


def test_eval_and_the_torch_backend_decode_at_the_decoding_precision(cpu_kind, backbones, tiny_data):
    """`steermoe eval` and `steermoe infer` must give the same text: both resolve `auto` for decoding."""
    from conftest import tiny_recipe_dict

    from steermoe_core.config import recipe_from_dict
    from steermoe_core.evaluation.evaluate import evaluate
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.model.build import build_model

    cpu_kind(True)
    d = tiny_recipe_dict(backbones, tiny_data)
    d["train"]["precision"] = "auto"
    d["eval"]["max_new_tokens"] = 2
    recipe = recipe_from_dict(d)
    model = build_model(recipe.model, CPU)
    assert TorchBackend(model).precision.name == "fp32"
    assert evaluate(model, tiny_data, recipe)["precision"] == "fp32"


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_at_barriers_unless_the_caller_chose(given, want):
    """Spinning OpenMP threads made a decode step 20-60x slower on a busy 2-core CPU; importing
    steermoe_core before torch makes them sleep, and a wait policy the caller set is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import steermoe_core, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == want
