"""The server's counters, rendered in Prometheus' text format (no client library needed).

Written by the event loop (requests) and the batcher thread (batches, tokens, audio); each field
has one writer, so plain attributes under the GIL are enough."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds


@dataclass
class Histogram:
    """A Prometheus histogram of seconds: cumulative bucket counts, sum and count."""

    buckets: tuple = LATENCY_BUCKETS
    counts: list = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        for i, b in enumerate(self.buckets):
            if seconds <= b:
                self.counts[i] += 1
        self.total += seconds
        self.n += 1

    def render(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


@dataclass
class Metrics:
    requests: collections.Counter = field(default_factory=collections.Counter)  # (endpoint, status) -> n
    queue_depth: int = 0
    batch_counts: collections.Counter = field(default_factory=collections.Counter)  # rows -> batches
    audio_seconds: float = 0.0
    generated_tokens: int = 0
    loaded: bool = False
    # live transcription (WS /v1/realtime): from an utterance's commit (a client's, or server VAD's at
    # the silence that ended the speech) to its first delta and to its completed transcript
    realtime_sessions: int = 0
    realtime_utterances: int = 0
    realtime_first_delta: Histogram = field(default_factory=Histogram)
    realtime_completed: Histogram = field(default_factory=Histogram)

    def observe_realtime_first(self, seconds: float) -> None:
        self.realtime_first_delta.observe(seconds)

    def observe_realtime_completed(self, seconds: float) -> None:
        self.realtime_completed.observe(seconds)

    def observe_batch(self, rows: int) -> None:
        self.batch_counts[rows] += 1

    @property
    def largest_batch(self) -> int:
        return max(self.batch_counts, default=0)

    def render(self) -> str:
        out = [
            "# HELP steermoe_requests_total HTTP requests answered, by endpoint and status code.",
            "# TYPE steermoe_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            out.append(f'steermoe_requests_total{{endpoint="{path}",status="{status}"}} {n}')
        out += [
            "# HELP steermoe_queue_depth Requests waiting for the model.",
            "# TYPE steermoe_queue_depth gauge",
            f"steermoe_queue_depth {self.queue_depth}",
            "# HELP steermoe_batch_size Rows (windows or chats) per model call.",
            "# TYPE steermoe_batch_size histogram",
        ]
        total = sum(self.batch_counts.values())
        for b in BATCH_BUCKETS:
            out.append(f'steermoe_batch_size_bucket{{le="{b}"}} {sum(n for k, n in self.batch_counts.items() if k <= b)}')
        out += [
            f'steermoe_batch_size_bucket{{le="+Inf"}} {total}',
            f"steermoe_batch_size_sum {sum(k * n for k, n in self.batch_counts.items())}",
            f"steermoe_batch_size_count {total}",
            "# HELP steermoe_batch_size_max The largest batch so far.",
            "# TYPE steermoe_batch_size_max gauge",
            f"steermoe_batch_size_max {self.largest_batch}",
            "# HELP steermoe_audio_seconds_total Seconds of audio processed.",
            "# TYPE steermoe_audio_seconds_total counter",
            f"steermoe_audio_seconds_total {self.audio_seconds:.3f}",
            "# HELP steermoe_generated_tokens_total Tokens generated.",
            "# TYPE steermoe_generated_tokens_total counter",
            f"steermoe_generated_tokens_total {self.generated_tokens}",
            "# HELP steermoe_model_loaded 1 once the model answers requests.",
            "# TYPE steermoe_model_loaded gauge",
            f"steermoe_model_loaded {int(self.loaded)}",
            "# HELP steermoe_realtime_sessions Live transcription connections open.",
            "# TYPE steermoe_realtime_sessions gauge",
            f"steermoe_realtime_sessions {self.realtime_sessions}",
            "# HELP steermoe_realtime_utterances_total Live utterances committed (by the client or by server VAD).",
            "# TYPE steermoe_realtime_utterances_total counter",
            f"steermoe_realtime_utterances_total {self.realtime_utterances}",
        ]
        out += self.realtime_first_delta.render(
            "steermoe_realtime_first_delta_seconds", "Live utterances: from speech end (server VAD) or commit to the first delta.")
        out += self.realtime_completed.render(
            "steermoe_realtime_completed_seconds", "Live utterances: from speech end (server VAD) or commit to the completed transcript.")
        return "\n".join(out) + "\n"
