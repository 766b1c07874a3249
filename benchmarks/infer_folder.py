"""Batch transcription of a whole folder through `steermoe infer`: does memory grow with the folder?

    python benchmarks/infer_folder.py --clips 200 2000 --seconds 2     # many short files
    python benchmarks/infer_folder.py --clips 10 100 --seconds 600     # long recordings
    python benchmarks/infer_folder.py --clips 100 400 --seconds 1 20   # every clip a different length
    ... --model CKPT --pad-seconds 0                                   # without padded batches

Builds a tiny random model (or takes --model CKPT), writes N synthetic clips, runs the real CLI in a
subprocess with `--format jsonl --out`, and prints, per folder size: peak RSS of the infer process,
time to the first output line, wall time and files per second. ``--pad-seconds`` runs a copy of the
checkpoint whose recipe sets ``data.pad_multiple_seconds`` (what eval and infer pad batches to).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def tiny_checkpoint(root: Path) -> Path:
    from steermoe_core.config import recipe_from_dict
    from steermoe_core.data.prep.shards import Row, write_manifest, write_shard
    from steermoe_core.testing.random_backbones import write_llm, write_whisper
    from steermoe_core.training.loop import train

    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = [Row(f"u{i}", (rng.standard_normal(16000) * 0.1).astype(np.float32), "hello world") for i in range(4)]
    write_manifest(data, "bench", "train", {"s.parquet": write_shard(rows, data / "s.parquet")}, [])
    recipe = recipe_from_dict({
        "model": {"encoder": {"path": str(write_whisper(root / "whisper"))}, "llm": {"path": str(write_llm(root / "llm"))}},
        "data": {"train": str(data), "batch_size": 4, "num_workers": 0},
        "train": {"max_steps": 2, "device": "cpu", "warmup_steps": 1},
    })
    return train(recipe, root / "run").model_dir


def with_padding(ckpt: Path, seconds: float, root: Path) -> Path:
    """A copy of the checkpoint whose recipe pads batches to a multiple of ``seconds`` (0 = off)."""
    from steermoe_core.config import dump_recipe, load_recipe

    out = root / f"model-pad{seconds:g}"
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("recipe.toml"))
    (out / "recipe.toml").write_text(dump_recipe(load_recipe(ckpt / "recipe.toml", [f"data.pad_multiple_seconds={seconds}"])))
    return out


def write_clips(folder: Path, n: int, seconds: list[float]) -> None:
    """``seconds``: one length for every clip, or [low, high] to draw each clip's length uniformly."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        length = seconds[0] if len(seconds) == 1 else rng.uniform(seconds[0], seconds[1])
        t = np.arange(int(length * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 9)) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(folder / f"c{i:05d}.flac", wave.astype(np.float32), 16000)


def run(ckpt: Path, folder: Path, out: Path, batch: int, workers: int, n: int) -> dict:
    """``n``: the folder's files; the peak RSS is also read when a quarter, half, three quarters of
    them are written (growth within one run, not only between folder sizes)."""
    cmd = [sys.executable, "-m", "steermoe_cli", "infer", str(folder), "--model", str(ckpt), "--format", "jsonl",
           "--out", str(out), "--max-new-tokens", "4", "--batch-size", str(batch), "--decode-workers", str(workers), "--device", "cpu"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first, peak_kib, quarters, polls = None, 0, [], 0
    while p.poll() is None:
        if first is None and out.exists() and out.stat().st_size > 0:
            first = time.perf_counter() - t0
        peak_kib = max(peak_kib, _vm_hwm_kib(p.pid))
        polls += 1
        if polls % 10 == 0 and out.exists() and len(quarters) < 3 and out.read_bytes().count(b"\n") >= n * (len(quarters) + 1) / 4:
            quarters.append(round(peak_kib / 1024))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr.read()[-2000:])
    lines = len(out.read_text().splitlines())
    return {"files": lines, "peak_rss_mib": peak_kib / 1024, "peak_mib_at_quarters": quarters + [round(peak_kib / 1024)],
            "first_line_s": first, "wall_s": wall, "files_per_s": lines / wall}


def _vm_hwm_kib(pid: int) -> int:
    """The infer process's own peak resident memory (Linux /proc), read while it runs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.0], help="clip length, or LOW HIGH for lengths drawn uniformly")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--pad-seconds", type=float, help="override the checkpoint's data.pad_multiple_seconds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-workers", dest="workers", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if len(args.seconds) > 2:
        ap.error("--seconds takes one length or LOW HIGH")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(tempfile.mkdtemp(prefix="infer-folder-"))
    ckpt = args.model or tiny_checkpoint(root)
    if args.pad_seconds is not None:
        ckpt = with_padding(ckpt, args.pad_seconds, root)
    results = {}
    for n in sorted(args.clips):
        write_clips(root / f"clips{n}", n, args.seconds)
        results[n] = run(ckpt, root / f"clips{n}", root / f"out{n}.jsonl", args.batch, args.workers, n)
        print(f"{n:6d} clips of {'-'.join(f'{x:g}' for x in args.seconds)} s: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in results[n].items()), flush=True)
    if len(results) > 1:
        lo, hi = results[min(results)], results[max(results)]
        print(f"peak RSS ratio {max(results)}/{min(results)} clips: {hi['peak_rss_mib'] / lo['peak_rss_mib']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
