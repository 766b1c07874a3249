"""`steermoe train --init-from CHECKPOINT`: a new run from another run's weights and Adam moments."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.errors import CheckpointError
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.training.init_from import MOMENTS_FILE, moments_from_state_dict, save_moments
from steermoe_core.training.loop import train


def flat_recipe(backbones, tiny_data, steps: int, **train_cfg):
    """The tiny recipe at a constant learning rate: the 4 clips are one batch, so every step sees the
    same batch and a run from a checkpoint can match the run that wrote it step for step."""
    from conftest import tiny_recipe_dict

    from steermoe_core.config import recipe_from_dict

    d = tiny_recipe_dict(backbones, tiny_data)
    d["data"]["valid"] = ""
    d["train"].update(max_steps=steps, save_every=10, log_every=5, warmup_steps=0, min_lr_ratio=1.0, lr=1e-2, **train_cfg)
    return d, recipe_from_dict(d)


@pytest.fixture(scope="module")
def first_run(backbones, tiny_data, tmp_path_factory):
    """20 steps at a flat lr, checkpoints at 10 and 20."""
    _, recipe = flat_recipe(backbones, tiny_data, 20)
    out = tmp_path_factory.mktemp("first")
    result = train(recipe, out)
    return {"out": out, "step10": out / "checkpoints" / "step-0000010", "final": result.model_dir}


def adapter(path):
    return load_checkpoint(path)[0].adapter_state_dict()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_a_continuation_with_the_optimizer_state_ends_where_the_uninterrupted_run_does(backbones, tiny_data, first_run, tmp_path):
    """From step 10 with Adam's moments, 10 more steps land on the 20-step run's weights; the same 10
    steps from the weights alone (moments restarted: what the shipped adapter used to force) do not."""
    _, recipe = flat_recipe(backbones, tiny_data, 10)
    cont = train(recipe, tmp_path / "cont", init_from=first_run["step10"])
    want = adapter(first_run["final"])
    assert max_diff(adapter(cont.model_dir), want) < 1e-5
    bare = tmp_path / "weights-only"
    shutil.copytree(first_run["step10"], bare)
    (bare / "train_state.pt").unlink()
    cold = train(recipe, tmp_path / "cold", init_from=bare)
    assert max_diff(adapter(cold.model_dir), want) > 1e-3
    meta = json.loads((cont.model_dir / "meta.json").read_text())
    assert meta["init_from"]["step"] == 10 and meta["init_from"]["optimizer"].startswith("6 of 6 parameters from train_state.pt")
    # the lineage: each run it grew from, oldest first, by last step and recipe fingerprint; a third
    # generation lists both, and a recipe that differs only in its loader workers keeps its fingerprint
    from steermoe_core.config import recipe_fingerprint, recipe_from_dict

    first_fp = recipe_fingerprint(flat_recipe(backbones, tiny_data, 20)[1])
    assert meta["init_from"]["lineage"] == [{"step": 10, "recipe": first_fp}]
    d, _ = flat_recipe(backbones, tiny_data, 10)
    d["data"]["num_workers"] = 1
    assert recipe_fingerprint(recipe_from_dict(d)) == recipe_fingerprint(recipe) != first_fp
    third = train(recipe_from_dict(d), tmp_path / "third", init_from=cont.model_dir)
    lineage = json.loads((third.model_dir / "meta.json").read_text())["init_from"]["lineage"]
    assert lineage == [{"step": 10, "recipe": first_fp}, {"step": 10, "recipe": recipe_fingerprint(recipe)}]
    assert json.loads((cold.model_dir / "meta.json").read_text())["init_from"]["optimizer"] == "none saved"


def test_moments_saved_beside_an_adapter_continue_like_the_checkpoint(backbones, tiny_data, first_run, tmp_path):
    """A shipped adapter keeps its moments in optimizer.safetensors (by weight name, no pickle)."""
    _, recipe = flat_recipe(backbones, tiny_data, 10)
    shipped = tmp_path / "shipped"
    shutil.copytree(first_run["step10"], shipped)
    state = torch.load(shipped / "train_state.pt", weights_only=True)
    (shipped / "train_state.pt").unlink()
    model = load_checkpoint(shipped)[0]
    moments = moments_from_state_dict(state["optimizer"], model)
    assert set(moments) == {f"{n}#{s}" for n in model.adapter.state_dict() for s in ("exp_avg", "exp_avg_sq", "step")}
    save_moments(moments, shipped)
    assert (shipped / MOMENTS_FILE).stat().st_size < 4 * (shipped / "adapter.safetensors").stat().st_size
    cont = train(recipe, tmp_path / "cont", init_from=shipped)
    assert max_diff(adapter(cont.model_dir), adapter(first_run["final"])) < 1e-5


def test_a_recipe_with_llm_lora_takes_the_adapter_and_its_moments_and_starts_lora_fresh(backbones, tiny_data, first_run, tmp_path):
    d, _ = flat_recipe(backbones, tiny_data, 2)
    d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
    d["train"]["lr_lora"] = 1e-3
    from steermoe_core.config import recipe_from_dict

    seen = {}
    from steermoe_core.training.loop import Callbacks

    result = train(recipe_from_dict(d), tmp_path / "lora", init_from=first_run["step10"],
                   callbacks=Callbacks(on_start=seen.update))
    assert seen["init_from"]["lora"] == "fresh"
    n_lora = len([k for k in adapter(result.model_dir) if k.startswith("lora.")])
    assert n_lora > 0 and seen["init_from"]["optimizer"] == f"6 of {6 + n_lora} parameters from train_state.pt"


def test_encoder_lora_is_taken_and_llm_lora_added_fresh_and_a_recipe_without_it_is_refused(backbones, tiny_data, tmp_path):
    """The decoupled recipe: a CTC stage with LoRA on the encoder, continued by a recipe that also puts
    LoRA on the LLM (a reader): the encoder's LoRA comes along, the LLM's starts fresh. A recipe with no
    encoder LoRA cannot take the checkpoint, and says which section it lacks."""
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.training.loop import Callbacks

    d, _ = flat_recipe(backbones, tiny_data, 2)
    d["model"]["encoder"]["lora"] = {"rank": 2, "target_modules": ["q_proj", "v_proj"]}
    d["train"]["lr_lora"] = 1e-2
    stage = train(recipe_from_dict(d), tmp_path / "stage")
    d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
    d["train"]["max_steps"] = 1
    seen = {}
    reader = train(recipe_from_dict(d), tmp_path / "reader", init_from=stage.model_dir, callbacks=Callbacks(on_start=seen.update))
    assert seen["init_from"]["lora"] == "encoder loaded, llm fresh"
    before, after = adapter(stage.model_dir), adapter(reader.model_dir)
    assert any(k.startswith("lora.llm.") for k in after) and not any(k.startswith("lora.llm.") for k in before)
    del d["model"]["encoder"]["lora"], d["model"]["llm"]["lora"], d["train"]["lr_lora"]
    with pytest.raises(CheckpointError, match=r"--init-from .*: it has LoRA weights and this recipe has no \[model.encoder.lora\]$"):
        train(recipe_from_dict(d), tmp_path / "plain", init_from=stage.model_dir)


def test_a_checkpoint_that_does_not_fit_the_recipe_is_refused_in_one_line(backbones, tiny_data, first_run, tmp_path):
    d, _ = flat_recipe(backbones, tiny_data, 2)
    d["model"]["steering"]["num_experts"] = 8
    from steermoe_core.config import recipe_from_dict

    with pytest.raises(CheckpointError, match=r"--init-from .*step-0000010: adapter weight .* shape"):
        train(recipe_from_dict(d), tmp_path / "other", init_from=first_run["step10"])


def test_cli_init_from_and_resume(backbones, tiny_data, first_run, tmp_path):
    """The flag on the command line; a resumed run keeps saying where it started; a missing path is one line."""
    sets = [f"model.encoder.path={backbones['whisper']}", f"model.llm.path={backbones['llm']}", f"data.train={tiny_data}",
            "data.valid=", "data.batch_size=4", "data.num_workers=0", "model.steering.num_experts=4",
            "train.max_steps=10", "train.save_every=5", "train.precision=fp32", "train.device=cpu"]
    recipe = Path(__file__).parent.parent / "recipes" / "tiny_random.toml"
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), *[x for s in sets for x in ("--set", s)]]
    runner = CliRunner()
    r = runner.invoke(app, args + ["--init-from", str(first_run["step10"])])
    assert r.exit_code == 0, r.output
    assert "starting from" in r.output and "6 of 6 parameters" in r.output
    shutil.rmtree(tmp_path / "run" / "model")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000010")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000005")
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["init_from"]["path"] == str(first_run["step10"])
    r = runner.invoke(app, args[:4] + ["--overwrite", "--init-from", str(tmp_path / "nowhere"), *args[4:]])
    assert r.exit_code != 0 and "not a steermoe checkpoint" in r.output
    assert "Traceback" not in r.output


def test_a_portable_checkpoint_keeps_its_run_s_last_moments(backbones, tiny_data, first_run, tmp_path):
    """`make demo-full --ship`, and a checkpoint carried to another machine (training.init_from.save_portable):
    the final checkpoint's moments go beside the adapter by weight name, with no pickle, and --init-from
    that folder takes all of them."""
    from steermoe_core.training.init_from import MOMENTS_FILE, PORTABLE_FILES, init_from, read_moments, save_portable

    dest = save_portable(first_run["final"], tmp_path / "pretrained", first_run["out"] / "checkpoints" / "step-0000020")
    assert sorted(p.name for p in dest.iterdir()) == sorted((*PORTABLE_FILES, MOMENTS_FILE))
    model = load_checkpoint(first_run["final"])[0]
    shipped, source = read_moments(dest, model)
    from_ckpt, _ = read_moments(first_run["out"] / "checkpoints" / "step-0000020", model)
    assert source == MOMENTS_FILE and shipped.keys() == from_ckpt.keys()
    assert all(torch.equal(shipped[k], from_ckpt[k]) for k in shipped)
    opt = torch.optim.AdamW([p for ps in model.parameter_groups().values() for p in ps])
    assert init_from(model, opt, dest)["optimizer"] == f"6 of 6 parameters from {MOMENTS_FILE}"
    # a run's own checkpoint folder travels the same way, and a continuation from the copy ends where
    # the uninterrupted run does
    step10 = save_portable(first_run["step10"], tmp_path / "step10")
    assert not (step10 / "train_state.pt").exists()
    _, recipe = flat_recipe(backbones, tiny_data, 10)
    assert max_diff(adapter(train(recipe, tmp_path / "cont", init_from=step10).model_dir), adapter(first_run["final"])) < 1e-5
    with pytest.raises(CheckpointError, match="does not belong to it"):
        save_portable(first_run["final"], tmp_path / "elsewhere", first_run["step10"])


@pytest.mark.parametrize("which", ["ctc_stage", "shipped"])
def test_the_repository_s_checkpoints_continue_with_their_moments(which):
    """checkpoints/ctc_stage (the CTC stage's last round's last step as it travels between machines, docs/training_cpu.md)
    loads into its own recipe, every trainable weight with its Adam moments; the shipped model loads into
    its own recipe with the CTC stage's moments for every weight but the LLM's LoRA (the text-trained
    reader's, which starts fresh). Both record where they grew from."""
    from steermoe_core.config import load_recipe
    from steermoe_core.demo.run import PRETRAINED
    from steermoe_core.demo.stages import CTC_RECIPE, CTC_ROUNDS, READER_STEPS
    from steermoe_core.model.build import build_model
    from steermoe_core.training.init_from import init_from, trainable_names
    from steermoe_core.training.optim import make_optimizer

    folder = Path(__file__).parent.parent / "checkpoints" / "ctc_stage" if which == "ctc_stage" else PRETRAINED
    recipe = load_recipe(CTC_RECIPE if which == "ctc_stage" else PRETRAINED / "recipe.toml", ["data.train=unused", "train.device=cpu"])
    model = build_model(recipe.model, torch.device("cpu"))
    opt = make_optimizer(model, recipe.train, torch.device("cpu"))
    info = init_from(model, opt, folder)
    total = sum(len(g["params"]) for g in opt.param_groups)
    fresh = sum(n.startswith("lora.llm.") for n in trainable_names(model).values())
    assert (fresh == 0) == (which == "ctc_stage")
    assert info["optimizer"] == f"{total - fresh} of {total} parameters from {MOMENTS_FILE}" and info["lora"] == "loaded"
    steps = [3000, *(steps for _, _, steps in CTC_ROUNDS)]  # the base run, then each round of the CTC stage
    assert [x["step"] for x in info["lineage"]] == (steps if which == "ctc_stage" else [*steps, READER_STEPS])