"""Live speech: audio arriving in pieces, cut into utterances as each one ends.

One utterance detector serves `steermoe infer --live` and the server's realtime route, so a
microphone stream is cut the same way whichever front end reads it:

    det = UtteranceDetector(rate=24000, turn=TurnDetection())   # turn=None: the caller commits
    for ev in det.append(pcm):                                  # float32 samples at ``rate``
        if isinstance(ev, SpeechStopped): plan ev.utterance.audio (16 kHz) as a transcript
    det.commit()                                                # whatever is pending, as one utterance

Voice activity is ``audio.vad``'s (Silero, or the energy detector), run on the new 32 ms frames
only, its state carried between pieces (the server's VAD must cost little per session). Speech
starts when a frame's probability reaches ``threshold`` and stops after ``silence_duration_ms``
under ``threshold - 0.15`` (the hysteresis Silero's own timestamps use); the utterance keeps
``prefix_padding_ms`` before the first speech frame and ``vad.PAD_S`` after the last one (the
rest of the silence is not read: the model trained on clips without long tails). An utterance is
cut at ``max_utterance_s`` even mid-speech; the planner then reads it as any long recording.

Voice activity reads the stream resampled to 16 kHz as it comes (``StreamResampler``: a Kaiser-
windowed sinc polyphase filter in numpy; neither soxr nor scipy is a dependency). An utterance is
resampled whole by ffmpeg, as ``audio.load`` reads a file (``Utterance.audio``), so a live utterance
and an upload of the same samples are the same 16 kHz audio and get the same transcript.
"""

from __future__ import annotations

import math
import subprocess
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from steermoe_core.audio import vad
from steermoe_core.audio.load import SAMPLE_RATE

FRAME_MS = vad.FRAME * 1000 / SAMPLE_RATE  # 32 ms
HALF_WIDTH = 16  # the filter's zero crossings each side, in input samples at the lower of the two rates


# -- resampling ----------------------------------------------------------------------------------------
def _kernel(up: int, down: int) -> np.ndarray:
    """Low-pass taps at ``up`` x the input rate: cut-off just under the lower Nyquist, gain ``up``."""
    ratio = max(up, down)
    n = 2 * HALF_WIDTH * ratio + 1
    t = np.arange(n) - (n - 1) / 2
    cutoff = 0.94 / ratio  # of the upsampled Nyquist
    h = cutoff * np.sinc(cutoff * t) * np.kaiser(n, 8.6)
    return (h * up / h.sum()).astype(np.float64)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``x`` at ``rate`` as ``target`` Hz, the clip taken whole (zeros beyond its ends): polyphase, by
    the reduced ratio target/rate."""
    if rate == target or len(x) == 0:
        return np.asarray(x, np.float32)
    g = math.gcd(rate, target)
    up, down = target // g, rate // g
    h = _kernel(up, down)
    n_out = (len(x) * up) // down
    delay = (len(h) - 1) // 2
    # output m is sum_k h[k] u[m*down + delay - k], u = x zero-stuffed by ``up``: per phase of m*down +
    # delay, a short convolution of x itself (polyphase), read at the outputs of that phase
    pos = np.arange(n_out) * down + delay  # index into u of each output's filter centre
    pad = -(-len(h) // up) + 1
    xp = np.concatenate([np.zeros(pad), np.asarray(x, np.float64), np.zeros(pad)])
    out = np.zeros(n_out)
    for phase in range(up):
        sel = np.nonzero(pos % up == phase)[0]
        if len(sel):
            full = np.convolve(xp, h[phase::up])  # full[n] = sum_j h[phase + up*j] * xp[n - j]
            out[sel] = full[(pos[sel] - phase) // up + pad]
    return out.astype(np.float32)


class StreamResampler:
    """``resample`` for a stream: each piece's outputs are those of the whole stream so far, less the
    last few milliseconds, which wait for the filter's right-hand context (enough for voice activity)."""

    def __init__(self, rate: int, target: int = SAMPLE_RATE, start: int = 0):
        """``start``: the input sample the stream begins at (rounded down so outputs fall on whole input samples)."""
        self.rate, self.target = rate, target
        g = math.gcd(rate, target)
        self.down = rate // g
        self.context = 2 * HALF_WIDTH * max(self.down, target // g) + 2  # input samples each side
        self.tail_start = (start // self.down) * self.down  # index in the stream of ``tail``'s first sample
        self.tail = np.zeros(0, np.float32)  # input kept for the next piece's left context
        self.done = (self.tail_start * target) // rate  # the stream's outputs emitted so far
        self.origin = self.done  # the first output's position

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.rate == self.target:
            return np.asarray(x, np.float32)
        buf = np.concatenate([self.tail, np.asarray(x, np.float32)])
        end_in = self.tail_start + len(buf)  # stream samples seen
        ready = max(self.done, ((end_in - self.context) * self.target) // self.rate)  # outputs whose context is in
        y = resample(buf, self.rate, self.target)  # outputs from tail_start's output position
        first = (self.tail_start * self.target) // self.rate
        out = y[self.done - first : ready - first] if ready > self.done else np.zeros(0, np.float32)
        self.done = ready
        keep_from = max(0, (self.done * self.rate) // self.target - self.context - 1)
        keep_from = (keep_from // self.down) * self.down  # so an output position lands on a whole input sample
        if keep_from > self.tail_start:
            self.tail = buf[keep_from - self.tail_start :]
            self.tail_start = keep_from
        else:
            self.tail = buf
        return out


# -- voice activity, frame by frame --------------------------------------------------------------------
class FrameVad:
    """A speech probability per new 32 ms frame of a 16 kHz stream: Silero with its LSTM state carried
    (the same numbers as ``vad.silero_probs`` over the whole stream), or the energy detector against
    the noise floor of the last 10 s. Frames under ``vad.SILENCE_DBFS`` are never speech."""

    def __init__(self, method: str = "auto"):
        if method == "silero" or (method == "auto" and vad.silero_model_path() is not None):
            self.method = "silero"
            self.session = vad._silero_session(str(vad.silero_model_path()))
            self.h = np.zeros((1, 1, 128), np.float32)
            self.c = np.zeros((1, 1, 128), np.float32)
        else:  # "energy", "off" (no detector asked for: loudness is the least a live cut needs)
            self.method = "energy"
            self.levels: deque = deque(maxlen=int(10_000 / FRAME_MS))
            self.recent: deque = deque(maxlen=3)
        self.prev = np.zeros(vad.CONTEXT, np.float32)
        self.rest = np.zeros(0, np.float32)

    def __call__(self, audio16k: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.rest, audio16k])
        n = len(buf) // vad.FRAME
        frames, self.rest = buf[: n * vad.FRAME].reshape(n, vad.FRAME), buf[n * vad.FRAME :]
        if n == 0:
            return np.zeros(0, np.float32)
        db = 20 * np.log10(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1) + 1e-20))
        if self.method == "silero":
            ctx = np.concatenate([self.prev[None], frames[:-1, -vad.CONTEXT :]], axis=0)
            x = np.concatenate([ctx, frames], axis=1).astype(np.float32)
            p, self.h, self.c = self.session.run(["speech_probs", "hn", "cn"], {"input": x, "h": self.h, "c": self.c})
            probs = p.reshape(-1).astype(np.float32)
        else:
            probs = np.zeros(n, np.float32)
            for i, level in enumerate(db):
                self.levels.append(level)
                floor = max(vad.ENERGY_FLOOR_DBFS, float(np.percentile(self.levels, 10)) + 6.0)
                self.recent.append(min(max((level - floor) / 12.0, 0.0), 1.0))
                probs[i] = sum(self.recent) / 3
        self.prev = frames[-1, -vad.CONTEXT :].copy()
        probs[db < vad.SILENCE_DBFS] = 0.0
        return probs


# -- utterances ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TurnDetection:
    """OpenAI's ``server_vad`` settings (their defaults), and the longest utterance read as one."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    max_utterance_s: float = 30.0


@dataclass
class Utterance:
    """A stretch of speech cut from the stream: its samples at the stream's rate and where it lies (ms
    from the start); ``audio`` is it at 16 kHz."""

    raw: np.ndarray
    rate: int
    start_ms: int
    end_ms: int

    @property
    def seconds(self) -> float:
        return len(self.raw) / self.rate

    @cached_property
    def audio(self) -> np.ndarray:
        """16 kHz float32, resampled by ffmpeg exactly as ``audio.load`` reads a file of these samples
        (an upload of the same clip then gets the same transcript); a subprocess, so a server calls
        it off its event loop."""
        if self.rate == SAMPLE_RATE or len(self.raw) == 0:
            return np.asarray(self.raw, np.float32)
        return ffmpeg_to_16k(self.raw, self.rate)


def ffmpeg_to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """PCM16-valued float samples at ``rate`` -> 16 kHz float32 through ffmpeg (``audio.load``'s settings)."""
    from steermoe_core.audio.load import ffmpeg_binary

    cmd = [ffmpeg_binary(), "-nostdin", "-v", "error", "-threads", "0", "-f", "s16le", "-ar", str(rate), "-ac", "1", "-i", "-",
           "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, input=float_to_pcm16(audio), capture_output=True, check=True)
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


@dataclass
class SpeechStarted:
    audio_start_ms: int  # includes the prefix padding, as OpenAI's event does


@dataclass
class SpeechStopped:
    audio_end_ms: int  # includes the silence that ended it, as OpenAI's event does
    utterance: Utterance


@dataclass
class UtteranceDetector:
    """The stream's pending audio (since the last cut) and the voice-activity state machine over it."""

    rate: int = SAMPLE_RATE
    turn: TurnDetection | None = field(default_factory=TurnDetection)  # None: no cuts, only ``commit``
    method: str = "auto"
    max_idle_s: float = 30.0  # pending audio kept while nobody speaks (what a commit then reads)

    def __post_init__(self):
        self.pending = np.zeros(0, np.float32)  # input-rate audio since ``pending_start``
        self.pending_start = 0  # input samples from the stream's start
        self.received = 0  # input samples so far
        self.speech_from: int | None = None  # input sample where the current utterance starts (with padding)
        self._start_vad()

    def _start_vad(self) -> None:
        """Voice activity from the current sample on (none without turn detection)."""
        self._vad = FrameVad(self.method) if self.turn is not None else None
        self._to16k = StreamResampler(self.rate, start=self.received)
        self.origin_ms = self._to16k.origin * 1000 / SAMPLE_RATE  # where frame 0 starts
        self.frames = 0  # VAD frames so far
        self.last_speech = 0  # frame after the current utterance's last speech frame
        self.quiet = 0  # frames under the exit threshold since then
        self.speech_from = None

    @property
    def method_used(self) -> str | None:
        return self._vad.method if self._vad is not None else None

    @property
    def speaking(self) -> bool:
        return self.speech_from is not None

    def ms(self, samples: int) -> int:
        return int(round(samples * 1000 / self.rate))

    def _sample(self, ms: float) -> int:
        return int(round(ms * self.rate / 1000))

    def set_turn(self, turn: TurnDetection | None) -> None:
        """New settings; voice activity restarts from here (speech in progress is forgotten, its audio stays pending)."""
        self.turn = turn
        self._start_vad()

    def append(self, audio: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        """Add ``audio`` (float32 at ``rate``); the speech starts and stops it completes, in order."""
        audio = np.asarray(audio, np.float32)
        self.pending = np.concatenate([self.pending, audio])
        self.received += len(audio)
        events: list[SpeechStarted | SpeechStopped] = []
        turn = self.turn
        if self._vad is not None and turn is not None:
            exit_threshold = turn.threshold - 0.15
            silence_frames = max(1, math.ceil(turn.silence_duration_ms / FRAME_MS))
            for p in self._vad(self._to16k(audio)):
                i, self.frames = self.frames, self.frames + 1
                t0, t1 = self.origin_ms + i * FRAME_MS, self.origin_ms + (i + 1) * FRAME_MS  # the frame's span
                if self.speech_from is None:
                    if p >= turn.threshold:
                        start = max(self.pending_start, self._sample(t0 - turn.prefix_padding_ms))
                        self.speech_from, self.last_speech, self.quiet = start, i + 1, 0
                        events.append(SpeechStarted(self.ms(start)))
                    continue
                if p < exit_threshold:
                    self.quiet += 1
                else:
                    self.quiet, self.last_speech = 0, i + 1
                too_long = t1 - self.ms(self.speech_from) >= turn.max_utterance_s * 1000
                if self.quiet >= silence_frames or too_long:
                    stop = min(self.received, self._sample(t1))
                    end = min(stop, self._sample(self.origin_ms + self.last_speech * FRAME_MS + vad.PAD_S * 1000))
                    events.append(SpeechStopped(self.ms(stop), self._cut(self.speech_from, end, stop)))
        if self.speech_from is None:  # idle: keep at most ``max_idle_s`` for a commit
            excess = len(self.pending) - self._sample(self.max_idle_s * 1000)
            if excess > 0:
                self.pending, self.pending_start = self.pending[excess:], self.pending_start + excess
        return events

    def _cut(self, start: int, end: int, drop_to: int) -> Utterance:
        a, b = start - self.pending_start, max(start, end) - self.pending_start
        utt = Utterance(self.pending[a:b].copy(), self.rate, self.ms(start), self.ms(max(start, end)))
        k = max(0, drop_to - self.pending_start)
        self.pending, self.pending_start = self.pending[k:], self.pending_start + k
        self.speech_from, self.quiet = None, 0
        return utt

    def commit(self) -> Utterance:
        """All pending audio as one utterance (a client's commit)."""
        end = self.pending_start + len(self.pending)
        return self._cut(self.pending_start, end, end)

    def finish(self) -> Utterance | None:
        """The end of the stream: the speech in progress as the last utterance (None when nobody speaks;
        without turn detection, all that is pending when it holds any audio)."""
        end = self.pending_start + len(self.pending)
        if self.speech_from is not None:
            return self._cut(self.speech_from, end, end)
        if self.turn is None and len(self.pending):
            return self.commit()
        return None

    def clear(self) -> None:
        """Drop the pending audio (and any speech in progress)."""
        self.pending_start += len(self.pending)
        self.pending = np.zeros(0, np.float32)
        self.speech_from, self.quiet = None, 0

    @property
    def pending_ms(self) -> int:
        return self.ms(len(self.pending))


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM as float32 in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768).round().astype("<i2").tobytes()


def live_utterances(chunks, rate: int = SAMPLE_RATE, turn: TurnDetection | None = None, method: str = "auto"):
    """Utterances (16 kHz) from an iterable of raw PCM16 byte chunks at ``rate``, each as it ends; what
    is left when the chunks run out is the last one (when it holds anything)."""
    det = UtteranceDetector(rate, turn or TurnDetection(), method)
    odd = b""
    for chunk in chunks:
        data = odd + chunk
        odd = data[len(data) - len(data) % 2 :]
        for ev in det.append(pcm16_to_float(data[: len(data) - len(data) % 2])):
            if isinstance(ev, SpeechStopped):
                yield ev.utterance
    last = det.finish()
    if last is not None:
        yield last


def read_chunks(stream, size: int = 3200):
    """Raw bytes from a binary stream (standard input), read on a thread so a microphone piped in is
    drained while an utterance decodes; ends at EOF."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            while True:
                data = stream.read1(size) if hasattr(stream, "read1") else stream.read(size)
                if not data:
                    break
                q.put(data)
        finally:
            q.put(None)

    threading.Thread(target=pump, name="steermoe-live-read", daemon=True).start()
    while (data := q.get()) is not None:
        yield data


def transcribe_live(stream, sm, rate: int = SAMPLE_RATE, method: str | None = None, turn: TurnDetection | None = None,
                    max_new_tokens: int | None = None):
    """(utterance, ``Result``) for each utterance of raw PCM16 mono at ``rate`` read from ``stream``, as
    each ends: cut by ``UtteranceDetector`` (the server's realtime route cuts the same way), each
    planned as a transcript by the request planner (``sm.transcribe``). ``method``: the voice-activity
    detector, for the cuts and for the planner's (default: the model's policy)."""
    for utt in live_utterances(read_chunks(stream), rate, turn, method or sm.policy.vad):
        yield utt, sm.transcribe([utt.audio], batch_size=1, max_new_tokens=max_new_tokens, vad=method)[0]
