"""`steermoe serve` on a tiny trained checkpoint: the official `openai` client against a live server,
batching under concurrency, every error's status, a graceful SIGTERM, and the page in a real
headless Chromium (Debian's, driven by playwright; never a downloaded browser)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tone_clip, train_tiny

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
TOKENS = 12
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post_file(url: str, name: str, data: bytes, fields: dict | None = None, key: str | None = KEY) -> tuple[int, dict, bytes]:
    """A multipart upload without the client (for the cases the client refuses to send)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in (fields or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _wait_healthy(base: str, proc: subprocess.Popen | None = None, seconds: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        with contextlib.suppress(OSError):
            if _get(base + "/health")[0] == 200:
                return
        time.sleep(0.3)
    raise AssertionError("server never became healthy")


@pytest.fixture(scope="module")
def ckpt(backbones, tiny_data, tmp_path_factory):
    return train_tiny(backbones, tiny_data, tmp_path_factory.mktemp("serve-run"), 40)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("serve-clips")
    out = []
    for i in range(4):
        p = d / f"c{i}.wav"
        sf.write(p, tone_clip(i, 0.8 + 0.3 * i), 16000, subtype="PCM_16")
        out.append(p)
    return out


@pytest.fixture(scope="module")
def sm(ckpt):
    from steermoe_core.inference import SteerMoE

    return SteerMoE.load(ckpt, "cpu")


@pytest.fixture(scope="module")
def results(sm, clips):
    """What `infer` gives for each clip, one at a time."""
    return [sm.transcribe([c], batch_size=1, max_new_tokens=TOKENS)[0] for c in clips]


@pytest.fixture(scope="module")
def reference(results) -> list[str]:
    return [r.text for r in results]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """`steermoe serve` in its own process, as a user starts it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "STEERMOE_API_KEY": KEY, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "steermoe_cli", "serve", "--model", str(ckpt), "--port", str(port), "--device", "cpu",
           "--max-new-tokens", str(TOKENS), "--max-batch", "8", "--max-wait-ms", "30", "--cors-origin", "http://page.test"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc)
        yield {"base": base, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_prints_its_url_and_answers_health_models_and_metrics(server):
    text = server["log"].read_text()
    assert f"at http://127.0.0.1:{server['base'].rsplit(':', 1)[1]}/" in text and "API key required" in text
    status, _, body = _get(server["base"] + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = _get(server["base"] + "/v1/models", KEY)
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["steermoe"]
    status, headers, body = _get(server["base"] + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "steermoe_queue_depth" in body.decode() and 'steermoe_requests_total{endpoint="/health",status="200"}' in body.decode()
    req = urllib.request.Request(server["base"] + "/v1/models", headers={"Origin": "http://page.test", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["access-control-allow-origin"] == "http://page.test"


def test_transcription_in_every_format_matches_infer(client, clips, reference, results):
    from steermoe_core.inference.formats import to_srt, to_vtt

    with open(clips[1], "rb") as f:
        r = client.audio.transcriptions.create(model="steermoe", file=f)
    assert r.text == reference[1]
    with open(clips[1], "rb") as f:
        assert client.audio.transcriptions.create(model="steermoe", file=f, response_format="text").strip() == reference[1]
    with open(clips[1], "rb") as f:
        srt = client.audio.transcriptions.create(model="steermoe", file=f, response_format="srt")
    assert srt == to_srt(results[1]) and srt.startswith("1\n00:00:00,000 --> ")
    with open(clips[1], "rb") as f:
        vtt = client.audio.transcriptions.create(model="steermoe", file=f, response_format="vtt")
    assert vtt == to_vtt(results[1]) and vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")
    with open(clips[1], "rb") as f:
        v = client.audio.transcriptions.create(model="steermoe", file=f, response_format="verbose_json",
                                               timestamp_granularities=["segment"])
    assert v.text == reference[1] and v.duration == pytest.approx(1.1)
    with open(clips[1], "rb") as f:  # sampling: some text, within the budget
        sampled = client.audio.transcriptions.create(model="steermoe", file=f, temperature=0.8)
    assert sampled.usage.output_tokens <= TOKENS
    assert [(s.start, s.end, s.text) for s in v.segments] == [(round(s.start, 3), round(s.end, 3), s.text) for s in results[1].segments]


def test_streamed_transcription_deltas_add_up_to_the_text(client, clips, reference):
    with open(clips[2], "rb") as f:
        events = list(client.audio.transcriptions.create(model="steermoe", file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and done[0].text == reference[2] and "".join(deltas) == reference[2]
    assert len(deltas) >= 1 and done[0].usage.output_tokens >= 1


def test_chat_with_input_audio_streamed_and_not(client, clips, sm):
    import base64

    prompt = "Summarize the main points of the audio."
    data = base64.b64encode(clips[0].read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                             {"type": "text", "text": prompt}]}]
    expected = sm.ask(clips[0], prompt, transcribe=False, max_new_tokens=8, strategy="direct")[0].text
    direct = {"strategy": "direct"}
    r = client.chat.completions.create(model="steermoe", messages=messages, max_tokens=8, extra_body=direct)
    assert r.choices[0].message.content == expected and r.model_extra["strategy"] == "direct"
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens_details.audio_tokens > 0
    assert r.usage.model_extra["audio_seconds"] == pytest.approx(0.8)
    chunks = list(client.chat.completions.create(model="steermoe", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=direct))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # a second turn: the earlier exchange is context, the audio is still heard
    turns = messages + [{"role": "assistant", "content": expected}, {"role": "user", "content": "And in one word?"}]
    again = client.chat.completions.create(model="steermoe", messages=turns, max_tokens=8, extra_body=direct)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens and again.usage.prompt_tokens_details.audio_tokens > 0


def test_a_chat_without_audio_is_the_frozen_llm_alone(client, sm):
    from steermoe_core.generation.chat import chat_text, render_chat

    messages = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model="steermoe", messages=messages, max_tokens=6)
    assert r.choices[0].message.content == sm.chat_text(messages, 6) == chat_text(sm.backend, messages, 6)
    assert r.usage.prompt_tokens == len(render_chat(sm.backend.tokenizer, messages)) and r.usage.prompt_tokens_details.audio_tokens == 0
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="steermoe", messages=messages, max_tokens=6, stream=True))
    assert streamed == r.choices[0].message.content


def test_errors_have_openais_shape_and_status(server, client, clips):
    url = server["base"] + "/v1/audio/transcriptions"
    status, _, body = _post_file(url, "empty.wav", b"", {"model": "steermoe"})
    assert status == 400 and json.loads(body)["error"]["message"] == "empty.wav: empty file"
    status, _, body = _post_file(url, "broken.wav", b"RIFF\x00\x00\x00\x00WAVEjunk", {"model": "steermoe"})
    err = json.loads(body)["error"]
    assert status == 400 and err["message"].startswith("broken.wav: ") and err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_audio"
    status, _, body = _post_file(url, "c0.wav", clips[0].read_bytes(), {"model": "steermoe"}, key=None)
    assert status == 401 and "missing API key" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e, open(clips[0], "rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    assert e.value.status_code == 404 and "whisper-1" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e, open(clips[0], "rb") as f:
        client.audio.transcriptions.create(model="steermoe", file=f, response_format="verbose_json", timestamp_granularities=["word"])
    assert "word timestamps" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="steermoe", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]}])
    assert "not base64" in e.value.body["message"]
    # after all of that the server still answers
    with open(clips[0], "rb") as f:
        assert client.audio.transcriptions.create(model="steermoe", file=f).text is not None


def test_sixteen_concurrent_requests_batch_and_match_one_at_a_time(server, client, clips, reference):
    def one(i: int) -> str:
        with open(clips[i % 4], "rb") as f:
            return client.audio.transcriptions.create(model="steermoe", file=f).text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == [reference[i % 4] for i in range(16)]
    metrics = _get(server["base"] + "/metrics")[2].decode()
    largest = int(next(line.split()[1] for line in metrics.splitlines() if line.startswith("steermoe_batch_size_max")))
    assert largest > 1, metrics
    assert "Traceback" not in server["log"].read_text()


def test_without_the_serve_extra_one_line_says_how(monkeypatch):
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2 and "pip install 'steermoe[serve]'" in r.output and "Traceback" not in r.output


class _FakeBackend:
    """Echoes each row's prompt after ``delay`` seconds; records the batches it was given."""

    name, stop_ids, pad_id, max_context = "fake", [1], 0, 1000

    def __init__(self, delay: float = 0.0):
        self.delay, self.batches, self.gate = delay, [], threading.Event()
        self.gate.set()

    def decode(self, rows):
        return ["x" * len(r) for r in rows]

    def generate(self, clips, groups, prompts, max_new_tokens, num_beams, streamer=None, guard=None, temperature=0.0):
        self.gate.wait(30)
        time.sleep(self.delay)
        self.batches.append(list(prompts))
        return list(prompts)


def _job(prompt: str, done: list):
    from steermoe_core.serving.batcher import Job, Row

    return Job("audio", [Row(clips=[np.zeros(1600, np.float32)], prompt=prompt, budget=4)], on_done=done.append)


def test_batcher_merges_waiting_requests_drops_the_departed_and_does_not_delay_a_lone_one():
    from steermoe_core.serving.batcher import Batcher, QueueFull
    from steermoe_core.serving.metrics import Metrics

    fake = _FakeBackend()
    b = Batcher(fake, Metrics(), max_batch=8, max_wait_s=0.5, max_queue=4)
    done: list = []
    t0 = time.perf_counter()
    b.submit(_job("alone", done))
    while not done:
        time.sleep(0.005)
    assert time.perf_counter() - t0 < 0.3 and fake.batches == [["alone"]]  # not held for --max-wait-ms
    time.sleep(0.6)  # no burst: the next one starts at once as well
    fake.gate.clear()  # the worker blocks on the next batch; four more wait behind it
    b.submit(_job("first", done))
    time.sleep(0.2)
    jobs = [_job(p, done) for p in ("a", "b", "gone", "c")]
    for j in jobs:
        b.submit(j)
    with pytest.raises(QueueFull):
        b.submit(_job("one too many", done))
    jobs[2].cancelled.set()  # its client hung up
    fake.gate.set()
    b.close(10)
    assert fake.batches == [["alone"], ["first"], ["a", "b", "c"]]
    assert [j.texts for j in jobs] == [["a"], ["b"], [""], ["c"]]


# -- an in-process server for the failures a live process cannot be made to have --
@contextlib.contextmanager
def _live(app):
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, seconds=60)
        yield base
    finally:
        srv.should_exit = True
        t.join(30)


def test_cap_context_failure_and_full_queue(sm, clips, tmp_path, caplog):
    from steermoe_core.serving.app import ServeSettings, create_app

    backend = sm.backend
    real_generate, real_context = backend.generate, backend.max_context
    gate = threading.Event()
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in the model")
        if calls["n"] == 3:  # hold the worker: the queue fills behind it
            gate.wait(60)
        return real_generate(*a, **k)

    settings = ServeSettings(max_upload_mb=0.5, max_queue=1, max_batch=1, max_wait_ms=0, max_new_tokens=TOKENS)
    big = tmp_path / "big.wav"
    sf.write(big, np.zeros(16000 * 20, np.float32) + tone_clip(0, 20.0), 16000, subtype="PCM_16")  # 640 KB
    backend.generate = flaky
    try:
        with _live(create_app(settings, loaded=sm)) as base:
            url = base + "/v1/audio/transcriptions"
            status, _, body = _post_file(url, "big.wav", big.read_bytes(), key=None)
            assert status == 413 and json.loads(body)["error"]["code"] == "file_too_large"
            # an unexpected failure: 500, the traceback in the log only; the next request is served
            with caplog.at_level("ERROR", logger="steermoe.serve"):
                status, _, body = _post_file(url, "c0.wav", clips[0].read_bytes(), key=None)
            assert status == 500 and "Traceback" not in body.decode() and json.loads(body)["error"]["type"] == "server_error"
            assert "RuntimeError: boom in the model" in caplog.text
            assert _post_file(url, "c0.wav", clips[0].read_bytes(), key=None)[0] == 200
            # a prompt too long for the LLM's context is refused as `infer` refuses it
            backend.max_context = 20
            status, _, body = _post_file(url, "c0.wav", clips[0].read_bytes(), {"prompt": "Summarize it.", "strategy": "direct"},
                                         key=None)
            backend.max_context = real_context
            assert status == 400 and "too long for the LLM's context" in json.loads(body)["error"]["message"]
            # a full queue: 503 with Retry-After while the worker is busy and one request waits
            with ThreadPoolExecutor(2) as pool:
                held = pool.submit(_post_file, url, "c1.wav", clips[1].read_bytes(), None, None)
                time.sleep(1.0)
                waiting = pool.submit(_post_file, url, "c2.wav", clips[2].read_bytes(), None, None)
                time.sleep(1.0)
                status, headers, body = _post_file(url, "c3.wav", clips[3].read_bytes(), key=None)
                gate.set()
                assert status == 503 and headers.get("retry-after") == "1" and json.loads(body)["error"]["code"] == "queue_full"
                assert held.result()[0] == 200 and waiting.result()[0] == 200
    finally:
        gate.set()
        backend.generate, backend.max_context = real_generate, real_context


def test_health_answers_while_the_model_decodes(sm, clips):
    from steermoe_core.serving.app import ServeSettings, create_app

    backend = sm.backend
    real_generate = backend.generate
    gate = threading.Event()

    def slow(*a, **k):
        gate.wait(60)
        return real_generate(*a, **k)

    backend.generate = slow
    try:
        with _live(create_app(ServeSettings(max_new_tokens=TOKENS), loaded=sm)) as base:
            with ThreadPoolExecutor(1) as pool:
                busy = pool.submit(_post_file, base + "/v1/audio/transcriptions", "c0.wav", clips[0].read_bytes(), None, None)
                time.sleep(0.5)
                t0 = time.perf_counter()
                assert _get(base + "/health")[0] == 200 and time.perf_counter() - t0 < 10  # the model is held: it answers anyway
                gate.set()
                assert busy.result()[0] == 200
    finally:
        gate.set()
        backend.generate = real_generate


def test_a_recording_too_long_for_the_context_is_answered_through_its_transcript(sm, clips, tmp_path):
    """The same strategy choice as `infer`: for a checkpoint trained for instructions, ``auto`` reads
    a recording that fits the context directly and answers one that does not through its transcript
    (map-reduce past the context), with the same answer `infer` gives; ``direct`` on it is refused;
    the strategy that ran is in the answer; an empty answer is an error."""
    import base64

    from steermoe_core.serving.app import ServeSettings, create_app

    silence = np.zeros(8000, np.float32)
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([x for i in range(4) for x in (tone_clip(i, 0.8 + 0.3 * i), silence)]), 16000, subtype="PCM_16")
    prompt = "Summarize the main points of the audio."
    backend, policy = sm.backend, sm.policy
    real_context, real_trained, real_generate = backend.max_context, policy.trained_for_instructions, backend.generate
    real_vad = policy.vad
    need = backend.prompt_tokens(prompt) + sum(backend.audio_token_counts([16000 * 6]))  # about the long one's
    policy.trained_for_instructions = True
    policy.vad = "off"  # chords are not speech to a voice detector: cut at low-energy points
    try:
        short_expected = sm.ask(clips[0], prompt, transcribe=False, max_new_tokens=TOKENS)[0]
        assert short_expected.strategy == "direct"
        backend.max_context = max(need // 2, 80)  # the short clip still fits; the 6 s recording does not
        expected = sm.ask(long, prompt, transcribe=False, max_new_tokens=TOKENS)[0]
        assert expected.strategy == "transcript" and expected.error is None and expected.text and len(expected.segments) > 1
        assert expected.rounds >= 1  # its transcript is over the context too: map-reduce
        with _live(create_app(ServeSettings(max_new_tokens=TOKENS), loaded=sm)) as base:
            url = base + "/v1/audio/transcriptions"
            status, _, body = _post_file(url, "long.wav", long.read_bytes(), {"prompt": prompt, "response_format": "verbose_json"},
                                         key=None)
            out = json.loads(body)
            assert status == 200 and out["strategy"] == "transcript" and out["text"] == expected.text
            assert out["transcript"] == expected.transcript and out["rounds"] == expected.rounds
            assert [s["text"] for s in out["segments"]] == [s.text for s in expected.segments if s.text]
            assert out["usage"]["output_tokens"] > 0 and out["usage"]["input_token_details"]["audio_tokens"] > 0
            status, _, body = _post_file(url, "long.wav", long.read_bytes(), {"prompt": prompt, "strategy": "direct"}, key=None)
            err = json.loads(body)["error"]
            assert status == 400 and err["code"] == "context_length_exceeded" and "strategy 'transcript'" in err["message"]
            status, _, body = _post_file(url, "long.wav", long.read_bytes(), {"prompt": prompt, "strategy": "sideways"}, key=None)
            assert status == 400 and json.loads(body)["error"]["code"] == "invalid_strategy"
            # the chat endpoint chooses the same way, streamed and not
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            audio = {"data": base64.b64encode(long.read_bytes()).decode(), "format": "wav"}
            messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": audio}, {"type": "text", "text": prompt}]}]
            r = client.chat.completions.create(model="steermoe", messages=messages, max_tokens=TOKENS)
            assert r.choices[0].message.content == expected.text and r.model_extra["strategy"] == "transcript"
            assert r.model_extra["transcript"] == expected.transcript
            chunks = list(client.chat.completions.create(model="steermoe", messages=messages, max_tokens=TOKENS, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
            assert chunks[-1].model_extra["strategy"] == "transcript"
            short = {"data": base64.b64encode(clips[0].read_bytes()).decode(), "format": "wav"}
            r = client.chat.completions.create(model="steermoe", max_tokens=TOKENS, messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": short}, {"type": "text", "text": prompt}]}])
            assert r.model_extra["strategy"] == "direct" and r.choices[0].message.content == short_expected.text
            # an empty answer is an error, never a success
            backend.generate = lambda clips_, groups, *a, **k: [""] * len(groups)
            status, _, body = _post_file(url, "c0.wav", clips[0].read_bytes(), {"prompt": prompt}, key=None)
            err = json.loads(body)["error"]
            assert status == 500 and err["code"] == "empty_answer" and "strategy direct" in err["message"]
            status, _, body = _post_file(url, "long.wav", long.read_bytes(), {"prompt": prompt}, key=None)
            assert status == 500 and json.loads(body)["error"]["code"] == "empty_answer"
            backend.generate = real_generate
            assert _post_file(url, "c0.wav", clips[0].read_bytes(), key=None)[0] == 200
    finally:
        backend.max_context, policy.trained_for_instructions, backend.generate = real_context, real_trained, real_generate
        policy.vad = real_vad


def test_the_onnxruntime_backend_serves_an_exported_folder(ckpt, clips, tmp_path):
    """`steermoe serve --backend onnxruntime --model EXPORT` (a folder from `steermoe export --onnx`):
    the transcripts `infer --backend onnxruntime` gives, streamed and not; a prompt, the transcript
    strategy, a text-only chat (the frozen LLM's answer, as on torch) and sampling all run there too."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import base64

    from steermoe_core.inference import SteerMoE

    exported = tmp_path / "onnx"
    done = subprocess.run([sys.executable, "-m", "steermoe_cli", "export", str(ckpt), "--onnx", "--out", str(exported)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = [r.text for r in SteerMoE.load(exported, "cpu", backend="onnxruntime").transcribe(clips[:2], batch_size=1,
                                                                                               max_new_tokens=TOKENS)]
    assert all(expected)
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "steermoe_cli", "serve", "--backend", "onnxruntime", "--model", str(exported), "--port", str(port),
           "--device", "cpu", "--max-new-tokens", str(TOKENS)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("STEERMOE_API_KEY", None)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc)
        assert json.loads(_get(base + "/health")[2])["backend"] == "onnxruntime"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        for clip, text in zip(clips, expected):
            with open(clip, "rb") as f:
                assert client.audio.transcriptions.create(model="steermoe", file=f).text == text
        with open(clips[0], "rb") as f:
            events = list(client.audio.transcriptions.create(model="steermoe", file=f, stream=True))
        assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == expected[0]
        url = base + "/v1/audio/transcriptions"
        status, _, body = _post_file(url, "c0.wav", clips[0].read_bytes(), {"prompt": "Summarize it.", "response_format": "verbose_json"},
                                     key=None)
        out = json.loads(body)
        assert (status == 200 and out["strategy"] == "transcript") or (status == 500 and out["error"]["code"] == "empty_answer"), out
        status, _, body = _post_file(url, "c0.wav", clips[0].read_bytes(), {"prompt": "Summarize it.", "strategy": "direct",
                                                                         "response_format": "verbose_json"}, key=None)
        out = json.loads(body)
        assert (status == 200 and out["strategy"] == "direct") or (status == 500 and out["error"]["code"] == "empty_answer"), out
        messages = [{"role": "user", "content": "hello"}]
        reply = client.chat.completions.create(model="steermoe", max_tokens=4, messages=messages)
        assert reply.choices[0].message.content == SteerMoE.load(ckpt, "cpu").chat_text(messages, 4)
        audio = {"data": base64.b64encode(clips[1].read_bytes()).decode(), "format": "wav"}
        sampled = client.chat.completions.create(model="steermoe", max_tokens=4, temperature=0.7, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": audio}]}])
        assert sampled.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


# -- the page, in Debian's chromium --
@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    return playwright


def test_the_page_transcribes_an_upload_and_a_recording(server, clips, reference, browser, tmp_path):
    fake_mic = tmp_path / "mic.wav"
    sf.write(fake_mic, np.tile(tone_clip(1, 1.1), 6), 16000, subtype="PCM_16")  # a clip like those the model trained on
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic}"]
    shot = Path(os.environ.get("STEERMOE_PAGE_SCREENSHOT", tmp_path / "serve_page.png"))
    with browser.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = b.new_page(viewport={"width": 900, "height": 760})
            page.goto(server["base"] + "/")
            page.fill("#key", KEY)
            page.set_input_files("#file", str(clips[1]))
            page.click("#run")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
            assert page.inner_text("#answer") == reference[1]
            assert page.locator("#segments tbody tr").count() == 1
            assert page.inner_text("#segments tbody tr td.t >> nth=1") == "00:00:01.100"
            assert page.get_attribute("#dl-srt", "href").startswith("blob:")
            page.screenshot(path=str(shot), full_page=True)
            # the microphone (a fake one playing mic.wav)
            page.click("#record")
            page.wait_for_timeout(1500)
            page.click("#stop")
            page.wait_for_function("!document.getElementById('run').disabled && "
                                   "document.getElementById('source').textContent.startsWith('recording (')", timeout=20_000)
            page.click("#run")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
            assert page.inner_text("#answer").strip() != ""
        finally:
            b.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server, client, clips):
    """Last in this module: it stops the module's server."""
    with ThreadPoolExecutor(1) as pool:
        def one():
            with open(clips[3], "rb") as f:
                return client.audio.transcriptions.create(model="steermoe", file=f).text

        fut = pool.submit(one)
        time.sleep(0.3)
        server["proc"].send_signal(signal.SIGTERM)
        text = fut.result(timeout=120)
    assert server["proc"].wait(timeout=60) == 0
    assert text is not None and "steermoe serve: stopped" in server["log"].read_text()
