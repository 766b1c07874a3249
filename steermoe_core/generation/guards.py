"""Stops for generation: each row's token budget and repetition loops, checked after every step.

A model trained on sentences of a few seconds, asked to read more, loses the audio and loops; a small
LLM asked to restate a text can copy it again and again. Greedy decoding stays deterministic: instead of
Whisper's temperature fallback, a loop is cut and one copy kept, and the row is flagged, never silently.
``DecodeGuard`` is backend-neutral: every backend's ``generate`` and ``complete`` take one.
"""

from __future__ import annotations

import re
import zlib

from steermoe_core.model.decoding import tail_repeats

COMPRESSION_RATIO_MAX = 2.4  # Whisper's compression_ratio_threshold


LONG_NGRAM = 16  # a repeated span longer than this is a whole sentence: two copies back to back are a loop


def loop_length(ids: list[int], max_ngram: int = 64, min_span: int = 8) -> int:
    """How many tokens at the end of ``ids`` are extra copies of a repeated n-gram (0 = no loop).

    A loop is the same n-gram (n <= ``max_ngram``) at least 3 times in a row at the tail (4 for
    n <= 2, as "no, no, no" can be real; 2 for a sentence-long n > ``LONG_NGRAM``: a small LLM that
    restates a transcript copies whole sentences, "Transcribed: X. Transcribed: X.") and covering at
    least ``min_span`` tokens."""
    for n in range(1, max_ngram + 1):
        need = 4 if n <= 2 else 3 if n <= LONG_NGRAM else 2
        if len(ids) < n * need:
            continue
        reps = tail_repeats(ids, n)
        if reps >= need and n * reps >= min_span:
            return n * (reps - 1)
    return 0


class DecodeGuard:
    """Per-row stops for one batch: each row's own token budget, and a repetition loop.

    ``check(rows)`` is called after every decoding step with each row's generated ids; it returns
    which rows must stop and records why in ``reasons`` (``"budget"``, ``"loop"``). A row that has
    reached end of turn is finished and never flagged (the padding after it is no loop).
    Backend-neutral: every backend's ``generate`` and ``complete`` take one."""

    def __init__(self, budgets: list[int], stop_ids: list[int] | None = None, constraints: list | None = None):
        self.budgets = budgets
        self.stop_ids = set(stop_ids or [])
        self.reasons: list[str | None] = [None] * len(budgets)
        self.finished = [False] * len(budgets)
        self.constraints = constraints if constraints and any(c is not None for c in constraints) else None

    def allowed(self, rows: list[list[int]], vocab: int):
        """Which token ids each row may take next, as a (rows, ``vocab``) numpy bool mask, or None when
        no row is constrained (``generation.tools.Constraint``: a tool call under its schema). A
        backend applies it to the logits before it picks; rows that are done take anything."""
        if self.constraints is None:
            return None
        import numpy as np

        mask = np.ones((len(rows), vocab), dtype=bool)
        for i, (row, c) in enumerate(zip(rows, self.constraints)):
            if c is None or self.finished[i] or self.reasons[i] is not None or (row and row[-1] in self.stop_ids):
                continue
            ok = c.allowed(row)
            mask[i] = False
            mask[i, : min(vocab, len(ok))] = ok[:vocab]
        return mask

    def check(self, rows: list[list[int]]) -> list[bool]:
        out = []
        for i, row in enumerate(rows):
            if self.reasons[i] is not None:
                out.append(True)
                continue
            if self.finished[i] or (row and row[-1] in self.stop_ids):
                self.finished[i] = True
                out.append(False)
                continue
            if len(row) >= self.budgets[i]:
                self.reasons[i] = "budget"
            elif (self.constraints is None or self.constraints[i] is None) and loop_length(row):  # a grammar bounds its own row
                self.reasons[i] = "loop"
            out.append(self.reasons[i] is not None)
        return out


def compression_ratio(text: str) -> float:
    """Bytes over zlib-compressed bytes: about 1.5-2 for speech, above 2.4 for a loop (Whisper's test)."""
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


def trim_text_loop(text: str, max_ngram: int = 48) -> str:
    """Keep one copy of a phrase repeated at the end of ``text`` (words, punctuation ignored)."""
    words = text.split()
    keys = [re.sub(r"\W+", "", w.lower()) for w in words]
    for n in range(1, max_ngram + 1):
        if len(keys) < 2 * n:
            continue
        reps = tail_repeats(keys, n)
        if reps >= (3 if n <= 2 else 2):
            return " ".join(words[: len(words) - n * (reps - 1)])
    return text


def check_text(text: str, reason: str | None) -> tuple[str, str | None]:
    """(text to keep, flag): a loop (guard or compression ratio) keeps one copy; a budget cut is flagged."""
    if reason == "loop" or (len(text) > 40 and compression_ratio(text) > COMPRESSION_RATIO_MAX):
        return trim_text_loop(text), "loop"
    return text, reason
