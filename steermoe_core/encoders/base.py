"""The one interface every audio encoder implements, so steering, pooling and the LLM side never
need to know which encoder they sit on.

An encoder owns its front end (waveform -> features), its frame arithmetic (samples -> output
frames, computed on the host so batching never syncs the device), its frozen layers with a hook
after each (where SteerMoE steers), and its final norm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``hook(layer_index, hidden (B, T, D), mask (B, T) of real frames) -> new hidden``."""


class AudioEncoder(nn.Module):
    """A frozen pretrained audio encoder, as SteerMoE sees it. Subclasses set the attributes below."""

    kind: str  # the registry name, e.g. "whisper"
    num_layers: int  # L: layers the steering hook is called after
    dim: int  # D: width of the hidden states
    default_stride: int  # pooling stride that brings the output to about 12.5 Hz
    max_samples: int | None  # the longest clip one forward accepts (None = no limit)
    # Feature frames a batch's time axis is padded (masked) up to a multiple of; 0 = the longest clip.
    # SteerMoEModel.pad_to_repeated_shapes sets it (data.pad_multiple_seconds) so that batch shapes
    # repeat, in training and in a loaded checkpoint: see ``padded_width``.
    pad_multiple: int = 0
    feature_rate: int = 100  # front-end frames a second (Whisper's log-mel and Kaldi fbank both hop 10 ms)
    time_axis: int = 2  # the time axis of ``features``: Whisper's (B, n_mels, F); the conformer's (B, F, idim) sets 1

    def features(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, S) 16 kHz waveforms + (B,) host lengths -> front-end features + their host lengths."""
        raise NotImplementedError

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) sample counts -> (B,) output frame counts, on the host."""
        raise NotImplementedError

    def audio_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) sample counts -> (B,) output frames that carry the clip's audio (the first ones),
        not the padding an encoder may run on as well (Whisper's fixed 30 s layout)."""
        return self.output_lengths(lengths)

    def forward_layers(
        self, feats: torch.Tensor, feat_lengths: torch.Tensor, hook: LayerHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (B, T, D) hidden states after the last layer (before the final norm) and the (B, T) mask."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict:
        """The shape-defining config a checkpoint is tied to (compared on load)."""
        raise NotImplementedError

    def fingerprint_tensor(self) -> torch.Tensor:
        """One weight tensor that identifies the pretrained weights (hashed into checkpoints)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The public entry point: waveforms -> final hidden states (B, T, D) and frame lengths (B,), steering off."""
        device = self.fingerprint_tensor().device
        feats, feat_lengths = self.features(waves.to(device), lengths.cpu())
        x, _ = self.forward_layers(feats, feat_lengths)
        return self.final_norm(x), self.output_lengths(lengths.cpu())

    def train(self, mode: bool = True) -> AudioEncoder:
        """Frozen means frozen: the encoder never leaves eval mode (no dropout, ever)."""
        return super().train(False)


def padded_width(width: int, multiple: int, cap: int | None = None) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (no more than ``cap``).

    Why: CPU kernels (oneDNN) are built and cached per tensor shape. With a new batch width at every
    step the cache never hits and the process grows by MBs a step (3.7 -> 9 GB over 1,000 demo steps);
    with widths rounded to a few values the shapes repeat. The padding is masked, so no real frame changes.
    """
    if multiple <= 0 or width == 0:
        return width
    padded = -(-width // multiple) * multiple
    return padded if cap is None else max(width, min(padded, cap))


def fingerprint(t: torch.Tensor) -> str:
    """A short hash of a weight, rounded to bf16 so the same weights match in any load dtype."""
    data = t.detach().flatten()[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
