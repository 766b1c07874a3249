"""The seams and the bugs the architecture issue fixed, each pinned by a test that failed before."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_recipe_dict, tone_clip
from typer.testing import CliRunner

from steermoe_core import runtime
from steermoe_core.config import recipe_from_dict
from steermoe_core.data.prep.shards import Row, write_manifest, write_shard
from steermoe_core.errors import BackboneError, SteermoeError
from steermoe_core.training import loop

ROOT = Path(__file__).resolve().parent.parent


# -- precision policy ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device, cpu_bf16, cuda_bf16, want",
    [
        ("cpu", False, False, "fp32"),  # AVX2-only x86: bf16 is emulated and ~4x slower
        ("cpu", True, False, "bf16"),  # AVX512-BF16 / AMX
        ("cuda", False, True, "bf16"),
        ("cuda", False, False, "fp32"),
    ],
)
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, device, cpu_bf16, cuda_bf16, want):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda dev: cuda_bf16)
    p = runtime.resolve_precision("auto", torch.device(device))
    assert p.name == want and p.reason.startswith("auto")


def test_cudnn_attention_is_switched_off_on_cuda_only(monkeypatch):
    """cuDNN attention builds a plan per new sequence length (measured on an H200: a demo-shape step
    1,069 ms with it, 140 ms without, on length-bucketed batches); flash / memory-efficient stay on."""
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    runtime.prefer_shape_free_attention(torch.device("cpu"))
    assert calls == []
    runtime.prefer_shape_free_attention(torch.device("cuda"))
    assert calls == [False]


def test_cpu_bf16_check_follows_onednn_and_the_cpu_flags(monkeypatch):
    runtime.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f"})  # AVX512 without bf16
    assert runtime.cpu_has_native_bf16() is False
    runtime.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # ONEDNN_MAX_CPU_ISA=AVX2
    assert runtime.cpu_has_native_bf16() is False
    runtime.cpu_has_native_bf16.cache_clear()


def test_every_shipped_recipe_uses_auto_precision():
    from steermoe_core.config import load_recipe

    for path in sorted((ROOT / "steermoe_core" / "recipes").glob("*.toml")):
        assert load_recipe(path).train.precision == "auto", path.name


# -- eval and infer agree --------------------------------------------------------------------------
def test_eval_and_infer_give_the_same_text_for_the_same_checkpoint(backbones, tiny_data, tmp_path):
    """Before: eval decoded under bf16 autocast, infer in fp32, and 2 of 4 predictions differed."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import evaluate
    from steermoe_core.inference import SteerMoE
    from steermoe_core.model.checkpoint import load_checkpoint

    d = tiny_recipe_dict(backbones, tiny_data)
    d["train"].update(max_steps=40, precision="bf16")
    d["data"]["valid"] = ""
    d["eval"]["batch_size"] = 1
    ckpt = loop.train(recipe_from_dict(d), tmp_path / "run").model_dir
    model, recipe, _ = load_checkpoint(ckpt)
    evaluate(model, tiny_data, recipe, tmp_path / "preds.jsonl")
    import json

    by_id = {p["id"]: p["prediction"] for p in map(json.loads, (tmp_path / "preds.jsonl").read_text().splitlines())}
    ds = ShardedDataset(tiny_data)
    wavs = []
    for i in range(len(ds)):
        e = ds[i]
        sf.write(tmp_path / f"{e.id}.wav", e.audio, 16000, subtype="FLOAT")
        wavs.append(str(tmp_path / f"{e.id}.wav"))
    results = SteerMoE.load(ckpt, "cpu").transcribe(wavs, batch_size=1, max_new_tokens=recipe.eval.max_new_tokens)
    assert {Path(r.path).stem: r.text for r in results} == by_id


# -- security and paths ----------------------------------------------------------------------------
def test_a_checkpoint_cannot_switch_on_remote_code(backbones, tiny_data, tmp_path, monkeypatch):
    from steermoe_core.backbones import llm as llm_mod
    from steermoe_core.inference import SteerMoE

    d = tiny_recipe_dict(backbones, tiny_data)
    d["train"]["max_steps"] = 2
    d["data"]["valid"] = ""
    ckpt = loop.train(recipe_from_dict(d), tmp_path / "run").model_dir
    text = (ckpt / "recipe.toml").read_text().replace("trust_remote_code = false", "trust_remote_code = true")
    (ckpt / "recipe.toml").write_text(text)  # what a malicious download would ship
    seen = []
    real = llm_mod.load_llm

    def spy(cfg, dtype, trust_remote_code=False):
        seen.append(trust_remote_code)
        return real(cfg, dtype, trust_remote_code)

    monkeypatch.setattr(llm_mod, "load_llm", spy)
    monkeypatch.setattr("steermoe_core.model.build.load_llm", spy)
    SteerMoE.load(ckpt, "cpu")
    SteerMoE.load(ckpt, "cpu", trust_remote_code=True)  # only the user's own flag turns it on
    assert seen == [False, True]


def test_a_missing_local_folder_is_an_error_without_a_hub_lookup(backbones):
    from steermoe_core.backbones.weights import resolve_model_dir

    parent = backbones["llm"].parent
    t = time.perf_counter()
    with pytest.raises(BackboneError, match="llmX: no such model folder"):
        resolve_model_dir(str(parent / "llmX"))
    for path in ("./nowhere", "~/nowhere", "/nowhere/model", "nowhere.gguf"):
        with pytest.raises(BackboneError, match="no such model folder"):
            resolve_model_dir(path)
    assert time.perf_counter() - t < 1.0


def test_relative_path_with_an_existing_parent_is_local(backbones, monkeypatch):
    from steermoe_core.backbones.weights import looks_local

    monkeypatch.chdir(backbones["llm"].parent.parent)
    rel = f"{backbones['llm'].parent.name}/llmX"
    assert looks_local(rel)
    assert not looks_local("Qwen/Qwen2.5-7B-Instruct") and not looks_local("openai/whisper-large-v3")


# -- training loop ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data23(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data23")
    rows = [Row(f"u{i:02d}", tone_clip(i % 4, 0.5 + 0.05 * i), "hello world") for i in range(23)]
    write_manifest(out, "test", "train", {"s.parquet": write_shard(rows, out / "s.parquet")}, [])
    return out


def test_gradient_accumulation_never_leaks_across_epochs(backbones, data23, tmp_path, monkeypatch):
    """23 examples, batch 4 -> 6 micro-batches an epoch; grad_accum 4 must back-propagate exactly 4
    per step (before: the 2 left over at each epoch's end were added into the next step)."""
    d = tiny_recipe_dict(backbones, data23)
    d["data"].update(valid="", batch_size=4)
    d["train"].update(max_steps=6, grad_accum=4, log_every=1)
    per_step = []
    real = loop.train_step

    def counting(model, opt, micro_batches, *a, **kw):
        per_step.append(len(micro_batches))
        return real(model, opt, micro_batches, *a, **kw)

    monkeypatch.setattr(loop, "train_step", counting)
    forwards = []
    from steermoe_core.model.steermoe import SteerMoEModel

    real_fwd = SteerMoEModel.forward
    monkeypatch.setattr(SteerMoEModel, "forward", lambda self, b: (forwards.append(1), real_fwd(self, b))[1])
    res = loop.train(recipe_from_dict(d), tmp_path / "run")
    assert per_step == [4] * 6 and len(forwards) == 24
    # the epoch each step ends in: 24 micro-batches are exactly 4 epochs of 6
    assert [r["epoch"] for r in res.history] == [0, 1, 1, 2, 3, 3]


def test_validation_covers_the_whole_set(backbones, data23, tmp_path):
    """Before: 50 batches and the 64 shortest clips at most; max_examples = 0 meant 64."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import pick_examples
    from steermoe_core.model.build import build_model
    from steermoe_core.runtime import Precision

    d = tiny_recipe_dict(backbones, data23)
    d["eval"].update(batch_size=1, max_new_tokens=2)
    recipe = recipe_from_dict(d)
    model = build_model(recipe.model, torch.device("cpu"))
    seen = []
    real = model.forward
    model.forward = lambda b: (seen.append(len(b.lengths)), real(b))[1]
    metrics = loop.validate(model, ShardedDataset(data23), recipe, Precision("fp32", "test"))
    assert metrics["valid_examples"] == 23 and sum(seen) == 23
    sample = pick_examples(23, 5, seed=0)
    assert len(sample) == 5 and sample != [0, 1, 2, 3, 4] and sample == pick_examples(23, 5, seed=0)


# -- errors ----------------------------------------------------------------------------------------
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch):
    import typer

    from steermoe_cli.common import friendly

    app = typer.Typer()

    @app.command()
    @friendly
    def boom(kind: str):
        if kind == "user":
            raise SteermoeError("data/x: no such dataset folder")
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)")

    r = CliRunner().invoke(app, ["user"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "no such dataset folder" in r.output
    r = CliRunner().invoke(app, ["bug"])
    assert r.exit_code == 3 and "Traceback" in r.output and "please report it" in r.output


def _imported_modules(path: Path, root: Path) -> set[str]:
    """Every module a file under ``root`` imports, at the top or inside a function, relative imports made absolute."""
    import ast

    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


def _layering_violations(core: Path) -> list[str]:
    """Imports that run against the layers: anything in the core importing the CLI; training importing
    inference or serving (or either of them importing training: what both need, such as joining a
    process group, lives below both); model, encoders, backbones, audio, data and the top-level
    modules importing a workflow."""
    workflows = ("training", "evaluation", "inference", "serving", "demo", "experiments", "export")
    forbidden = {
        "training": ("steermoe_core.inference", "steermoe_core.serving"),
        "inference": ("steermoe_core.training",),
        "serving": ("steermoe_core.training",),
        **{low: tuple(f"steermoe_core.{w}" for w in workflows) for low in ("model", "encoders", "backbones", "audio", "data")},
    }
    bad = []
    for path in sorted(core.rglob("*.py")):
        rel = path.relative_to(core).parts
        top = rel[0] if len(rel) > 1 else None  # None: a module at the package's top (errors, paths, launch_env, ...)
        banned = ("steermoe_cli", *(forbidden.get(top, ()) if top else tuple(f"steermoe_core.{w}" for w in workflows)))
        for mod in _imported_modules(path, core.parent):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{'/'.join(rel)} imports {mod}")
    return bad


def test_layout_has_no_cycles_and_model_does_not_import_workflows():
    tool = ROOT.parent / "shared" / "tools" / "import_graph.py"
    if tool.exists():
        out = subprocess.run([sys.executable, str(tool), str(ROOT)], capture_output=True, text=True).stdout
        assert "0 import cycles, 0 core->cli imports, 0 recipes with a fixed precision" in out, out
    assert _layering_violations(ROOT / "steermoe_core") == []


@pytest.mark.parametrize("module, imported, line", [
    ("training/loop.py", "steermoe_core.inference.api", "from steermoe_core.inference.api import SteerMoE"),
    ("training/sub.py", "steermoe_core.serving", "from ..serving import app"),
    ("inference/folder_job.py", "steermoe_core.training.engines", "from steermoe_core.training.engines import make_strategy"),
    ("serving/app.py", "steermoe_core.training", "import steermoe_core.training"),
    ("generation/chat.py", "steermoe_cli.common", "from steermoe_cli.common import console"),
    ("paths.py", "steermoe_core.inference", "from .inference import SteerMoE"),
    ("model/steermoe.py", "steermoe_core.evaluation.evaluate", "from steermoe_core.evaluation.evaluate import evaluate"),
])
def test_an_import_against_the_layers_fails_the_check(tmp_path, module, imported, line):
    """The check itself: each arrow the layers forbid, written into a scratch copy of the package's
    shape, is reported (inside a function too); an allowed arrow is not."""
    core = tmp_path / "steermoe_core"
    target = core / module
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"def f():\n    {line}\n")
    (core / "inference" / "fine.py").parent.mkdir(parents=True, exist_ok=True)
    (core / "inference" / "fine.py").write_text("from steermoe_core.generation.chat import decode_audio\nimport torch\n")
    assert _layering_violations(core) == [f"{module} imports {imported}"]


def test_the_onnxruntime_command_line_modules_import_no_torch():
    """What `steermoe infer/serve --backend onnxruntime` imports before choosing a backend: the CLI and
    the pure helpers it asks (launcher environment, cache folder). The runs themselves are checked with
    torch blocked in tests/test_torch_free.py."""
    code = ("import sys, steermoe_cli.main, steermoe_core.launch_env, steermoe_core.paths, steermoe_core.inference.folder_job; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_recipes_ship_inside_the_package():
    from steermoe_core.demo.run import RECIPE

    assert RECIPE.is_file() and RECIPE.is_relative_to(ROOT / "steermoe_core")


def test_unused_distributed_settings_are_an_error():
    from steermoe_core.errors import RecipeError

    with pytest.raises(RecipeError, match="distributed.zero_stage: only used with distributed.engine = 'deepspeed'"):
        recipe_from_dict({"distributed": {"zero_stage": 3}})


def test_eval_max_examples_zero_means_the_full_set():
    from steermoe_core.evaluation.evaluate import pick_examples

    assert pick_examples(500, 0, seed=0) is None and pick_examples(10, 64, seed=0) is None
    np.testing.assert_equal(len(pick_examples(500, 64, seed=1)), 64)
