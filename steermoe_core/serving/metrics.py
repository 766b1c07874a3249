"""The server's counters, rendered in Prometheus' text format (no client library needed).

Written by the event loop (requests) and the batcher thread (batches, tokens, audio); each field
has one writer, so plain attributes under the GIL are enough."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Metrics:
    requests: collections.Counter = field(default_factory=collections.Counter)  # (endpoint, status) -> n
    queue_depth: int = 0
    batch_counts: collections.Counter = field(default_factory=collections.Counter)  # rows -> batches
    audio_seconds: float = 0.0
    generated_tokens: int = 0
    loaded: bool = False

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
        ]
        return "\n".join(out) + "\n"
