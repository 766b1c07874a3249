"""Live transcription: the utterance detector and resampler, ``WS /v1/realtime?intent=transcription``
against the official `openai` client and raw `websockets` (exact events, every error), the page's live
mode in Debian's chromium with a fake microphone, and `steermoe infer --live -`.

The tiny checkpoint reads tone chords, which Silero does not call speech: the model's policy is set to
the energy detector here, as a checkpoint's recipe (``[eval] vad``) would set it."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import shutil
import socket
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
import soundfile as sf
from conftest import tone_clip, train_tiny

from steermoe_core.audio import vad
from steermoe_core.inference.live import (
    FrameVad,
    SpeechStarted,
    SpeechStopped,
    StreamResampler,
    TurnDetection,
    UtteranceDetector,
    float_to_pcm16,
    live_utterances,
    pcm16_to_float,
    resample,
)

KEY = "rt-key-123"
TOKENS = 12
CHROMIUM = "/usr/bin/chromium"
RATE = 24_000


def tone24(idx: int, seconds: float) -> np.ndarray:
    """``conftest.tone_clip``'s chord, sampled at 24 kHz (what a realtime client sends)."""
    t = np.arange(int(RATE * seconds)) / RATE
    freqs = [200 + 150 * idx, 900 + 310 * idx, 2500 - 170 * idx]
    wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 4
    return (wave * np.hanning(len(t)) ** 0.1).astype(np.float32)


def pcm(audio: np.ndarray) -> np.ndarray:
    """``audio`` as PCM16 would carry it (the same samples on both routes)."""
    return pcm16_to_float(float_to_pcm16(audio))


def chunks_b64(audio: np.ndarray, ms: int = 100) -> list[str]:
    n = RATE * ms // 1000
    return [base64.b64encode(float_to_pcm16(audio[i : i + n])).decode() for i in range(0, len(audio), n)]


# -- the core: resampling, voice activity, utterances (no server) --
def test_resampling_is_accurate_and_a_stream_matches_the_whole_clip():
    t24, t16 = np.arange(RATE) / RATE, np.arange(16_000) / 16_000
    y = resample(np.sin(2 * np.pi * 1000 * t24).astype(np.float32), RATE)
    assert len(y) == 16_000 and np.abs(y[200:-200] - np.sin(2 * np.pi * 1000 * t16[200:-200])).max() < 1e-4
    assert len(resample(np.zeros(16_000, np.float32), 16_000, RATE)) == RATE
    noise = (np.random.default_rng(0).standard_normal(2 * RATE) * 0.1).astype(np.float32)
    stream = StreamResampler(RATE)
    pieces = np.concatenate([stream(noise[i : i + 2400]) for i in range(0, len(noise), 2400)])
    assert len(pieces) > 31_800 and np.array_equal(pieces, resample(noise, RATE)[: len(pieces)])


@pytest.mark.skipif(vad.silero_model_path() is None, reason="silero-vad is not installed")
def test_silero_frame_by_frame_gives_the_whole_recordings_probabilities():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(16_000 * 4) * 0.05).astype(np.float32)
    x[16_000:32_000] += 0.3 * np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 300).astype(np.float32)
    whole, _ = vad.speech_probs(x, "silero")
    det = FrameVad("silero")
    got = np.concatenate([det(x[i : i + 1600]) for i in range(0, len(x), 1600)])
    assert np.array_equal(got, whole[: len(got)]) and len(got) >= len(whole) - 1


def test_the_detector_cuts_each_utterance_with_padding_and_cuts_nothing_from_silence():
    gap = np.zeros(RATE, np.float32)
    stream = np.concatenate([gap, tone24(1, 1.1), gap, tone24(2, 1.4), gap])
    det = UtteranceDetector(RATE, TurnDetection(), "energy")
    events = [e for i in range(0, len(stream), 2400) for e in det.append(stream[i : i + 2400])]
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped] * 2
    first, second = events[1].utterance, events[3].utterance
    assert 690 <= events[0].audio_start_ms <= 760  # the tone starts at 1000 ms; 300 ms of prefix padding
    assert 2550 <= events[1].audio_end_ms <= 2700  # 500 ms of silence after the tone ends at 2100 ms
    assert 1.4 <= first.seconds <= 1.6 and 1.7 <= second.seconds <= 1.9 and first.end_ms <= events[1].audio_end_ms
    assert det.finish() is None and not det.speaking
    silent = UtteranceDetector(RATE, TurnDetection(), "energy")
    assert silent.append(np.zeros(3 * RATE, np.float32)) == [] and len(silent.pending) == 3 * RATE
    manual = UtteranceDetector(RATE, None)
    assert manual.append(stream) == [] and manual.commit().seconds == pytest.approx(len(stream) / RATE, abs=1e-3)
    raw = [float_to_pcm16(resample(stream, RATE, 16_000))[i : i + 3201] for i in range(0, 2 * len(stream), 3201)]
    cut = [u.seconds for u in live_utterances(raw, 16_000, method="energy")]  # the same cuts at 16 kHz, in odd-sized pieces
    assert cut == pytest.approx([first.seconds, second.seconds], abs=0.07)


# -- the route --
@pytest.fixture(scope="module")
def ckpt(backbones, tiny_data, tmp_path_factory):
    return train_tiny(backbones, tiny_data, tmp_path_factory.mktemp("realtime-run"), 40)


@pytest.fixture(scope="module")
def sm(ckpt):
    from steermoe_core.inference import SteerMoE

    model = SteerMoE.load(ckpt, "cpu")
    model.policy = dataclasses.replace(model.policy, vad="energy")
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(sm):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("websockets")
    from steermoe_core.serving.app import ServeSettings, create_app

    settings = ServeSettings(api_key=KEY, max_new_tokens=TOKENS, max_wait_ms=30)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, loaded=sm), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 60:
        with contextlib.suppress(OSError):
            if json.loads(_get(base + "/health")).get("status") == "ok":
                break
        time.sleep(0.2)
    try:
        yield {"base": base, "ws": f"ws://127.0.0.1:{port}"}
    finally:
        srv.should_exit = True
        t.join(30)


def _transcribe_http(base: str, audio: np.ndarray, rate: int) -> str:
    """What ``/v1/audio/transcriptions`` answers for ``audio`` (a WAV upload, float samples kept exact)."""
    import io

    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT" if rate == 16_000 else "PCM_16")
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="u.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(base + "/v1/audio/transcriptions", body, {
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["text"]


def _connect(server, key: str | None = KEY, **kw):
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return connect(server["ws"] + "/v1/realtime?intent=transcription", additional_headers=headers, max_size=None, **kw)


def _until(ws, kind: str, timeout: float = 120) -> list[dict]:
    """Events up to and including the first of type ``kind``."""
    out = []
    while True:
        ev = json.loads(ws.recv(timeout=timeout))
        out.append(ev)
        if ev["type"] == kind:
            return out


def test_the_official_client_streams_a_clip_in_100ms_chunks_and_gets_the_http_transcript(server):
    import openai

    audio = pcm(tone24(1, 1.1))
    client = openai.OpenAI(base_url=server["base"] + "/v1", websocket_base_url=server["ws"] + "/v1", api_key=KEY, max_retries=0)
    events = []
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None, "transcription": {"model": "steermoe"}}}})
        for piece in chunks_b64(audio):
            conn.input_audio_buffer.append(audio=piece)
        conn.input_audio_buffer.commit()
        for ev in conn:
            events.append(ev)
            if ev.type in ("conversation.item.input_audio_transcription.completed", "error"):
                break
    kinds = [e.type for e in events]
    assert kinds[:3] == ["session.created", "session.updated", "input_audio_buffer.committed"], kinds
    assert events[0].session.type == "transcription" and events[1].session.audio.input.turn_detection is None
    done = events[-1]
    assert done.type == "conversation.item.input_audio_transcription.completed"
    deltas = [e.delta for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    assert done.transcript == _transcribe_http(server["base"], audio, RATE) and "".join(deltas) == done.transcript
    assert done.transcript and deltas and done.item_id == events[2].item_id
    assert done.usage.type == "tokens" and 1 <= done.usage.output_tokens <= TOKENS


def test_server_vad_cuts_utterances_with_exact_events(server):
    gap = np.zeros(RATE, np.float32)
    stream = pcm(np.concatenate([gap, tone24(2, 1.4), gap, tone24(0, 0.8), gap]))
    local = UtteranceDetector(RATE, TurnDetection(), "energy")  # the same cut, made here
    expected = [e for i in range(0, len(stream), 2400) for e in local.append(stream[i : i + 2400])]
    with _connect(server) as ws:
        created = json.loads(ws.recv(timeout=30))
        assert created["type"] == "session.created" and created["event_id"].startswith("event_")
        assert created["session"]["type"] == "transcription" and created["session"]["audio"]["input"] == {
            "format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": None,
            "transcription": {"model": "steermoe", "language": None, "prompt": ""},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}}
        for piece in chunks_b64(stream):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
        events = _until(ws, "input_audio_buffer.committed")
        events += [e for e in _until(ws, "input_audio_buffer.committed") if True]
        finished = {}
        while len(finished) < 2:
            ev = json.loads(ws.recv(timeout=120))
            events.append(ev)
            if ev["type"].endswith(".completed"):
                finished[ev["item_id"]] = ev
    vad_events = [e for e in events if e["type"].startswith("input_audio_buffer.")]
    assert [e["type"] for e in vad_events] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                               "input_audio_buffer.committed"] * 2
    assert [e.get("audio_start_ms", e.get("audio_end_ms")) for e in vad_events if "committed" not in e["type"]] == [
        getattr(e, "audio_start_ms", None) or e.audio_end_ms for e in expected]
    first, second = vad_events[2], vad_events[5]
    assert first["previous_item_id"] is None and second["previous_item_id"] == first["item_id"]
    assert vad_events[0]["item_id"] == first["item_id"] and set(e["item_id"] for e in vad_events[3:]) == {second["item_id"]}
    for committed, stop in ((first, expected[1]), (second, expected[3])):
        done = finished[committed["item_id"]]
        deltas = "".join(e["delta"] for e in events if e["type"].endswith(".delta") and e["item_id"] == committed["item_id"])
        assert done["transcript"] == deltas == _transcribe_http(server["base"], stop.utterance.audio, 16_000)
        assert done["content_index"] == 0 and set(done["usage"]) == {"type", "input_tokens", "output_tokens", "total_tokens",
                                                                      "input_token_details"}
    metrics = _get(server["base"] + "/metrics").decode()
    assert "steermoe_realtime_completed_seconds_count" in metrics
    count = [ln for ln in metrics.splitlines() if ln.startswith("steermoe_realtime_first_delta_seconds_count")]
    assert int(count[0].split()[-1]) >= 2


def test_errors_are_openai_error_events_and_the_session_goes_on(server):
    with _connect(server) as ws:
        json.loads(ws.recv(timeout=30))

        def error(event) -> dict:
            ws.send(event if isinstance(event, str) else json.dumps(event))
            ev = json.loads(ws.recv(timeout=30))
            assert ev["type"] == "error" and set(ev["error"]) == {"type", "code", "message", "param", "event_id"}, ev
            assert ev["error"]["type"] == "invalid_request_error"
            return ev["error"]

        e = error({"type": "input_audio_buffer.commit", "event_id": "evt_1"})
        assert e["code"] == "input_audio_buffer_commit_empty" and e["event_id"] == "evt_1" and "0.00ms" in e["message"]
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunks_b64(np.zeros(RATE // 20, np.float32))[0]}))
        e = error({"type": "input_audio_buffer.commit"})  # 50 ms: under OpenAI's 100 ms
        assert e["code"] == "input_audio_buffer_commit_empty" and "50.00ms" in e["message"]
        e = error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcmu"}}}}})
        assert e["code"] == "invalid_value" and e["param"] == "session.audio.input.format"
        e = error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000}}}}})
        assert e["param"] == "session.audio.input.format" and "24 kHz" in e["message"]
        e = error({"type": "transcription_session.update", "session": {"input_audio_format": "g711_ulaw"}})
        assert e["param"] == "session.input_audio_format"
        e = error({"type": "session.update", "session": {"type": "realtime"}})
        assert e["param"] == "session.type"
        e = error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": "whisper-9"}}}}})
        assert e["code"] == "model_not_found"
        assert error({"type": "input_audio_buffer.append", "audio": "not base64!"})["code"] == "invalid_value"
        assert error({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()})["param"] == "audio"
        assert error("{not json")["code"] == "invalid_json"
        assert error({"type": "response.create"})["code"] == "invalid_event"
        big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (9 * 2**20)})
        assert error(big)["code"] == "message_too_large"
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "input_audio_buffer.cleared"
        e = error({"type": "input_audio_buffer.commit"})  # the 50 ms were cleared
        assert "0.00ms" in e["message"]
        ws.send(json.dumps({"type": "transcription_session.update", "session": {"input_audio_format": "pcm16",
                                                                                "turn_detection": None}}))
        updated = json.loads(ws.recv(timeout=30))
        assert updated["type"] == "transcription_session.updated" and updated["session"]["turn_detection"] is None
        assert updated["session"]["input_audio_format"] == "pcm16"


def test_the_key_is_checked_as_on_the_http_routes(server):
    from websockets.exceptions import InvalidStatus

    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus) as info, _connect(server, key):
            pass
        response = info.value.response
        assert response.status_code == 401 and json.loads(response.body)["error"]["code"] == "invalid_api_key"
    from websockets.sync.client import connect

    with connect(server["ws"] + "/v1/realtime?intent=transcription", subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime" and json.loads(ws.recv(timeout=30))["type"] == "session.created"
    with pytest.raises(InvalidStatus) as info, connect(server["ws"] + "/v1/realtime?intent=conversation",
                                                       additional_headers={"Authorization": f"Bearer {KEY}"}):
        pass
    assert info.value.response.status_code == 400


# -- the page's live mode, in Debian's chromium with a fake microphone --
@pytest.mark.slow
def test_the_pages_live_mode_shows_each_utterance_as_it_completes(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    mic = tmp_path / "mic.wav"
    gap = np.zeros(16_000, np.float32)
    sf.write(mic, np.concatenate([gap, tone_clip(1, 1.1), gap, gap]), 16_000, subtype="PCM_16")  # played in a loop
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required"]
    completed: list[str] = []

    def watch(ws) -> None:
        def frame(payload) -> None:
            ev = json.loads(payload)
            if ev["type"] == "conversation.item.input_audio_transcription.completed":
                completed.append(ev["transcript"])
        ws.on("framereceived", frame)

    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = b.new_page()
            page.on("websocket", watch)
            page.goto(server["base"] + "/")
            page.fill("#key", KEY)  # sent as the openai-insecure-api-key subprotocol
            page.click("#live-start")
            page.wait_for_function("document.querySelectorAll('#live span[data-done]').length >= 2", timeout=60_000)
            page.click("#live-stop")
            page.wait_for_function("document.getElementById('live-status').textContent === 'stopped'", timeout=20_000)
            shown = [s.strip() for s in page.locator("#live span[data-done]").all_inner_texts()]
        finally:
            b.close()
    assert len(shown) >= 2 and shown == [t.strip() for t in completed[: len(shown)]] and all(shown)


# -- the CLI --
def test_infer_live_prints_each_utterance_of_piped_pcm(ckpt, sm):
    import subprocess
    import sys

    gap = np.zeros(16_000, np.float32)
    audio = pcm(np.concatenate([gap, tone_clip(1, 1.1), gap, tone_clip(2, 1.4), gap[:4000]]))  # the last one ends with the input
    cuts = list(live_utterances([float_to_pcm16(audio)], 16_000, method="energy"))
    expected = [sm.transcribe([u.audio], batch_size=1, max_new_tokens=TOKENS)[0].text for u in cuts]
    cmd = [sys.executable, "-m", "steermoe_cli", "infer", "--live", "-", "--model", str(ckpt), "--backend", "torch",
           "--device", "cpu", "--vad", "energy", "--max-new-tokens", str(TOKENS), "--format", "jsonl"]
    run = subprocess.run(cmd, input=float_to_pcm16(audio), capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    lines = [json.loads(ln) for ln in run.stdout.decode().splitlines()]
    assert [ln["text"] for ln in lines] == expected and len(lines) == 2
    assert [(ln["start"], ln["end"]) for ln in lines] == [(u.start_ms / 1000, u.end_ms / 1000) for u in cuts]
    wrong = subprocess.run([*cmd[:5], "clip.wav", *cmd[6:]], capture_output=True, timeout=120)
    assert wrong.returncode == 2 and b"standard input" in wrong.stderr + wrong.stdout
