"""Guarding greedy decoding against runaway loops, the classic failure of LLM-based ASR.

Greedy decoding sometimes locks into repeating a word or phrase until the token budget runs out
("long long long long ..."). Whisper handles this with temperature fallback, which gives up
determinism; we keep decoding greedy and cut a loop instead: when the output ends in the same
n-gram (n <= 4) repeated ``min_repeats`` or more times in a row, one copy is kept.
"""

from __future__ import annotations


def trim_loops(ids: list[int], min_repeats: int = 4, max_ngram: int = 4) -> list[int]:
    for n in range(1, max_ngram + 1):
        if len(ids) < n * min_repeats:
            continue
        gram = ids[-n:]
        reps = 1
        while len(ids) >= n * (reps + 1) and ids[-n * (reps + 1) : len(ids) - n * reps] == gram:
            reps += 1
        if reps >= min_repeats:
            return ids[: len(ids) - n * (reps - 1)]
    return ids
