"""FireRedASR front end: our batched torch fbank + CMVN against kaldi-native-fbank clip by clip.

FireRedASR computes features with kaldi-native-fbank one clip at a time on the host (a Python list
of samples per clip). Ours runs the same arithmetic on a right-padded batch in torch on the model's
device. This prints seconds of audio featurised per second of wall time for both on LibriSpeech-
shaped clips, and the largest absolute difference between them.

    python benchmarks/conformer_features.py [--utterances 64] [--batch 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from steermoe_core.data.batch import pad_clips
from steermoe_core.encoders.fbank import kaldi_fbank


def clips(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    durs = np.clip(rng.gamma(shape=6.0, scale=12.7 / 6.0, size=n), 1.0, 30.0)
    return [(np.round(0.1 * rng.standard_normal(int(d * 16000)) * 32767) / 32768).astype(np.float32) for d in durs]


def knf_fbank(wave: np.ndarray) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, (wave * 32768).tolist())
    return np.vstack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utterances", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = sorted(clips(args.utterances), key=len)  # length-bucketed, as training batches are
    audio_s = sum(len(c) for c in data) / 16000
    device = torch.device(args.device)

    t0 = time.perf_counter()
    ref = [knf_fbank(c) for c in data]
    knf_s = time.perf_counter() - t0

    batches = [pad_clips(data[i : i + args.batch]) for i in range(0, len(data), args.batch)]
    kaldi_fbank(batches[0][0][:1].to(device), batches[0][1][:1])  # warm-up (filters, FFT plans)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = [kaldi_fbank(w.to(device), n) for w, n in batches]
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch_s = time.perf_counter() - t0

    diff = 0.0
    for (feats, frames), start in zip(ours, range(0, len(data), args.batch)):
        for j in range(len(frames)):
            diff = max(diff, float(np.abs(feats[j, : frames[j]].cpu().numpy() - ref[start + j]).max()))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{args.utterances} clips, {audio_s:.0f} s of audio, batch {args.batch}")
    print(f"kaldi-native-fbank, clip by clip: {knf_s:.2f} s ({audio_s / knf_s:.0f}x real time)")
    print(f"torch batched:                    {torch_s:.2f} s ({audio_s / torch_s:.0f}x real time, {knf_s / torch_s:.1f}x faster)")
    print(f"largest |difference| of log-mel: {diff:.2e}")


if __name__ == "__main__":
    main()
