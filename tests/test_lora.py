"""LoRA through peft on both backbones: what trains, what is saved, and that a checkpoint reloads."""

import pytest
import torch

from steermoe_core.config import recipe_from_dict
from steermoe_core.data.dataset import ShardedDataset, collate
from steermoe_core.errors import CheckpointError, RecipeError
from steermoe_core.model.build import build_model
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.model.lora import has_lora, merge_lora
from steermoe_core.training.loop import train
from steermoe_core.training.optim import make_optimizer

CPU = torch.device("cpu")


def lora_recipe(backbones, data, **train):
    from conftest import tiny_recipe_dict

    d = tiny_recipe_dict(backbones, data)
    d["model"]["encoder"]["lora"] = {"rank": 4, "target_modules": ["q_proj", "v_proj", "fc1"]}
    d["model"]["llm"]["lora"] = {"rank": 2, "alpha": 4.0}
    d["data"]["valid"] = ""
    d["train"].update({"max_steps": 12, "log_every": 4, "lr_lora": 5e-3, **train})
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def lora_run(backbones, tiny_data, tmp_path_factory):
    recipe = lora_recipe(backbones, tiny_data)
    before = {k: v.clone() for k, v in build_model(recipe.model, CPU, recipe.train.seed).state_dict().items()}
    result = train(recipe, tmp_path_factory.mktemp("lora_run"))
    return {"recipe": recipe, "before": before, "ckpt": result.model_dir}


def _batch(data):
    ds = ShardedDataset(data)
    return collate([ds[i] for i in range(len(ds))], "Transcribe the audio.")


def test_lora_trains_and_base_weights_stay_bit_identical(lora_run):
    model, _, meta = load_checkpoint(lora_run["ckpt"])
    after = model.state_dict()
    changed = {k for k, v in lora_run["before"].items() if not torch.equal(v, after[k])}
    lora_b = {k for k in after if ".lora_B." in k}
    assert lora_b and lora_b <= changed  # B starts at zero: every B moved
    assert all(k.startswith("adapter.") or ".lora_" in k for k in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if n.startswith("adapter.") or ".lora_" in n
    }
    # 2 encoder layers x (q, v: 64->4->64, fc1: 64->4->128) and 2 LLM layers x (q: 64->2->64, v: 64->2->32)
    assert meta["parameters"]["lora_encoder"] == 2 * (2 * 4 * (64 + 64) + 4 * (64 + 128)) == 3584
    assert meta["parameters"]["lora_llm"] == 2 * (2 * (64 + 64) + 2 * (64 + 32)) == 896
    assert meta["parameters"]["total"] == sum(v for k, v in meta["parameters"].items() if k != "total")


def test_lora_parameters_get_their_own_optimizer_group(backbones, tiny_data):
    recipe = lora_recipe(backbones, tiny_data)
    model = build_model(recipe.model, CPU)
    lrs = {g["name"]: g["lr"] for g in make_optimizer(model, recipe.train, CPU).param_groups}
    assert lrs["lora_encoder"] == lrs["lora_llm"] == 5e-3 and lrs["projector"] == 3e-2
    model.train()
    model(_batch(tiny_data))["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("encoder.") for n in with_grad) and any(n.startswith("llm.") for n in with_grad)
    assert all(n.startswith("adapter.") or ".lora_" in n for n in with_grad)


def test_lora_checkpoint_reloads_to_identical_outputs_and_merges(lora_run, tiny_data):
    from safetensors.torch import load_file

    saved = load_file(str(lora_run["ckpt"] / "adapter.safetensors"))
    assert any(k.startswith("lora.encoder.") for k in saved) and any(k.startswith("lora.llm.") for k in saved)
    assert not any(".base_layer." in k for k in saved)  # only LoRA and adapter weights
    batch = _batch(tiny_data)
    a, recipe, _ = load_checkpoint(lora_run["ckpt"])
    b, _, _ = load_checkpoint(lora_run["ckpt"])
    with torch.no_grad():
        la, lb = a(batch)["loss"], b(batch)["loss"]
    assert torch.equal(la, lb)
    ga = a.generate(batch, max_new_tokens=8)
    assert ga == b.generate(batch, max_new_tokens=8) and any(ga)

    merge_lora(b)
    assert not has_lora(b) and not any(".lora_" in n for n, _ in b.named_parameters())
    assert not any(k.startswith("lora.") for k in b.adapter_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b(batch)["loss"], la, atol=1e-4, rtol=1e-4)
    assert b.generate(batch, max_new_tokens=8) == ga


def test_lora_checkpoint_refuses_another_lora_shape(lora_run):
    with pytest.raises(CheckpointError, match="LoRA weight .*shape"):
        load_checkpoint(lora_run["ckpt"], overrides=["model.llm.lora.rank=8"])
    with pytest.raises(CheckpointError, match="LoRA weights do not match"):
        load_checkpoint(lora_run["ckpt"], overrides=["model.encoder.lora.target_modules=['q_proj']"])


def test_unknown_target_module_names_the_recipe_key(backbones, tiny_data):
    recipe = lora_recipe(backbones, tiny_data)
    recipe.model.encoder.lora.target_modules = ["query"]
    with pytest.raises(RecipeError, match=r"model.encoder.lora.target_modules: \['query'\] match no layer .*q_proj"):
        build_model(recipe.model, CPU)


def test_ddp_looks_for_unused_weights_only_when_llm_lora_sits_out_ctc_steps(backbones, tiny_data):
    from steermoe_core.training.distributed import some_weights_sit_out

    assert some_weights_sit_out(lora_recipe(backbones, tiny_data, ctc_only_steps=2, ctc_weight=0.3))
    assert not some_weights_sit_out(lora_recipe(backbones, tiny_data))
    r = lora_recipe(backbones, tiny_data, ctc_only_steps=2, ctc_weight=0.3)
    r.model.llm.lora = None
    assert not some_weights_sit_out(r)


@pytest.mark.slow
def test_two_ddp_processes_train_llm_lora_through_ctc_only_steps(backbones, tiny_data, tmp_path):
    """The LLM's LoRA gets no gradient in the CTC-only steps: DDP must not wait for it."""
    from test_distributed import _cli

    from steermoe_core.config import dump_recipe

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(dump_recipe(lora_recipe(backbones, tiny_data, max_steps=3, ctc_only_steps=2, log_every=1, ctc_weight=0.3)))
    r = _cli("train", str(recipe), "--gpus", "2", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "model")[2]["step"] == 3


def test_prompts_without_audio_run_the_llm_as_released_when_it_has_lora(lora_run, backbones, tiny_data):
    """LoRA trained to read audio must not change the frozen LLM's answers to text: text-only chat
    (the transcript strategy, serve's chat) equals the same LLM without LoRA, token for token, while
    the LoRA stays on for audio. onnxruntime runs it too (the export keeps the LLM as released beside
    the folded one: tests/test_onnx.py), so `infer`'s default backend does not fall back to torch."""
    from conftest import tiny_recipe_dict

    from steermoe_core.generation.chat import chat_text
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.inference.choice import why_torch
    from steermoe_core.model.lora import base_llm

    with_lora = TorchBackend.load(lora_run["ckpt"], "cpu")
    plain = TorchBackend(build_model(recipe_from_dict(tiny_recipe_dict(backbones, tiny_data)).model, CPU))
    for name, p in with_lora.model.llm.named_parameters():  # make the trained LoRA matter a lot
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        on = with_lora.model.llm(input_ids=ids).logits
        with base_llm(with_lora.model):
            off = with_lora.model.llm(input_ids=ids).logits
        base = plain.model.llm(input_ids=ids).logits
    assert not torch.allclose(on, base, atol=1e-3)  # LoRA is live outside
    torch.testing.assert_close(off, base)  # and off inside
    msgs = [{"role": "user", "content": "Summarize: the meeting moved to Tuesday."}]
    assert chat_text(with_lora, msgs, 8) == chat_text(plain, msgs, 8)
    assert has_lora(with_lora.model, "llm")  # switched back on afterwards
    assert "LoRA" not in (why_torch(lora_run["ckpt"], "cpu") or "")
