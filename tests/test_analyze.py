"""`steermoe analyze`: router statistics of a trained adapter, as JSON, PNGs and tables."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from steermoe_cli.main import app
from steermoe_core.training.loop import train


@pytest.fixture(scope="module")
def two_prompt_data(tmp_path_factory):
    from conftest import TEXTS, tone_clip

    from steermoe_core.data.prep.shards import Row, write_manifest, write_shard

    out = tmp_path_factory.mktemp("qa") / "two_prompts"
    out.mkdir()
    prompts = ["Transcribe the audio.", "What is said?"]
    rows = [Row(f"utt{i}", tone_clip(i % 4, 0.6 + 0.2 * i), TEXTS[i % 4], prompts[i % 2]) for i in range(6)]
    write_manifest(out, "test", "test", {"shard-00000.parquet": write_shard(rows, out / "shard-00000.parquet")}, [])
    return out


def _trained(backbones, data, out, **steering):
    from conftest import tiny_recipe_dict

    from steermoe_core.config import recipe_from_dict

    d = tiny_recipe_dict(backbones, data)
    d["model"]["steering"].update(steering)
    d["data"]["valid"] = ""
    d["train"].update(max_steps=6, log_every=3)
    return train(recipe_from_dict(d), out).model_dir


@pytest.fixture(scope="module")
def steermoe_ckpt(backbones, tiny_data, tmp_path_factory):
    return _trained(backbones, tiny_data, tmp_path_factory.mktemp("run"))


def test_analyze_writes_json_and_pngs_with_gates_summing_to_one(steermoe_ckpt, two_prompt_data, tmp_path):
    ckpt = steermoe_ckpt
    out = tmp_path / "analysis"
    r = CliRunner().invoke(app, ["analyze", str(ckpt), str(two_prompt_data), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "router_stats.json").read_text())
    assert stats["num_layers"] == 2 and stats["num_experts"] == 4 and stats["examples"] == 6
    assert len(stats["layers"]) == 2 and stats["frames"] > 0
    for groups in [stats["layers"], *(g["layers"] for g in stats["by_prompt"].values())]:
        for layer in groups:
            assert math.isclose(sum(layer["mean_gate"]), 1.0, abs_tol=1e-6)
            assert math.isclose(sum(layer["top1_frequency"]), 1.0, abs_tol=1e-6)
            assert 0.0 < layer["entropy"] <= math.log(4) + 1e-9
            assert layer["steering_norm"] > 0 and 0 < layer["relative_steering"] < 1
    assert {p: g["examples"] for p, g in stats["by_prompt"].items()} == {"Transcribe the audio.": 3, "What is said?": 3}
    for name in ("router_heatmap.png", "router_entropy.png", "steering_norm.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "router of" in r.stdout and "entropy by prompt" in r.stdout and "What is said?" in r.stdout


def test_observer_sees_the_gates_without_changing_the_output(steermoe_ckpt, tiny_data):
    from steermoe_core.data.dataset import ShardedDataset, collate
    from steermoe_core.model.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(steermoe_ckpt)
    ds = ShardedDataset(tiny_data)
    batch = collate([ds[i] for i in range(len(ds))], "x")
    with torch.no_grad():
        plain = model.encode_audio(batch.waves, batch.lengths)
        seen = []
        model.steering.observer = lambda layer, g, delta, h, mask: seen.append((layer, g.sum(-1)))
        watched = model.encode_audio(batch.waves, batch.lengths)
    assert torch.equal(plain, watched) and [s[0] for s in seen] == [0, 1]
    torch.testing.assert_close(seen[0][1], torch.ones_like(seen[0][1]))


def test_analyze_refuses_an_adapter_without_router(backbones, tiny_data, tmp_path):
    ckpt = _trained(backbones, tiny_data, tmp_path / "run", placement="none")
    r = CliRunner().invoke(app, ["analyze", str(ckpt), str(tiny_data), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "has no router" in r.output


@pytest.mark.parametrize("trim", ["true", "false"])
def test_router_figures_cover_audio_frames_only_whatever_the_batching(steermoe_ckpt, tiny_data, trim):
    """One clip at a time or all in one batch: the same figures, over the clips' own frames (never
    Whisper's 30 s of padding with trim_padding = false)."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.experiments.router_stats import router_statistics

    def stats(batch_size):
        return router_statistics(steermoe_ckpt, tiny_data,
                                 overrides=[f"eval.batch_size={batch_size}", f"model.encoder.trim_padding={trim}"])

    one, four = stats(1), stats(4)
    ds = ShardedDataset(tiny_data)
    audio_frames = sum((len(ds[i].audio) // 160 + 1) // 2 for i in range(len(ds)))
    assert one["frames"] == four["frames"] == audio_frames  # 10 ms mel hop, 2x conv stride
    for a, b in zip(one["layers"], four["layers"]):
        for k in ("mean_gate", "top1_frequency"):
            torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(b[k]), atol=1e-4, rtol=1e-4)
        for k in ("entropy", "steering_norm", "relative_steering"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
