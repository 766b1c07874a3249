"""Guarding greedy decoding against runaway loops, the classic failure of LLM-based ASR.

Greedy decoding sometimes locks into repeating a word or phrase until the token budget runs out
("long long long long ..."). Whisper handles this with temperature fallback, which gives up
determinism; we keep decoding greedy and cut a loop instead: when the output ends in the same
n-gram (n <= 4) repeated ``min_repeats`` or more times in a row, one copy is kept.
"""

from __future__ import annotations

from collections.abc import Iterable


def tail_repeats(seq: list, n: int) -> int:
    """How many copies of its last ``n`` items ``seq`` ends with, back to back (1: no repeat).

    The one scan behind every loop check: token ids here and in `inference.longform`'s guard, words
    in its text check."""
    gram = seq[-n:]
    reps = 1
    while len(seq) >= n * (reps + 1) and seq[len(seq) - n * (reps + 1) : len(seq) - n * reps] == gram:
        reps += 1
    return reps


def trim_loops(ids: list[int], min_repeats: int = 4, max_ngram: int = 4) -> list[int]:
    for n in range(1, max_ngram + 1):
        if len(ids) < n * min_repeats:
            continue
        reps = tail_repeats(ids, n)
        if reps >= min_repeats:
            return ids[: len(ids) - n * (reps - 1)]
    return ids


def finish_rows(rows: Iterable[list[int]], stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Generated ids per example, as every backend hands them to the tokenizer: the padding that
    follows an early finisher dropped, and a row that never reached end-of-turn (it ran out of
    budget) cut after its first copy of a runaway loop."""
    stops = set(stop_ids)
    out = []
    for row in rows:
        row = list(row)
        while row and row[-1] == pad_id and pad_id not in stops:
            row.pop()
        out.append(row if row and row[-1] in stops else trim_loops(row))
    return out
