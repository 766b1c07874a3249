"""A realtime transcription session without the network: OpenAI's Realtime client events in, its
server events out, and the utterances to transcribe.

``Session.handle(text)`` takes one client event (a WebSocket text frame) and returns the server
events to send now and the ``Commit``s (utterances) whose transcription should start; the route
(``realtime.py``) sends, transcribes and adds the ``delta`` / ``completed`` events.

Both session shapes are understood: the GA ``session.update`` with ``session.type = "transcription"``
(``audio.input.format``, ``.turn_detection``, ``.transcription``), answered by ``session.updated``;
and the beta ``transcription_session.update`` (``input_audio_format``, ``turn_detection``,
``input_audio_transcription``), answered by ``transcription_session.updated`` in its own shape.
Audio is PCM16 at 24 kHz mono, as OpenAI's transcription sessions take it (``audio/pcm`` / ``pcm16``);
G.711 is refused with an ``error`` event. Every error event has OpenAI's shape:
``{"type": "error", "event_id", "error": {"type", "code", "message", "param", "event_id"}}``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import secrets
from dataclasses import dataclass

import numpy as np

from steermoe_core.inference.live import SpeechStarted, SpeechStopped, TurnDetection, Utterance, UtteranceDetector, pcm16_to_float

RATE = 24_000  # what OpenAI's transcription sessions take
MIN_COMMIT_MS = 100  # OpenAI's smallest committable buffer
MAX_EVENT_BYTES = 8 * 2**20  # one client event (a frame); about 2 minutes of base64 audio
DEFAULT_TURN = TurnDetection()


class ClientError(Exception):
    """A client event the session refuses: answered with an ``error`` event, the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class Commit:
    """An utterance to transcribe, under its conversation item."""

    item_id: str
    previous_item_id: str | None
    utterance: Utterance
    by_vad: bool  # cut by server VAD (else the client committed)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _turn_json(turn: TurnDetection | None) -> dict | None:
    if turn is None:
        return None
    return {"type": "server_vad", "threshold": turn.threshold, "prefix_padding_ms": turn.prefix_padding_ms,
            "silence_duration_ms": turn.silence_duration_ms}


def _turn_from(value, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError("invalid_value", f"{param} must be an object or null", param)
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise ClientError("invalid_value", f"{param}.type '{kind}' is not supported: this server detects turns with "
                                           "'server_vad' (or set it to null and commit yourself)", f"{param}.type")
    try:
        turn = TurnDetection(
            threshold=float(value.get("threshold") if value.get("threshold") is not None else DEFAULT_TURN.threshold),
            prefix_padding_ms=int(value.get("prefix_padding_ms") if value.get("prefix_padding_ms") is not None
                                  else DEFAULT_TURN.prefix_padding_ms),
            silence_duration_ms=int(value.get("silence_duration_ms") if value.get("silence_duration_ms") is not None
                                    else DEFAULT_TURN.silence_duration_ms))
    except (TypeError, ValueError):
        raise ClientError("invalid_value", f"{param}: threshold, prefix_padding_ms and silence_duration_ms must be numbers",
                          param) from None
    if not 0.0 <= turn.threshold <= 1.0:
        raise ClientError("invalid_value", f"{param}.threshold must be between 0 and 1", f"{param}.threshold")
    if turn.prefix_padding_ms < 0 or turn.silence_duration_ms < 0:
        raise ClientError("invalid_value", f"{param}: durations must not be negative", param)
    return turn


def _check_format(value, param: str) -> None:
    """PCM16 at 24 kHz: GA ``{"type": "audio/pcm", "rate": 24000}`` or beta ``"pcm16"``."""
    if value is None:
        return
    if isinstance(value, str):
        kind, rate = value, RATE
    elif isinstance(value, dict):
        kind, rate = value.get("type"), value.get("rate", RATE)
    else:
        raise ClientError("invalid_value", f"{param} must be an object like {{\"type\": \"audio/pcm\", \"rate\": 24000}}", param)
    if kind not in ("audio/pcm", "pcm16") or rate != RATE:
        raise ClientError("invalid_value", f"{param}: audio format {json.dumps(value)} is not supported; send PCM16 at 24 kHz "
                                           "mono ({\"type\": \"audio/pcm\", \"rate\": 24000}, or \"pcm16\")", param)


class Session:
    """One connection's settings, audio buffer and items. ``model_ids``: the names a client may ask for
    as its transcription model; ``method``: the voice-activity detector (the model's policy)."""

    def __init__(self, model_name: str, model_ids: set[str], method: str = "auto", max_buffer_s: float = 900.0):
        self.id = _new_id("sess")
        self.model_name, self.model_ids, self.max_buffer_s = model_name, model_ids, max_buffer_s
        self.model = model_name
        self.language: str | None = None
        self.prompt = ""
        self.detector = UtteranceDetector(RATE, DEFAULT_TURN, method)
        self.last_item: str | None = None
        self.item_id: str | None = None  # the item the speech in progress will become
        self._events = itertools.count(1)

    # -- server events --
    def event(self, type_: str, **fields) -> dict:
        return {"type": type_, "event_id": f"event_{self.id[5:13]}{next(self._events):06d}", **fields}

    def error(self, e: ClientError, client_event_id: str | None = None) -> dict:
        return self.event("error", error={"type": "invalid_request_error", "code": e.code, "message": e.message,
                                          "param": e.param, "event_id": client_event_id})

    def _transcription(self) -> dict:
        return {"model": self.model, "language": self.language, "prompt": self.prompt}

    def ga_session(self) -> dict:
        return {"type": "transcription", "object": "realtime.transcription_session", "id": self.id, "expires_at": 0,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "noise_reduction": None,
                                    "transcription": self._transcription(),
                                    "turn_detection": _turn_json(self.detector.turn)}},
                "include": None}

    def beta_session(self) -> dict:
        return {"object": "realtime.transcription_session", "id": self.id, "expires_at": 0, "input_audio_format": "pcm16",
                "input_audio_transcription": self._transcription(), "turn_detection": _turn_json(self.detector.turn),
                "input_audio_noise_reduction": None, "include": None}

    def created(self) -> dict:
        return self.event("session.created", session=self.ga_session())

    # -- client events --
    def handle(self, text: str | bytes) -> tuple[list[dict], list[Commit]]:
        """One client event: the server events to send, and the utterances to transcribe."""
        client_id = None
        try:
            if len(text) > MAX_EVENT_BYTES:
                raise ClientError("message_too_large", f"a client event of {len(text) / 2**20:.1f} MB is over this server's "
                                                       f"{MAX_EVENT_BYTES // 2**20} MB limit: send audio in smaller appends")
            try:
                ev = json.loads(text)
            except (ValueError, UnicodeDecodeError):
                raise ClientError("invalid_json", "the client event is not JSON") from None
            if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
                raise ClientError("invalid_event", "a client event is a JSON object with a string 'type'", "type")
            client_id = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
            handler = {
                "session.update": self._session_update,
                "transcription_session.update": self._beta_update,
                "input_audio_buffer.append": self._append,
                "input_audio_buffer.commit": self._commit,
                "input_audio_buffer.clear": self._clear,
            }.get(ev["type"])
            if handler is None:
                raise ClientError("invalid_event", f"unknown or unsupported client event type '{ev['type']}' in a "
                                                   "transcription session", "type")
            return handler(ev)
        except ClientError as e:
            return [self.error(e, client_id)], []

    def _apply(self, transcription, turn, fmt, prefix: str, has_turn: bool, fmt_param: str) -> None:
        """Validate everything first, then change anything: a refused update changes nothing."""
        _check_format(fmt, fmt_param)
        new_turn = _turn_from(turn, f"{prefix}turn_detection") if has_turn else self.detector.turn
        model = self.model
        if transcription is not None:
            if not isinstance(transcription, dict):
                raise ClientError("invalid_value", f"{prefix}transcription must be an object", f"{prefix}transcription")
            asked = transcription.get("model")
            if asked and asked not in self.model_ids:
                raise ClientError("model_not_found", f"the model '{asked}' does not exist; this server serves "
                                                     f"{sorted(self.model_ids)}", f"{prefix}transcription.model")
            model = asked or model
            self.language = transcription.get("language", self.language)
            self.prompt = transcription.get("prompt", self.prompt) or ""
        self.model = model
        if has_turn and new_turn != self.detector.turn:
            self.detector.set_turn(new_turn)
            self.item_id = None

    def _session_update(self, ev: dict) -> tuple[list[dict], list[Commit]]:
        s = ev.get("session")
        if not isinstance(s, dict):
            raise ClientError("invalid_value", "session.update needs a 'session' object", "session")
        if s.get("type", "transcription") != "transcription":
            raise ClientError("invalid_value", f"session.type '{s.get('type')}' is not supported: this server runs "
                                               "transcription sessions (session.type = \"transcription\")", "session.type")
        audio = s.get("audio") or {}
        inp = audio.get("input") or {} if isinstance(audio, dict) else {}
        if not isinstance(inp, dict):
            raise ClientError("invalid_value", "session.audio.input must be an object", "session.audio.input")
        self._apply(inp.get("transcription"), inp.get("turn_detection"), inp.get("format"), "session.audio.input.",
                    "turn_detection" in inp, "session.audio.input.format")
        return [self.event("session.updated", session=self.ga_session())], []

    def _beta_update(self, ev: dict) -> tuple[list[dict], list[Commit]]:
        s = ev.get("session")
        if not isinstance(s, dict):
            raise ClientError("invalid_value", "transcription_session.update needs a 'session' object", "session")
        self._apply(s.get("input_audio_transcription"), s.get("turn_detection"), s.get("input_audio_format"),
                    "session.", "turn_detection" in s, "session.input_audio_format")
        return [self.event("transcription_session.updated", session=self.beta_session())], []

    def _append(self, ev: dict) -> tuple[list[dict], list[Commit]]:
        data = ev.get("audio")
        if not isinstance(data, str):
            raise ClientError("invalid_value", "input_audio_buffer.append needs 'audio': base64 PCM16 at 24 kHz", "audio")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("invalid_value", "'audio' is not valid base64", "audio") from None
        if len(raw) % 2:
            raise ClientError("invalid_value", f"'audio' holds {len(raw)} bytes: PCM16 comes in whole 2-byte samples", "audio")
        if (len(self.detector.pending) + len(raw) // 2) / RATE > self.max_buffer_s:
            raise ClientError("input_audio_buffer_full", f"the input audio buffer would pass {self.max_buffer_s:g} s: commit "
                                                         "(or use server_vad) before appending more", "audio")
        out: list[dict] = []
        commits: list[Commit] = []
        for e in self.detector.append(pcm16_to_float(raw)):
            if isinstance(e, SpeechStarted):
                self.item_id = _new_id("item")
                out.append(self.event("input_audio_buffer.speech_started", audio_start_ms=e.audio_start_ms, item_id=self.item_id))
            elif isinstance(e, SpeechStopped):
                item = self.item_id or _new_id("item")
                out.append(self.event("input_audio_buffer.speech_stopped", audio_end_ms=e.audio_end_ms, item_id=item))
                out.append(self._committed(item))
                commits.append(Commit(item, self.last_item, e.utterance, True))
                self.last_item, self.item_id = item, None
        return out, commits

    def _committed(self, item: str) -> dict:
        return self.event("input_audio_buffer.committed", previous_item_id=self.last_item, item_id=item)

    def _commit(self, ev: dict) -> tuple[list[dict], list[Commit]]:
        ms = self.detector.pending_ms
        if ms < MIN_COMMIT_MS:
            raise ClientError("input_audio_buffer_commit_empty",
                              f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms "
                              f"of audio, but buffer only has {ms:.2f}ms of audio.")
        item = self.item_id or _new_id("item")
        out = [self._committed(item)]
        commit = Commit(item, self.last_item, self.detector.commit(), False)
        self.last_item, self.item_id = item, None
        return out, [commit]

    def _clear(self, ev: dict) -> tuple[list[dict], list[Commit]]:
        self.detector.clear()
        self.item_id = None
        return [self.event("input_audio_buffer.cleared")], []


def as_pcm16_base64(audio: np.ndarray) -> str:
    """float audio as the base64 PCM16 an ``input_audio_buffer.append`` carries (clients, tests)."""
    from steermoe_core.inference.live import float_to_pcm16

    return base64.b64encode(float_to_pcm16(audio)).decode()
