"""Training-time audio augmentation, as ASR training uses it: speed perturbation, additive noise at
a random SNR, reverberation with a synthetic room response, a telephone or codec band, and SpecAugment's time and frequency masks
(``FeatureMasks``: drawn here, applied by the model to its encoder's input features, which only it computes).

Deterministic: each example's draw comes from (seed, epoch, example id), so a resumed run and a run
with DataLoader workers see exactly the same audio as an uninterrupted single-process one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from steermoe_core.audio.load import SAMPLE_RATE


@dataclass(frozen=True)
class Augment:
    speeds: tuple[float, ...] = ()  # factors drawn uniformly; () = off
    noise_snr_db: tuple[float, ...] = ()  # (low, high); () = off
    noise_prob: float = 0.0
    reverb_prob: float = 0.0
    seed: int = 0
    epoch: int = 0
    spec: tuple[int, ...] = ()  # SpecAugment: (time masks, widest, frequency masks, widest); () = off
    band_prob: float = 0.0  # a telephone or codec band (``band_limit``)

    @classmethod
    def from_data(cls, data, seed: int, epoch: int = 0) -> Augment:
        """The augmentation a recipe's ``[data]`` asks for (speed_perturb, noise_snr_db, noise_prob, reverb_prob,
        spec_augment, band_prob)."""
        return cls(tuple(data.speed_perturb), tuple(data.noise_snr_db), data.noise_prob, data.reverb_prob, seed, epoch,
                   tuple(data.spec_augment), data.band_prob)

    @property
    def active(self) -> bool:
        """Whether the waveforms change (``spec`` is applied later, to features)."""
        return bool(self.speeds or (self.noise_snr_db and self.noise_prob) or self.reverb_prob or self.band_prob)

    def masks(self, example_ids: list[str]) -> FeatureMasks | None:
        """The batch's SpecAugment masks, each example's from (seed, epoch, id) as its audio's draw."""
        if not any(self.spec):
            return None
        return FeatureMasks(self.spec, tuple(zlib.crc32(f"{self.seed}/{self.epoch}/{i}".encode()) for i in example_ids))

    def __call__(self, audio: np.ndarray, example_id: str) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(example_id.encode())])
        if self.speeds:
            audio = change_speed(audio, float(rng.choice(self.speeds)))
        if self.reverb_prob and rng.random() < self.reverb_prob:
            audio = reverberate(audio, rng)
        if self.noise_snr_db and rng.random() < self.noise_prob:
            audio = add_noise(audio, float(rng.uniform(*self.noise_snr_db)), rng)
        if self.band_prob and rng.random() < self.band_prob:  # last: the channel carries the room and its noise
            audio = band_limit(audio, rng)
        return audio.astype(np.float32)


@dataclass(frozen=True)
class FeatureMasks:
    """SpecAugment (Park et al. 2019) for one batch: ``spec`` = (time masks, widest, frequency masks,
    widest), one seed per example. A frozen encoder that trains only steering, a projector or LoRA
    on a few hours of speech fits its clips and reads new voices little better (docs/training_cpu.md):
    masking stretches of time and bands of frequency is the standard cheap regulariser for that."""

    spec: tuple[int, ...]
    seeds: tuple[int, ...]

    def apply(self, feats: torch.Tensor, lengths: torch.Tensor, time_axis: int) -> torch.Tensor:
        """(B, ..) features with (B,) real frame counts on ``time_axis`` -> a masked copy (masks lie within each clip)."""
        n_time, t_width, n_freq, f_width = self.spec
        out = feats.clone()
        t_ax = time_axis % feats.ndim
        f_ax = 1 if t_ax == 2 else 2
        bins = feats.shape[f_ax]
        for i, seed in enumerate(self.seeds):
            rng = np.random.default_rng(seed)
            clip = out[i].movedim(t_ax - 1, 0)  # (time, bins), a view
            frames = int(lengths[i])
            for _ in range(n_time):
                w = int(rng.integers(0, min(t_width, frames) + 1))
                start = int(rng.integers(0, frames - w + 1))
                clip[start : start + w] = 0
            for _ in range(n_freq):
                w = int(rng.integers(0, min(f_width, bins) + 1))
                start = int(rng.integers(0, bins - w + 1))
                clip[:frames, start : start + w] = 0
        return out


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Kaldi-style speed perturbation: resample so the clip plays ``factor`` times faster (pitch too)."""
    if factor == 1.0:
        return audio
    n = max(1, int(round(len(audio) / factor)))
    return np.interp(np.arange(n) * factor, np.arange(len(audio)), audio).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White or pink (1/f) noise at ``snr_db`` relative to the clip's power."""
    noise = rng.standard_normal(len(audio))
    if rng.random() < 0.5:  # pink: shape the spectrum by 1/sqrt(f)
        spec = np.fft.rfft(noise)
        spec[1:] /= np.sqrt(np.arange(1, len(spec)))
        noise = np.fft.irfft(spec, n=len(audio))
    p_sig = float(np.mean(audio**2)) or 1e-8
    p_noise = float(np.mean(noise**2)) or 1e-8
    return audio + noise * np.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))


def reverberate(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with exponentially decaying noise (RT60 0.2-0.8 s), the classic synthetic room."""
    rt60 = rng.uniform(0.2, 0.8)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    ir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0
    ir /= np.sqrt(np.sum(ir**2))
    size = 1 << (len(audio) + len(ir) - 2).bit_length()  # FFT convolution: np.convolve took 0.1-1 s a clip
    wet = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(ir, size), size)[: len(audio)]
    peak = np.abs(wet).max() or 1.0
    return wet * (np.abs(audio).max() / peak)


def band_limit(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The band a channel leaves: half the time a telephone line (300-3,400 Hz, as 8 kHz G.711 carries
    it), else a codec's low-pass drawn between 3.4 and 7 kHz. Synthetic training speech fills the whole
    0-8 kHz band, while phone calls, meeting systems and compressed files cut it: the model should not
    lean on bands a recording may lack. Cosine edges 200 Hz wide (a brick wall would ring); the level
    is kept."""
    spec = np.fft.rfft(audio)
    f = np.fft.rfftfreq(len(audio), 1.0 / SAMPLE_RATE)
    phone = rng.random() < 0.5
    high = 3400.0 if phone else float(rng.uniform(3400.0, 7000.0))
    gain = np.clip((high + 100.0 - f) / 200.0, 0.0, 1.0)
    if phone:
        gain = gain * np.clip((f - 200.0) / 200.0, 0.0, 1.0)
    gain = 0.5 - 0.5 * np.cos(np.pi * gain)
    out = np.fft.irfft(spec * gain, n=len(audio))
    rms_in, rms_out = float(np.sqrt(np.mean(audio**2))), float(np.sqrt(np.mean(out**2)))
    return out * (rms_in / rms_out) if rms_out > 1e-9 else out
