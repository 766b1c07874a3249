"""The request planner: `infer` (the Python API) and every `serve` route plan a request the same way,
so the same request gives the same segments, text and warnings through either."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import random_sm, tone_clip

from steermoe_core.generation.chat import complete_texts
from steermoe_core.generation.guards import check_text, loop_length
from steermoe_core.inference.plan import TASK_PROMPTS, is_task_prompt, plan_request

pytest.importorskip("fastapi")
SR = 16_000


@pytest.fixture(scope="module")
def sm(backbones):
    # segments of at most 2 s, cut by loudness (tones are no speech to Silero), 3-token budgets: cuts to warn about
    return random_sm(backbones, max_segment_seconds=2.0, vad="energy", tokens_per_second=0.5)


@pytest.fixture(scope="module")
def recording() -> bytes:
    """Four tone 'utterances' with 0.6 s pauses of low noise: longer than a segment, so it is cut."""
    rng = np.random.default_rng(0)
    gap = lambda: rng.normal(0, 10 ** (-66 / 20), int(0.6 * SR)).astype(np.float32)  # noqa: E731
    audio = np.concatenate([gap()] + [x for k in range(4) for x in (tone_clip(k, 1.2) * 0.5, gap())])
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(sm):
    from fastapi.testclient import TestClient

    from steermoe_core.serving.app import ServeSettings, create_app

    with TestClient(create_app(ServeSettings(served_model_names=["steermoe", "whisper-1"]), loaded=sm)) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        yield c


def _infer(sm, data: bytes, prompt: str, **kw):
    audio, _ = sf.read(io.BytesIO(data), dtype="float32")
    return sm.ask(audio, prompt, **kw)[0]


def test_the_same_request_gets_the_same_plan_text_and_warnings_from_infer_and_serve(sm, client, recording):
    audio, _ = sf.read(io.BytesIO(recording), dtype="float32")
    plan = sm.plan([audio], "r.wav", TASK_PROMPTS["transcribe"])
    assert len(plan.rows) == 4 and plan.strategy is None  # one segment per utterance
    expected = _infer(sm, recording, TASK_PROMPTS["transcribe"])
    assert [(s.start, s.end) for s in expected.segments] == plan.spans
    assert any(s.flag == "budget" for s in expected.segments) and expected.warnings  # 3-token budgets cut some
    r = client.post("/v1/audio/transcriptions", files={"file": ("r.wav", recording)}, data={"response_format": "verbose_json"})
    out = r.json()
    assert r.status_code == 200 and out["text"] == expected.text and out["warnings"] == expected.warnings
    assert [(s["start"], s["end"], s["text"]) for s in out["segments"]] == \
        [(round(s.start, 3), round(s.end, 3), s.text) for s in expected.segments if s.text]
    # an instruction read directly: the same text and warnings, the same strategy
    prompt = "Summarize the main points of the audio."
    expected = _infer(sm, recording, prompt, strategy="direct", max_new_tokens=5)
    body = {"model": "whisper-1", "max_tokens": 5, "strategy": "direct", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(recording).decode(), "format": "wav"}},
        {"type": "text", "text": prompt}]}]}
    r = client.post("/v1/chat/completions", json=body)
    if expected.error:  # an empty answer is an error through both
        assert r.status_code == 500 and r.json()["error"]["code"] == "empty_answer"
    else:
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected.text
        assert r.json()["strategy"] == expected.strategy == "direct" and r.json()["model"] == "steermoe"


def test_asked_to_transcribe_it_is_a_transcript_not_a_question_for_the_llm(sm, client, recording):
    assert is_task_prompt("transcribe the audio") and is_task_prompt("  Transcribe  the audio. ")
    assert not is_task_prompt("Transcribe the audio and translate it.")
    expected = _infer(sm, recording, TASK_PROMPTS["transcribe"])
    body = {"model": "steermoe", "messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(recording).decode(), "format": "wav"}},
            {"type": "text", "text": "Transcribe the audio."}]}]}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["choices"][0]["message"]["content"] == expected.text and "strategy" not in out
    r = client.post("/v1/audio/transcriptions", files={"file": ("r.wav", recording)}, data={"prompt": "transcribe the audio"})
    assert r.json()["text"] == expected.text


def test_refusals_are_coded_and_the_same_through_both(sm, client):
    silence = np.random.default_rng(1).normal(0, 10 ** (-66 / 20), 3 * SR).astype(np.float32)  # low noise: no speech
    plan = plan_request([silence], "quiet.wav", "What is said?", sm.backend, sm.policy)
    assert plan.refusal.code == "no_speech" and plan.rows == [] and plan.warnings == ["no speech found"]
    r = sm.ask(silence, "What is said?")[0]
    assert r.error == plan.refusal.message.replace("quiet.wav", "<array>")
    buf = io.BytesIO()
    sf.write(buf, silence, SR, format="WAV", subtype="PCM_16")
    resp = client.post("/v1/audio/transcriptions", files={"file": ("quiet.wav", buf.getvalue())}, data={"prompt": "What is said?"})
    assert resp.status_code == 400 and resp.json()["error"] == {"message": plan.refusal.message, "type": "invalid_request_error",
                                                                 "param": None, "code": "no_speech"}
    resp = client.post("/v1/audio/transcriptions", files={"file": ("quiet.wav", buf.getvalue())})
    assert resp.status_code == 200 and resp.json()["text"] == ""  # a transcript of silence is empty, not an error


def test_served_model_names_are_listed_and_accepted(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["steermoe", "whisper-1"]
    bad = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    bad = client.post("/v1/chat/completions", json={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_messages"
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 5})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_temperature"


class _Parrot:
    """A text backend whose LLM restates one 20-token sentence until it is stopped."""

    name, stop_ids, pad_id, max_context = "parrot", [0], 0, 1000
    sentence = list(range(1, 21))

    def decode(self, rows):
        return [" ".join(f"w{t}" for t in row if t) for row in rows]

    def complete(self, prompts, max_new_tokens, guard=None, temperature=0.0, streamer=None):
        rows = [[] for _ in prompts]
        for step in range(max_new_tokens):
            for row in rows:
                row.append(self.sentence[step % len(self.sentence)])
            if guard is not None and all(guard.check(rows)):
                break
        return rows


def test_text_only_generation_stops_a_restated_sentence():
    """Every generation is guarded, text-only chats too: a sentence copied twice is a loop, cut to one copy."""
    assert loop_length(_Parrot.sentence * 2) == 20 and loop_length(_Parrot.sentence + _Parrot.sentence[:10]) == 0
    texts, flags = complete_texts(_Parrot(), [[5, 6]], [200])
    assert flags == ["loop"] and texts == [" ".join(f"w{t}" for t in _Parrot.sentence)]
    said = "Transcribed by SmolLM: the train leaves every morning at seven. " * 3
    assert check_text(said.strip(), None) == ("Transcribed by SmolLM: the train leaves every morning at seven.", "loop")
