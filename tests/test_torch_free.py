"""The onnxruntime command lines run with torch unimportable: `steermoe infer --backend onnxruntime`
and `steermoe serve --backend onnxruntime` on an exported folder, each in a process whose first
act is to block every ``import torch`` (an import hook), as on a machine where torch was never
installed. The export itself is built with torch, once, before anything is blocked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tiny_recipe_dict, tone_clip
from typer.testing import CliRunner

from steermoe_cli.main import app

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Runs the CLI (argv after `-c CODE`) with torch blocked; every blocked attempt is printed with the
# stack that made it, so a failure names the import chain that pulled torch in.
BLOCK_TORCH = textwrap.dedent("""
    import sys, traceback

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                print("blocked import of " + name + ":\\n" + "".join(traceback.format_stack()), file=sys.stderr)
                raise ModuleNotFoundError("No module named " + repr(name) + " (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    from steermoe_cli.main import app
    sys.argv = ["steermoe", *sys.argv[1:]]
    app()
""")


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "STEERMOE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("STEERMOE_API_KEY", None)
    return env


def _without_torch(args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, timeout=timeout, env=_env(tmp))


@pytest.fixture(scope="module")
def export(backbones, tmp_path_factory) -> Path:
    """A tiny checkpoint with a random adapter, exported by `steermoe export --onnx` (torch is needed here)."""
    import torch

    from steermoe_core.config import recipe_from_dict
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint

    recipe = recipe_from_dict(tiny_recipe_dict(backbones))
    ckpt = save_checkpoint(build_model(recipe.model, torch.device("cpu")), recipe, tmp_path_factory.mktemp("nt-ckpt") / "ckpt", 0, {})
    out = tmp_path_factory.mktemp("nt-export") / "model"
    r = CliRunner().invoke(app, ["export", str(ckpt), "--onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nt-clips") / "clip.wav"
    sf.write(path, tone_clip(2, 1.0), 16000, subtype="FLOAT")
    return path


def test_the_block_works(tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH.replace("from steermoe_cli.main import app", "import torch")],
                       capture_output=True, text=True, timeout=60, env=_env(tmp_path))
    assert r.returncode != 0 and "blocked import of torch" in r.stderr


def test_infer_with_onnxruntime_runs_without_torch(export, clip, tmp_path):
    r = _without_torch(["infer", "--backend", "onnxruntime", "--model", str(export), str(clip), "--format", "json",
                        "--max-new-tokens", "5"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "blocked import" not in r.stderr, r.stderr[-3000:]  # no optional path tried it either
    (rec,) = json.loads(r.stdout)
    assert rec["error"] is None and rec["text"] and rec["segments"], rec
    assert "1 file(s) done" in r.stderr and "real time" in r.stderr


def test_infer_on_silence_without_torch_reports_no_speed(export, tmp_path):
    """10 minutes of low noise and a 0.05 s clip: no speech found in either, and no real-time factor
    made of next to no model time."""
    noise, short = tmp_path / "noise.wav", tmp_path / "short.wav"
    sf.write(noise, (np.random.RandomState(0).randn(16000 * 600) * 0.001).astype(np.float32), 16000)
    sf.write(short, (np.random.RandomState(1).randn(800) * 0.1).astype(np.float32), 16000)
    r = _without_torch(["infer", "--backend", "onnxruntime", "--model", str(export), str(noise), str(short),
                        "--format", "jsonl"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["warnings"] for rec in recs] == [["no speech found"]] * 2 and not any(rec["segments"] for rec in recs)
    assert "2 file(s) done, 0.17 h of audio, no speech was decoded, 0 failed" in r.stderr, r.stderr[-3000:]
    assert "real time" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_onnxruntime_runs_without_torch(export, clip, tmp_path):
    """Started as a user starts it (under two served model names), healthy, one transcription through
    the openai client by the name code written for OpenAI uses, then SIGTERM: exit 0."""
    import urllib.request

    openai = pytest.importorskip("openai")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", BLOCK_TORCH, "serve", "--backend", "onnxruntime", "--model", str(export),
                                 "--port", str(port), "--device", "cpu", "--max-new-tokens", "5",
                                 "--served-model-name", "whisper-1", "--served-model-name", "steermoe"],
                                stdout=f, stderr=subprocess.STDOUT, env=_env(tmp_path))
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 180, "never healthy:\n" + log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/health", timeout=10) as resp:
                    if resp.status == 200:
                        break
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["whisper-1", "steermoe"]
        with open(clip, "rb") as f:
            assert client.audio.transcriptions.create(model="whisper-1", file=f).text
        with urllib.request.urlopen(base + "/health", timeout=10) as resp:
            assert json.loads(resp.read())["model"] == "whisper-1"  # the first name is the one reported
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "blocked import" not in log.read_text(), log.read_text()[-3000:]


def test_an_empty_served_model_name_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "none"), "--served-model-name", "whisper-1", "--served-model-name", " "])
    assert r.exit_code == 2 and "--served-model-name needs a non-empty name" in r.stderr, r.output
