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
