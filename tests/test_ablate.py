"""`steermoe ablate` on tiny random backbones: every variant trained, evaluated, tabled; resumable."""

import json

import pytest
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.errors import UsageError
from steermoe_core.experiments.ablate import parse_variants, run_ablation
from steermoe_core.training.loop import Callbacks

VARIANTS = "linear,post_encoder,layer_wise,per_layer_router,experts=2,encoder_lora"


@pytest.fixture()
def recipe_file(backbones, tiny_data, tmp_path):
    from conftest import tiny_recipe_dict

    from steermoe_core.config import dump_recipe, recipe_from_dict

    d = tiny_recipe_dict(backbones, tiny_data)
    d["train"].update(log_every=2, warmup_steps=1)
    d["eval"]["max_new_tokens"] = 4
    p = tmp_path / "tiny.toml"
    p.write_text(dump_recipe(recipe_from_dict(d)))
    return p


def test_ablate_trains_every_variant_and_resumes_after_a_kill(recipe_file, tmp_path):
    out = tmp_path / "abl"

    def kill_per_layer(v):
        def on_save(path):
            raise KeyboardInterrupt  # killed right after its first checkpoint (step 1 of 4: save_every = steps // 4)
        return Callbacks(on_save=on_save) if v.name == "per_layer_router" else Callbacks()

    with pytest.raises(KeyboardInterrupt):
        run_ablation(recipe_file, VARIANTS, 4, out, callbacks_for=kill_per_layer)
    finished = {p.parent.name for p in out.glob("*/result.json")}
    assert finished == {"linear", "post_encoder", "layer_wise"}
    first = {n: (out / n / "result.json").stat().st_mtime_ns for n in finished}

    trained = []
    results = run_ablation(recipe_file, VARIANTS, 4, out, callbacks_for=lambda v: Callbacks(on_start=lambda i, v=v: trained.append((v.name, i["start_step"]))))
    assert trained == [("per_layer_router", 1), ("experts=2", 0), ("encoder_lora", 0)]  # finished ones skipped
    assert {n: (out / n / "result.json").stat().st_mtime_ns for n in finished} == first
    by = {r["variant"]: r for r in results}
    assert list(by) == VARIANTS.split(",")
    assert by["per_layer_router"]["resumed_from_step"] == 1
    p = {n: r["parameters"] for n, r in by.items()}
    # tiny Whisper: L=2, D=64; LLM H=64; recipe E=4
    assert p["linear"] == {"steering_vectors": 0, "router": 0, "scales": 0, "projector": 4160, "total": 4160}
    assert p["post_encoder"]["steering_vectors"] == 4 * 64 and p["layer_wise"]["steering_vectors"] == 2 * 4 * 64
    assert p["per_layer_router"]["router"] == p["layer_wise"]["router"] == 2 * 4 * 65
    assert p["experts=2"]["steering_vectors"] == 2 * 2 * 64
    assert p["encoder_lora"]["lora_encoder"] == 2 * 2 * 8 * (64 + 64) and p["encoder_lora"]["router"] == 0
    for r in results:
        assert r["steps"] == 4 and r["eval"]["examples"] == 4 and 0.0 <= r["value"]
        assert r["samples_per_s"] > 0 and r["train_wall_s"] > 0
        assert 0.0 < r["eval_loss"] < 20.0  # teacher-forced loss on the eval set, beside the metric
    table = (out / "ablation.md").read_text()
    assert "| eval loss |" in table
    for name in VARIANTS.split(","):
        assert f"| {name} |" in table
    assert json.loads((out / "ablation.json").read_text())["results"] == results


def test_unknown_variant_is_a_usage_error(tiny_recipe):
    with pytest.raises(UsageError, match="unknown variant 'lienar'"):
        parse_variants("linear,lienar", tiny_recipe)
    with pytest.raises(UsageError, match="not an integer"):
        parse_variants("experts=many", tiny_recipe)


def test_cli_ablate_reuses_finished_variants(recipe_file, tmp_path):
    out = tmp_path / "abl"
    args = ["ablate", str(recipe_file), "--variants", "linear,layer_wise", "--steps", "2", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "layer_wise" in r.stdout and (out / "ablation.md").exists()
    r = CliRunner().invoke(app, args[:-3] + ["3", "--out", str(out)])
    assert r.exit_code == 2 and "finished with 2 steps" in r.output


def test_variants_take_lora_and_vocab_posterior_only_when_they_ask_and_checkpoint_mid_run(backbones, tiny_data):
    from conftest import tiny_recipe_dict

    from steermoe_core.config import recipe_from_dict
    from steermoe_core.experiments.ablate import variant_recipe

    d = tiny_recipe_dict(backbones, tiny_data)
    d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
    d["train"].update(lr_lora=5e-3, save_every=1000)
    base = recipe_from_dict(d)
    v = {x.name: x for x in parse_variants("linear,layer_wise,encoder_lora,llm_lora,vocab_posterior", base)}
    for name in ("linear", "layer_wise", "vocab_posterior"):
        r = variant_recipe(base, v[name], 8)
        assert r.model.encoder.lora is None and r.model.llm.lora is None and r.train.lr_lora == 0.0
        assert r.model.projector.vocab_posterior == (name == "vocab_posterior")
    enc = variant_recipe(base, v["encoder_lora"], 8)
    assert enc.model.encoder.lora is not None and enc.model.llm.lora is None and enc.train.lr_lora == 5e-3
    llm = variant_recipe(base, v["llm_lora"], 8)
    assert llm.model.llm.lora.rank == 2 and llm.model.llm.lora.alpha == 4.0 and llm.model.encoder.lora is None
    # a checkpoint at least every quarter of the run, whatever the recipe's save_every
    assert [variant_recipe(base, v["linear"], n).train.save_every for n in (8, 3, 1)] == [2, 1, 1]
    base.train.save_every = 1
    assert variant_recipe(base, v["linear"], 8).train.save_every == 1


def test_a_finished_variant_trained_with_another_recipe_is_not_reused(recipe_file, tmp_path, monkeypatch):
    """--set changed since the variant finished: its result would mix recipes in one table. The
    variant's own callbacks (on_skip included) reach the training loop."""
    from steermoe_core.model.steermoe import SteerMoEModel

    real, calls = SteerMoEModel.forward, [0]

    def forward(self, batch):
        out = real(self, batch)
        calls[0] += 1
        if calls[0] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SteerMoEModel, "forward", forward)
    skips = []
    out = tmp_path / "abl"
    run_ablation(recipe_file, "linear", 2, out, callbacks_for=lambda v: Callbacks(on_skip=skips.append))
    assert [s["step"] for s in skips] == [1]
    assert json.loads((out / "linear" / "result.json").read_text())["recipe_hash"]
    run_ablation(recipe_file, "linear", 2, out)  # same recipe: reused
    with pytest.raises(UsageError, match=r"finished with another recipe .*delete .*linear to retrain it"):
        run_ablation(recipe_file, "linear", 2, out, overrides=["train.lr=0.01"])
