"""Live transcription (``WS /v1/realtime?intent=transcription``) against ``/v1/audio/transcriptions``.

    python benchmarks/realtime.py                              # the shipped model, default backend
    python benchmarks/realtime.py --repeats 5 --sessions 8 --hold 60 --model CKPT

1. Latency: flite (voice ``awb``) reads held-out Harvard sentences, joined 1 to 4 at a time so the
   utterances last about 2 to 10 s. Each clip goes through the official `openai` client to
   ``/v1/audio/transcriptions`` (request to answer), and through a realtime session with manual
   commits (``turn_detection: null``): the clip is streamed as 24 kHz PCM16 in 100 ms appends as fast
   as the socket takes them, then committed; timed from the commit to ``...transcription.completed``.
   Printed: p50 / p95 per length, the ratio to the HTTP route, and whether both transcripts agree.
2. Hold: N sessions (server VAD, its defaults) stream single-sentence clips in real time (100 ms of
   audio every 100 ms), each followed by 1.5 s of silence, for ``--hold`` seconds; then every
   session waits for its last transcripts. Every utterance sent must come back exactly once as
   ``committed`` and ``completed``, with text; printed with the latency from ``speech_stopped`` to
   ``completed`` as the client saw it and the server's own /metrics histogram means.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server, stop  # noqa: E402

from steermoe_core.inference.live import float_to_pcm16, resample  # noqa: E402

RATE = 24_000
HARVARD = Path(__file__).resolve().parents[1] / "steermoe_core" / "demo" / "data" / "harvard.txt"


def make_clips(folder: Path, groups: int, sizes: tuple = (1, 2, 3, 4), first: int = 0) -> list[dict]:
    """Harvard sentences from ``first`` on (the demo's held-out test pool is the first 40), joined
    ``sizes`` at a time, ``groups`` clips per size: flite voice awb, 16 kHz WAV."""
    sentences = [s.strip() for s in HARVARD.read_text().splitlines() if s.strip()]
    out, k = [], first
    for size in sizes:
        for g in range(groups):
            text = " ".join(sentences[k : k + size])
            k += size
            p = folder / f"h{first}_{size}_{g}.wav"
            subprocess.run(["flite", "-voice", "awb", "-t", text, "-o", str(p)], check=True)
            audio, sr = sf.read(str(p), dtype="float32")
            pcm24 = float_to_pcm16(resample(audio, sr, RATE))
            p24 = folder / f"h{first}_{size}_{g}_24k.wav"  # the samples streamed live, as the HTTP route's upload
            sf.write(str(p24), np.frombuffer(pcm24, "<i2"), RATE, subtype="PCM_16")
            out.append({"path": p24, "size": size, "seconds": len(audio) / sr, "pcm24": pcm24, "text": text})
    return out


def chunks(pcm: bytes, ms: int = 100) -> list[str]:
    n = RATE * 2 * ms // 1000
    return [base64.b64encode(pcm[i : i + n]).decode() for i in range(0, len(pcm), n)]


def http_once(client, clip: dict) -> tuple[float, str]:
    with open(clip["path"], "rb") as f:
        data = f.read()
    t = time.perf_counter()
    text = client.audio.transcriptions.create(model="steermoe", file=(clip["path"].name, data)).text
    return time.perf_counter() - t, text


def live_once(ws_base: str, clip: dict) -> tuple[float, str]:
    from websockets.sync.client import connect

    with connect(ws_base + "/v1/realtime?intent=transcription", max_size=None) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription",
                                                                  "audio": {"input": {"turn_detection": None}}}}))
        ws.recv(timeout=30)
        for piece in chunks(clip["pcm24"]):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
        t = time.perf_counter()
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        while True:
            ev = json.loads(ws.recv(timeout=300))
            if ev["type"] == "conversation.item.input_audio_transcription.completed":
                return time.perf_counter() - t, ev["transcript"]
            if ev["type"] in ("error", "conversation.item.input_audio_transcription.failed"):
                raise SystemExit(f"live transcription failed: {ev}")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def latency(base: str, clips: list[dict], repeats: int) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    ws_base = base.replace("http", "ws", 1)
    http_once(client, clips[0])
    live_once(ws_base, clips[0])  # warm both paths
    rows = []
    for size in (1, 2, 3, 4):
        group = [c for c in clips if c["size"] == size]
        h, live, same, total, differ = [], [], 0, 0, []
        for _ in range(repeats):
            for c in group:  # alternate, so both routes see the same load
                th, text_h = http_once(client, c)
                tl, text_l = live_once(ws_base, c)
                h.append(th)
                live.append(tl)
                same += text_h == text_l
                total += 1
                if text_h != text_l and len(differ) < 2:
                    differ.append((text_h, text_l))
        rows.append({"sentences": size, "seconds": statistics.mean(c["seconds"] for c in group), "n": total,
                     "http_p50": pct(h, 50), "http_p95": pct(h, 95), "live_p50": pct(live, 50), "live_p95": pct(live, 95),
                     "ratio_p50": pct(live, 50) / pct(h, 50), "same_text": f"{same}/{total}",
                     "differ": differ})
    return rows


def hold(base: str, clips: list[dict], sessions: int, seconds: float) -> dict:
    """``sessions`` real-time streams of utterances and silences under server VAD."""
    from websockets.sync.client import connect

    ws_base = base.replace("http", "ws", 1)
    gap = float_to_pcm16(np.zeros(int(RATE * 1.5), np.float32))
    results: list[dict] = [{} for _ in range(sessions)]

    def one(k: int) -> None:
        sent = committed = completed = empty = 0
        stopped_at: dict[str, float] = {}
        lat: list[float] = []
        lock = threading.Lock()
        with connect(ws_base + "/v1/realtime?intent=transcription", max_size=None) as ws:
            ws.recv(timeout=30)

            def reader() -> None:
                nonlocal committed, completed, empty
                try:
                    while True:
                        ev = json.loads(ws.recv())
                        with lock:
                            if ev["type"] == "input_audio_buffer.speech_stopped":
                                stopped_at[ev["item_id"]] = time.perf_counter()
                            elif ev["type"] == "input_audio_buffer.committed":
                                committed += 1
                            elif ev["type"] == "conversation.item.input_audio_transcription.completed":
                                completed += 1
                                empty += not ev["transcript"].strip()
                                if ev["item_id"] in stopped_at:
                                    lat.append(time.perf_counter() - stopped_at[ev["item_id"]])
                            elif ev["type"] in ("error", "conversation.item.input_audio_transcription.failed"):
                                results[k].setdefault("errors", []).append(ev["error"].get("code"))
                except Exception:  # the socket closed
                    return

            t_read = threading.Thread(target=reader, daemon=True)
            t_read.start()
            t0 = time.perf_counter()
            i = k  # sessions start on different clips
            sent_s = 0.0
            while time.perf_counter() - t0 < seconds:
                clip = clips[i % len(clips)]
                i += 1
                for piece in chunks(clip["pcm24"] + gap):
                    sent_s += 0.1
                    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
                    time.sleep(max(0.0, t0 + sent_s - time.perf_counter()))  # real time
                sent += 1
            deadline = time.perf_counter() + 120
            while time.perf_counter() < deadline:
                with lock:
                    if completed >= sent:
                        break
                time.sleep(0.2)
        results[k].update({"sent": sent, "committed": committed, "completed": completed, "empty": empty, "latency": lat})

    threads = [threading.Thread(target=one, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = [x for r in results for x in r["latency"]]
    return {"sessions": sessions, "seconds": seconds, "sent": sum(r["sent"] for r in results),
            "committed": sum(r["committed"] for r in results), "completed": sum(r["completed"] for r in results),
            "empty": sum(r["empty"] for r in results), "errors": [c for r in results for c in r.get("errors", [])],
            "lost_sessions": [k for k, r in enumerate(results) if r["completed"] != r["sent"] or r["committed"] != r["sent"]],
            "stop_to_completed_p50": pct(lat, 50) if lat else None, "stop_to_completed_p95": pct(lat, 95) if lat else None}


def server_sums(base: str) -> dict:
    """The server's realtime histograms' (sum, count), from /metrics."""
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("steermoe_realtime_")}
    return {name: (vals.get(f"steermoe_realtime_{name}_seconds_sum", 0.0), vals.get(f"steermoe_realtime_{name}_seconds_count", 0.0))
            for name in ("first_delta", "completed")}


def means_between(before: dict, after: dict) -> dict:
    """Mean seconds of the utterances observed between two ``server_sums``."""
    out = {}
    for name, (s1, n1) in after.items():
        s0, n0 = before[name]
        out[name] = round((s1 - s0) / (n1 - n0), 3) if n1 > n0 else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint or exported folder (default: the shipped model)")
    ap.add_argument("--groups", type=int, default=2, help="clips per size (1-4 sentences)")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the clips for the latency table (0: skip it)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--hold", type=float, default=60.0, help="seconds each live session streams")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="realtime-bench-"))
    clips = make_clips(folder, args.groups)
    print("clips:", ", ".join(f"{c['seconds']:.1f}s" for c in clips), flush=True)
    proc, base = start_server(args.model, 8, folder / "server.log")
    try:
        for r in latency(base, clips, args.repeats) if args.repeats > 0 else []:
            print(f"{r['sentences']} sentence(s), {r['seconds']:.1f} s, n={r['n']}: HTTP p50 {r['http_p50']:.2f} s p95 "
                  f"{r['http_p95']:.2f} s | live commit->completed p50 {r['live_p50']:.2f} s p95 {r['live_p95']:.2f} s | "
                  f"ratio {r['ratio_p50']:.2f} | same text {r['same_text']}", flush=True)
            for text_h, text_l in r["differ"]:
                print(f"    HTTP: {text_h!r}\n    live: {text_l!r}", flush=True)
        hold_clips = make_clips(folder, args.sessions, (1,), first=20)
        before = server_sums(base)
        h = hold(base, hold_clips, args.sessions, args.hold)
        print(json.dumps({**h, "server_means_during_hold": means_between(before, server_sums(base))}), flush=True)
    finally:
        code = stop(proc)
    log = (folder / "server.log").read_text()
    print(f"server exit code {code}; traceback in its log: {'Traceback' in log}")


if __name__ == "__main__":
    main()
