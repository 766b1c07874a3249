"""The unit of work between data loading and the model: a padded batch of raw waveforms + text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from steermoe_core.data.augment import FeatureMasks


@dataclass
class AudioBatch:
    waves: torch.Tensor  # (N, S) float32 clips, right-padded with zeros
    lengths: torch.Tensor  # (N,) samples, on the host
    prompts: list[str]  # one per example
    targets: list[str] | None = None
    clips_per_example: list[int] | None = None  # long audio: an example's windows, in order; None = 1 each
    masks: FeatureMasks | None = None  # training only: SpecAugment on the encoder's features (data.spec_augment)

    def pin_memory(self) -> AudioBatch:
        """Called by DataLoader(pin_memory=True): lets the step copy waveforms without a stream sync."""
        self.waves = self.waves.pin_memory()
        return self


def pad_clips(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mono clips -> right-padded (N, S) waveforms and their (N,) lengths, as AudioBatch wants."""
    lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
    waves = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        waves[i, : len(c)] = torch.from_numpy(c)
    return waves, lengths
