"""`steermoe serve` under load, on loopback: throughput, latency and the server's memory.

    python benchmarks/serve_load.py                      # the shipped model, 1 / 4 / 16 clients
    python benchmarks/serve_load.py --soak 1000          # + 1,000 requests, 10% corrupt uploads
    python benchmarks/serve_load.py --clients 1,16 --seconds 120 --soak 1000 --soak-model CKPT

For each server (batching with --max-batch 8, then --max-batch 1) and each client count C, C
threads send short clips (flite speech) through the official `openai` client until --requests
answers or --seconds have passed. Printed per row: throughput in audio seconds per wall second
(and per CPU second the server used: the figure that holds when other work shares the cores),
p50/p95 latency, the server's peak RSS (VmHWM). Then the same clip through the Python API that
`steermoe infer` runs (load once, transcribe one file, steady state): the 1-client p50 compares
to it. --soak: every request must be answered (200, or 400 for the corrupt ones), the server's
RSS after the last within 1.2x of after the first 100, and no traceback in its log.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used: the work done, whatever else shares the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_server(model: str | None, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "steermoe_cli", "serve", "--port", str(port), "--max-batch", str(max_batch), "--device", "cpu"]
    if model:
        cmd += ["--model", model]
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800  # a first use exports the checkpoint: minutes on a busy CPU
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    stop(proc)  # never left running
    raise SystemExit(f"server never became healthy in 30 minutes:\n{log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(120)


def make_clips(folder: Path) -> list[tuple[Path, float]]:
    import soundfile as sf

    lines = ["the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
             "please call stella and ask her to bring these things", "one two three four five six seven"]
    out = []
    for i, text in enumerate(lines):
        p = folder / f"clip{i}.wav"
        subprocess.run(["flite", "-t", text, "-o", str(p)], check=True)
        out.append((p, sf.info(str(p)).duration))
    return out


def load(base: str, clips: list[tuple[Path, float]], clients: int, requests: int, seconds: float, pid: int) -> dict:
    """C clients until ``requests`` answers or ``seconds``: a request still running then is cut
    (its client hangs up; the server drops its work) and not counted."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    latencies: list[float] = []
    audio = [0.0]
    lock = threading.Lock()
    t0 = time.perf_counter()
    cpu0 = cpu_s(pid)
    sent = [0]

    def worker(k: int) -> None:
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() - t0 > seconds:
                    return
                i = sent[0]
                sent[0] += 1
            path, dur = clips[(i + k) % len(clips)]
            s = time.perf_counter()
            left = seconds - (s - t0)
            try:
                with open(path, "rb") as f:
                    client.with_options(timeout=max(1.0, left)).audio.transcriptions.create(model="steermoe", file=f)
            except openai.APITimeoutError:
                return
            with lock:
                latencies.append(time.perf_counter() - s)
                audio[0] += dur

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort() if latencies else latencies.append(float("nan"))
    return {"clients": clients, "requests": len(latencies), "audio_s_per_s": audio[0] / wall,
            "audio_s_per_cpu_s": audio[0] / max(cpu_s(pid) - cpu0, 1e-9),
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "peak_rss_mb": rss_mb(pid, "VmHWM")}


def infer_p50(model: str | None, clips: list[Path], repeats: int) -> float:
    """The same clips, one file at a time, through the API `steermoe infer` runs, on the backend it
    picks (``inference.choice.backend_for``, as the server does), model loaded once (what a server saves)."""
    code = f"""
import time, statistics
from steermoe_core.inference.choice import backend_for
from steermoe_core.inference import SteerMoE, default_model_path
clips = {[str(c) for c in clips]!r}
path, backend = backend_for({model!r} or default_model_path(), "auto", "cpu", say=lambda line: None)
sm = SteerMoE.load(path, "cpu", backend=backend)
sm.transcribe([clips[0]])
ts = []
for i in range({repeats}):
    t = time.perf_counter(); sm.transcribe([clips[i % len(clips)]]); ts.append(time.perf_counter() - t)
print(statistics.median(ts))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def soak(base: str, clips: list[tuple[Path, float]], n: int, pid: int, log: Path, clients: int = 4) -> dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    corrupt = Path(tempfile.mkdtemp()) / "corrupt.wav"
    rng = random.Random(0)
    plan = [rng.random() < 0.1 for _ in range(n)]
    wrong: list[str] = []
    rss = {}
    done = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        bad = plan[i]
        if bad:
            data = b"RIFF\x00\x00\x00\x00WAVE" + bytes(rng.getrandbits(8) for _ in range(64))
            name = f"corrupt{i}.wav"
        else:
            data, name = clips[i % len(clips)][0].read_bytes(), clips[i % len(clips)][0].name
        try:
            client.audio.transcriptions.create(model="steermoe", file=(name, data))
            if bad:
                wrong.append(f"{i}: corrupt upload answered 200")
        except openai.BadRequestError:
            if not bad:
                wrong.append(f"{i}: good upload answered 400")
        except Exception as e:  # noqa: BLE001 - any other answer is wrong
            wrong.append(f"{i}: {type(e).__name__}: {e}")
        with lock:
            done[0] += 1
            if done[0] == 100:
                rss["after_100_mb"] = rss_mb(pid)
    del corrupt
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    rss["after_last_mb"] = rss_mb(pid)
    text = log.read_text()
    return {"requests": n, "corrupt": sum(plan), "wrong": wrong[:5], "n_wrong": len(wrong), **rss,
            "rss_ratio": rss["after_last_mb"] / rss["after_100_mb"], "tracebacks_in_log": text.count("Traceback")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: what `steermoe infer` uses (the shipped model)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=48, help="answers per client count (bounded count)")
    ap.add_argument("--seconds", type=float, default=90.0, help="time per client count (bounded time)")
    ap.add_argument("--soak", type=int, default=0, help="then this many requests, 10%% corrupt, on a batching server")
    ap.add_argument("--soak-model", default=None, help="the soak's model (default: --model)")
    ap.add_argument("--infer-repeats", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    clips = make_clips(work)
    print(f"clips: {len(clips)} flite utterances of {min(d for _, d in clips):.1f}-{max(d for _, d in clips):.1f} s", flush=True)
    rows = []
    for max_batch in (8, 1):
        log = work / f"server-b{max_batch}.log"
        proc, base = start_server(args.model, max_batch, log)
        load(base, clips, 1, 2, 60, proc.pid)  # warm-up
        for c in [int(x) for x in args.clients.split(",")]:
            r = load(base, clips, c, args.requests, args.seconds, proc.pid)
            r["max_batch"] = max_batch
            rows.append(r)
            print(f"max_batch {max_batch:>2}  clients {c:>2}: {r['requests']:>3} requests, {r['audio_s_per_s']:.2f} audio s/s "
                  f"({r['audio_s_per_cpu_s']:.2f} per server CPU s), "
                  f"p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, server peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        print(f"server exit code after SIGTERM: {stop(proc)}", flush=True)
    by = {(r["max_batch"], r["clients"]): r for r in rows}
    top = max(int(x) for x in args.clients.split(","))
    if (8, top) in by and (1, top) in by:
        print(f"batching speed-up at {top} clients: {by[(8, top)]['audio_s_per_s'] / by[(1, top)]['audio_s_per_s']:.2f}x wall, "
              f"{by[(8, top)]['audio_s_per_cpu_s'] / by[(1, top)]['audio_s_per_cpu_s']:.2f}x per server CPU second", flush=True)
    p50 = infer_p50(args.model, [p for p, _ in clips], args.infer_repeats)
    if (8, 1) in by:
        print(f"infer API on the same clips: p50 {p50:.3f} s; serve 1 client p50 {by[(8, 1)]['p50_s']:.3f} s "
              f"({by[(8, 1)]['p50_s'] / p50:.2f}x)", flush=True)
    if args.soak:
        log = work / "server-soak.log"
        proc, base = start_server(args.soak_model or args.model, 8, log)
        s = soak(base, clips, args.soak, proc.pid, log)
        print(f"soak ({args.soak_model or args.model or 'shipped model'}): {s['requests']} requests ({s['corrupt']} corrupt): "
              f"{s['n_wrong']} answered wrongly {s['wrong']}; RSS {s['after_100_mb']:.0f} MB after 100 -> "
              f"{s['after_last_mb']:.0f} MB after the last ({s['rss_ratio']:.2f}x); tracebacks in the log: {s['tracebacks_in_log']}; "
              f"exit code after SIGTERM: {stop(proc)}", flush=True)


if __name__ == "__main__":
    main()
