"""Kaldi fbank + global CMVN in torch: FireRedASR's front end, batched on the model's device.

FireRedASR computes 80-dim log-mel fbank with ``kaldi-native-fbank`` (25 ms / 10 ms frames, povey
window, dither 0, snip_edges, DC removal, pre-emphasis 0.97, 512-point FFT, mel bins from 20 Hz to
Nyquist) on int16-scale samples, one clip at a time on the CPU, then subtracts the means and scales
by the inverse standard deviations of ``cmvn.ark``. Here the same arithmetic runs on a whole
right-padded batch at once (one unfold, one FFT, one matmul), so feature extraction never becomes
the host-side bottleneck of training; tests hold it to ``kaldi-native-fbank`` within 1e-3.

``cmvn.ark`` is read by our own small reader (a Kaldi matrix, binary or text): ``kaldiio`` would
also accept pickles and shell pipes, and a statistics file must never be able to run code.
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path

import torch

from steermoe_core.errors import BackboneError

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512  # the frame length rounded up to a power of two, as Kaldi does
PREEMPH = 0.97
LOW_FREQ = 20.0
INT16_SCALE = 32768.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi's log(max(energy, FLT_EPSILON))


def num_frames(num_samples: int) -> int:
    """Frames with ``snip_edges``: only whole 25 ms windows count, none for a clip shorter than one."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def _mel(f: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(f / 700.0)


@functools.lru_cache(maxsize=8)
def mel_banks(num_bins: int, device: torch.device) -> torch.Tensor:
    """(N_FFT/2 + 1, num_bins) triangular filters, Kaldi's construction (equal spacing on the mel
    scale from 20 Hz to Nyquist; the Nyquist bin itself gets no weight). Cached per device."""
    fft_mel = _mel(torch.arange(N_FFT // 2 + 1, dtype=torch.float64) * (SAMPLE_RATE / N_FFT))
    lo, hi = _mel(torch.tensor(LOW_FREQ, dtype=torch.float64)), _mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))
    delta = (hi - lo) / (num_bins + 1)
    left = lo + delta * torch.arange(num_bins, dtype=torch.float64)
    center, right = left + delta, left + 2 * delta
    rising = (fft_mel[:, None] - left) / (center - left)
    falling = (right - fft_mel[:, None]) / (right - center)
    inside = (fft_mel[:, None] > left) & (fft_mel[:, None] < right)
    weights = torch.where(inside, torch.minimum(rising, falling), torch.zeros(()))
    weights[-1] = 0.0
    return weights.to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _povey_window(device: torch.device) -> torch.Tensor:
    n = torch.arange(FRAME_LENGTH, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (FRAME_LENGTH - 1))).pow(0.85).to(device)


def kaldi_fbank(
    waves: torch.Tensor, lengths: torch.Tensor, num_bins: int = 80
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) float waveforms in [-1, 1] + (B,) host sample counts -> (B, F, num_bins)
    log-mel fbank (float32) and (B,) frame counts. Frames past a clip's end are zero; the computation
    is on ``waves``' device, on int16-scale samples (FireRedASR's convention)."""
    frames = torch.tensor([num_frames(int(n)) for n in lengths.tolist()], dtype=torch.long)
    width = int(frames.max()) if len(frames) else 0
    b = waves.shape[0]
    if width == 0:
        return waves.new_zeros((b, 0, num_bins), dtype=torch.float32), frames
    need = FRAME_LENGTH + (width - 1) * FRAME_SHIFT
    # Framing and FFT in float64: torch's float32 FFT is less accurate than kaldi-native-fbank's, and
    # a mel bin fed by one or two FFT bins of a near-null in the spectrum shows it (log errors of 1e-2
    # on noise; 6e-4 in float64). A few MFLOP per second of audio: cheap beside the encoder, on any device.
    x = waves.double() * INT16_SCALE
    if x.shape[1] < need:
        x = torch.nn.functional.pad(x, (0, need - x.shape[1]))
    x = x[:, :need].unfold(1, FRAME_LENGTH, FRAME_SHIFT)  # (B, F, 400)
    x = x - x.mean(-1, keepdim=True)  # DC offset removal
    x = torch.cat([x[..., :1] * (1 - PREEMPH), x[..., 1:] - PREEMPH * x[..., :-1]], dim=-1)
    x = x * _povey_window(x.device)
    power = torch.fft.rfft(x, n=N_FFT).abs().pow(2).float()  # (B, F, 257)
    feats = (power @ mel_banks(num_bins, x.device)).clamp_min(LOG_FLOOR).log()
    real = torch.arange(width, device=x.device)[None, :] < frames.to(x.device, non_blocking=True)[:, None]
    return feats * real[..., None], frames


def read_kaldi_matrix(path: Path) -> torch.Tensor:
    """A Kaldi matrix file (binary ``\\0B`` FM/DM or text ``[ ... ]``, optionally behind an ark key)."""
    data = path.read_bytes()
    start = data.find(b"\0B")
    bracket = data.find(b"[")
    if start >= 0 and (bracket < 0 or start < bracket):
        return _binary_matrix(path, data[start + 2:])
    if bracket >= 0:
        end = data.find(b"]", bracket)
        if end < 0:
            raise BackboneError(f"{path}: text Kaldi matrix without its closing ']'")
        rows = [r.split() for r in data[bracket + 1 : end].decode("ascii", "replace").splitlines() if r.split()]
        try:
            values = [[float(v) for v in r] for r in rows]
        except ValueError:
            raise BackboneError(f"{path}: text Kaldi matrix holds something that is not a number") from None
        if not values or len({len(r) for r in values}) != 1:
            raise BackboneError(f"{path}: text Kaldi matrix with ragged or no rows")
        return torch.tensor(values, dtype=torch.float64)
    raise BackboneError(f"{path}: not a Kaldi matrix (neither binary '\\0B' nor text '[')")


def _binary_matrix(path: Path, body: bytes) -> torch.Tensor:
    kinds = {b"FM ": (torch.float32, 4), b"DM ": (torch.float64, 8)}
    if body[:3] not in kinds or len(body) < 13 or body[3:4] != b"\4" or body[8:9] != b"\4":
        raise BackboneError(f"{path}: binary Kaldi object is not a float or double matrix (FM/DM)")
    dtype, size = kinds[body[:3]]
    rows, cols = struct.unpack("<i", body[4:8])[0], struct.unpack("<i", body[9:13])[0]
    payload = body[13 : 13 + rows * cols * size]
    if rows < 0 or cols < 0 or len(payload) != rows * cols * size:
        raise BackboneError(f"{path}: binary Kaldi matrix truncated ({rows}x{cols} expected)")
    return torch.frombuffer(bytearray(payload), dtype=dtype).reshape(rows, cols).double()


def load_cmvn(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Global CMVN from Kaldi stats (row 0: sums and the frame count last; row 1: sums of squares)
    -> (means, inverse standard deviations), float32 (D,), variances floored at 1e-20 as FireRedASR does."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such CMVN file (FireRedASR ships cmvn.ark beside model.pth.tar)")
    stats = read_kaldi_matrix(path)
    if stats.ndim != 2 or stats.shape[0] != 2 or stats.shape[1] < 2:
        raise BackboneError(f"{path}: CMVN stats must be a 2 x (D+1) matrix, got {tuple(stats.shape)}")
    count = float(stats[0, -1])
    if count < 1:
        raise BackboneError(f"{path}: CMVN stats count {count} < 1")
    mean = stats[0, :-1] / count
    var = (stats[1, :-1] / count - mean * mean).clamp_min(1e-20)
    return mean.float(), var.rsqrt().float()
