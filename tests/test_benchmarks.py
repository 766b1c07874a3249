"""The benchmark scripts' CPU smoke modes run and print their figures (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script,args,expect", [
    ("train_step.py", ["--smoke"], ["samples_per_s", "tflop_per_sample", "mfu", "encoder_steering_bwd"]),
    ("train_memory.py", ["--smoke"], ["new shape every step: RSS", "padded to 1 s / 8 tokens: RSS", "growth_mb_per_step"]),
    ("infer.py", ["--smoke"], ["single_stream_decode_tokens_per_s", "batched_real_time_factor"]),
    ("prep_throughput.py", ["--utterances", "30", "--workers", "1"], ["real-time factor", "MB per hour"]),
    ("onnx_vs_torch.py", ["--smoke", "--threads", "1", "--repeats", "1"], ["export onnxruntime fp32", "real_time_factor", "identical to torch 8/8"]),
    ("infer_cpu.py", ["--smoke", "--threads", "1"], ["steermoe onnxruntime", "whisper tiny.en decoder", "real_time_factor",
                                                     "same text as torch 8/8", "the speed of Whisper's own decoder"]),
])
def test_benchmark_smoke(script, args, expect):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for word in expect:
        assert word in r.stdout


def test_gpu_only_benchmark_says_so_on_a_cpu():
    """attention_backends.py compares CUDA attention backends: on a CPU it stops with one line, not a traceback.
    Any GPU is hidden from the script, so this runs on every machine instead of being skipped on one with a GPU."""
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(BENCH / "attention_backends.py")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and r.stderr.strip() == "attention_backends.py: needs a CUDA GPU (cuDNN attention exists only there)"


def test_ctc_heads_reads_what_the_model_reads(backbones, tiny_data, tmp_path):
    """ctc_heads.py trains heads on frames it encodes once: through the checkpoint's own projector those
    frames must give the audio tokens the model gives, and its table must come out for every head."""
    import importlib.util

    import torch

    from conftest import train_tiny
    from steermoe_core.data.dataset import ShardedDataset, collate
    from steermoe_core.model.checkpoint import load_checkpoint

    ck = train_tiny(backbones, tiny_data, tmp_path / "run", 10)
    spec = importlib.util.spec_from_file_location("ctc_heads", BENCH / "ctc_heads.py")
    heads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heads)
    model, _, _ = load_checkpoint(ck, torch.device("cpu"))
    ds = ShardedDataset(tiny_data)
    items = heads.encode(model, ds, len(ds))
    with torch.no_grad():
        audio, counts = heads.tokens(model, model.adapter.projector, model.cfg.projector.pooling, items)
        batch = collate([ds[i] for i in range(len(ds))], "")
        want = model.audio_tokens(batch.waves, batch.lengths)
    assert counts == model.audio_token_counts(batch.lengths)
    for k, n in enumerate(counts):
        torch.testing.assert_close(audio[k, :n], want[k, :n], rtol=2e-2, atol=2e-3)  # frames are kept in fp16

    r = subprocess.run([sys.executable, str(BENCH / "ctc_heads.py"), "--checkpoint", str(ck), "--train", str(tiny_data),
                        "--clips", "4", "--data", f"tones={tiny_data}", "--steps", "3", "--batch", "2", "--hidden", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("| checkpoint, untrained |", "| checkpoint | 4 |", "| linear | 4 |", "| mlp | 4 |"):
        assert row in r.stdout


def test_ctc_noise_fit_prints_both_error_profiles_and_reuses_its_read_outs(backbones, tiny_data, tmp_path):
    """ctc_noise_fit.py: the checkpoint's read-out and the error model side by side; with --readouts the
    second run reads the saved read-outs instead of encoding again, and the error model follows --noise."""
    from conftest import train_tiny

    ck = train_tiny(backbones, tiny_data, tmp_path / "run", 3)
    saved = tmp_path / "readouts.json"

    def run(*extra):
        r = subprocess.run([sys.executable, str(BENCH / "ctc_noise_fit.py"), "--checkpoint", str(ck), "--data", str(tiny_data),
                            "--clips", "4", "--readouts", str(saved), *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    first = run()
    assert saved.is_file() and '"clips": 4' in first and "read-out" in first and "simulated" in first
    lines = {ln.split()[0]: [float(x) for x in ln.split()[1:]] for ln in run("--noise", "clean=1").splitlines()[2:]}
    assert lines["simulated"][0] == 0.0 and lines["simulated"][4] == 1.0  # every row clean: no errors
    bad = subprocess.run([sys.executable, str(BENCH / "ctc_noise_fit.py"), "--checkpoint", str(ck), "--data", str(tiny_data),
                          "--noise", "cleen=1"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no such setting" in bad.stderr and "Traceback" not in bad.stderr
