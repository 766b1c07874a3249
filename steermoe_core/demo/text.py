"""The demo's text: natural English to train on and two held-out sets to score on.

- training and in-domain held-out: Brown Corpus sentences (news, fiction, science, ...; 24k distinct
  words); the last ``IN_DOMAIN_POOL`` lines are never trained on.
- out-of-domain: the Harvard sentences (IEEE 1969), a different source whose sentences never occur
  in the training text, spoken by voices the training never heard (``HELDOUT_VOICES``).
- `make demo`'s adaptation: the Harvard sentences after the first ``ADAPT_TEST_POOL`` to adapt on,
  the first ones (which the out-of-domain set also uses) to score on; the two never overlap. Its replay
  clips (so the adapter keeps its training voices) are Brown training sentences, never the held-out ones.
Sources and licences: ``demo/data/SOURCES.md``.
"""

from __future__ import annotations

import functools
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
IN_DOMAIN_POOL = 300
ADAPT_TEST_POOL = 100  # the first Harvard sentences: scored, never adapted on

# espeak-ng variants (+m/+f) change pitch and formants; flite's voices are different speakers.
TRAIN_VOICES = (
    "flite:slt", "flite:rms", "flite:kal16",
    "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3", "espeak:en-gb-scotland+m3", "espeak:en-029+f2",
    "espeak:en-gb-x-gbclan+m2", "espeak:en-us+m4",
)
HELDOUT_VOICES = ("flite:awb", "espeak:en-us-nyc+f4", "espeak:en-gb-x-rp+m5", "espeak:en-gb-x-gbcwmd+f1")
# `make demo` adapts the shipped model to the held-out voice the base run reads worst: flite:awb, a Scottish-accented
# male voice built from real recordings (CMU ARCTIC), where it scored 63.8% and Whisper tiny.en's own decoder
# 17.2% (docs/demo.md), so the encoder hears it well and the adapter has the most to gain. Measured with
# all four held-out voices, 26 steps took awb from 68% to 47% while the two hardest espeak-ng voices,
# which Whisper's decoder also reads badly, moved a few points either way.
ADAPT_VOICES = ("flite:awb",)


@functools.lru_cache(maxsize=2)
def _lines(name: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip())


def train_sentences(n: int) -> list[str]:
    pool = _lines("brown.txt")[:-IN_DOMAIN_POOL]
    if n > len(pool):
        raise ValueError(f"the demo has {len(pool)} training sentences, {n} asked for")
    return list(pool[:n])


def in_domain_sentences(n: int) -> list[str]:
    """Held-out Brown sentences: same kind of text as training, never trained on."""
    return list(_lines("brown.txt")[-IN_DOMAIN_POOL:][:n])


def out_of_domain_sentences(n: int) -> list[str]:
    return list(_lines("harvard.txt")[:n])


def adapt_test_sentences(n: int) -> list[str]:
    """Harvard sentences `make demo` scores its adaptation on: the first ``n`` (the out-of-domain set's)."""
    if n > ADAPT_TEST_POOL:
        raise ValueError(f"the demo holds out {ADAPT_TEST_POOL} Harvard sentences to score on, {n} asked for")
    return list(_lines("harvard.txt")[:n])


def adapt_train_sentences(n: int) -> list[str]:
    """Harvard sentences `make demo` adapts on: after the held-out pool, so no scored sentence is trained on."""
    pool = _lines("harvard.txt")[ADAPT_TEST_POOL:]
    if n > len(pool):
        raise ValueError(f"the demo has {len(pool)} Harvard sentences to adapt on, {n} asked for")
    return list(pool[:n])


def adapt_replay_sentences(n: int) -> list[str]:
    """Brown sentences `make demo` replays in the training voices while it adapts: the first ``n`` of the
    training text the shipped run (`demo --full`) trained on, never the held-out in-domain pool it is scored on."""
    return train_sentences(n)
