"""Whisper log-mel features in torch, so they run on the training device instead of in numpy.

Numerically the same recipe as ``WhisperFeatureExtractor`` (400-point Hann STFT, hop 160, Slaney
mel filters, log10, clamp to max-8, (x+4)/4), but computed per clip on its real samples only:
padding is never part of the statistics, so a clip gives the same features alone or in a batch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from steermoe_core.audio.load import SAMPLE_RATE

N_FFT = 400
HOP = 160
MAX_FRAMES = 3000  # 30 s, Whisper's window


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    """Cached per device: copying them up for every clip would sync the GPU every clip."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
        max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )
    return torch.from_numpy(bank.astype(np.float32)).to(device)


def num_frames(num_samples: int) -> int:
    """Mel frames Whisper's STFT yields for a clip (the final STFT frame is dropped, as in Whisper)."""
    return num_samples // HOP


def log_mel(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(samples,) float waveform -> (n_mels, samples // 160) features."""
    wave = wave.float()
    if wave.numel() < N_FFT // 2 + 1:
        wave = torch.nn.functional.pad(wave, (0, N_FFT // 2 + 1 - wave.numel()))
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave, N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = mel_filters(n_mels, wave.device)
    mel = filters.T @ power
    logspec = mel.clamp_min(1e-10).log10()
    logspec = torch.maximum(logspec, logspec.max() - 8.0)
    return (logspec + 4.0) / 4.0


def batch_log_mel(
    waves: torch.Tensor, lengths: torch.Tensor, n_mels: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) waveforms -> zero-padded (B, n_mels, F) features and frame counts (B,).

    ``pad_to=3000`` reproduces Whisper's fixed 30 s layout; otherwise F is the batch's longest clip.
    """
    lens = [int(n) for n in lengths.tolist()]
    frames = [min(num_frames(n), MAX_FRAMES) for n in lens]
    width = pad_to or max(frames)
    out = waves.new_zeros((len(lens), n_mels, width), dtype=torch.float32)
    for i, n in enumerate(lens):
        if pad_to:  # the reference layout: features of the clip zero-padded to 30 s of audio
            wave = torch.nn.functional.pad(waves[i, :n], (0, max(0, pad_to * HOP - n)))
            out[i] = log_mel(wave[: pad_to * HOP], n_mels)[:, :width]
        else:
            out[i, :, : frames[i]] = log_mel(waves[i, :n], n_mels)[:, : frames[i]]
    return out, torch.tensor(frames, dtype=torch.long)
