"""Recipes: typed, documented, overridable, and every mistake is one line naming the key."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.config import (
    RecipeError,
    dump_recipe,
    iter_fields,
    load_recipe,
    recipe_from_dict,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.model.llm.path and r.model.encoder.path


def test_shipped_recipes_include_the_full_scale_ones():
    names = {p.name for p in RECIPES}
    assert {"librispeech_whisper_qwen7b.toml", "clothoaqa_whisper_qwen7b.toml", "tiny_random.toml"} <= names
    r = load_recipe(Path(__file__).parent.parent / "recipes" / "librispeech_whisper_qwen7b.toml")
    assert r.model.encoder.path == "openai/whisper-large-v3" and r.model.llm.path == "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize(
    "data,overrides,message",
    [
        ({"model": {"steering": {"num_experts": "8"}}}, [], "model.steering.num_experts: expected an integer"),
        ({"model": {"steering": {"experts": 8}}}, [], "model.steering.experts: unknown key"),
        ({"trian": {}}, [], "trian: unknown key"),
        ({"train": {"lr": -1.0}}, [], "train.lr: -1.0 must be greater than 0.0"),
        ({"model": {"projector": {"pooling": "mean"}}}, [], "model.projector.pooling: 'mean' is not one of"),
        ({"model": {"steering": {"top_k": 9}}}, [], "model.steering.top_k: 9 exceeds"),
        ({}, ["train.max_steps=0"], "train.max_steps: 0 is below the minimum 1"),
        ({}, ["train.max_steps"], "expected key=value"),
        ({"train": {"max_steps": 100, "decay_steps": 200}}, [], "train.decay_steps: must lie after train.warmup_steps"),
        ({"train": {"compile": "yes"}}, [], "train.compile: expected true or false"),
        ({"data": {"max_duration": 45.0}}, [], "data.max_duration: 45.0 is above the maximum 30.0"),
    ],
)
def test_bad_recipes_name_the_key(data, overrides, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        recipe_from_dict(data, overrides)


def test_overrides_parse_toml_values_and_bare_strings():
    r = recipe_from_dict({}, ["train.lr=1e-3", "model.llm.path=some/model", "train.compile=true", "train.betas=[0.9, 0.95]"])
    assert r.train.lr == 1e-3 and r.model.llm.path == "some/model" and r.train.compile is True and r.train.betas == [0.9, 0.95]


def test_dump_roundtrips_and_documents_every_field(tmp_path):
    r = recipe_from_dict({}, ["train.lr=2e-4", "model.steering.num_experts=16"])
    text = dump_recipe(r)
    p = tmp_path / "r.toml"
    p.write_text(text)
    assert load_recipe(p) == r
    for key, _, doc in iter_fields():
        assert doc, f"{key} has no documentation"
        assert f"# {doc}" in text


def test_cli_bad_recipe_is_one_line_and_exit_1(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nlr = 'fast'\n")
    r = CliRunner().invoke(app, ["train", str(p)])
    assert r.exit_code == 2
    assert "train.lr: expected a number" in r.output and "Traceback" not in r.output
    assert str(p) in r.output.replace("\n", "")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "no such recipe file" in r.output
