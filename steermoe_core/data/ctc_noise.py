"""Transcripts corrupted the way a CTC read-out errs, for training the LLM's reader on text alone.

With ``model.projector.argmax_embeddings`` (and ``drop_blank``) the LLM reads the CTC read-out's word
pieces as text; a reader trained only on clips sees a few hundred sentences and learns to paraphrase.
Text costs no audio: each step's transcripts, corrupted here, stand in for what the CTC head would
have heard (TASU trains the LLM side on CTC outputs simulated from text the same way). The errors
modelled are the read-out's own: word pieces lost, pieces replaced by ones spelled alike (it hears
"coast" as "cost"), and stray short pieces; a share of rows stays clean, so faithful copying is
learned too. Runs of lost pieces, false starts and an error rate that varies from row to row
complete the picture. Only numpy: no torch, no tokenizer calls in the training step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class NoiseConfig:
    """Rates per word piece, scaled per row by a factor drawn from ``severity`` (read-outs err unevenly:
    one clip loses a word, the next half of them). The defaults match a CTC stage's read-out of clips it
    never trained on (``benchmarks/ctc_noise_fit.py``: about 31% WER, 18% substituted, 11% lost, 2%
    inserted, 2% of rows clean), so the reader practises on the errors it will meet."""

    clean: float = 0.03  # rows left as they are
    drop: float = 0.09  # per piece: lost
    burst: float = 0.3  # after a lost piece: the next one is lost too (a read-out loses whole words)
    swap: float = 0.16  # per piece: replaced by a piece spelled alike
    stutter: float = 0.02  # per piece: a false start spelled alike before it ("Ex excuse")
    insert: float = 0.03  # per piece: a short stray piece after it
    severity: tuple[float, float] = (0.6, 1.4)  # this row's multiplier of the per-piece rates, drawn uniformly

    @classmethod
    def parse(cls, overrides: list[str]) -> NoiseConfig:
        """The defaults with ``KEY=VALUE`` overrides (``severity=0.5,1.5``); an unknown key or a bad value is a one-line error."""
        from steermoe_core.errors import RecipeError

        names = {f.name for f in fields(cls)}
        values: dict = {}
        for kv in overrides:
            key, _, value = kv.partition("=")
            if key not in names:
                raise RecipeError(f"noise {kv}: no such setting (settings: {', '.join(sorted(names))})")
            try:
                values[key] = tuple(float(x) for x in value.split(",")) if key == "severity" else float(value)
            except ValueError:
                raise RecipeError(f"noise {kv}: not a number") from None
        return cls(**values)


def tokenizer_pieces(tokenizer) -> list[str]:
    """A Hugging Face tokenizer's vocabulary, each piece spelled as it spells them (``Ġcoast``): what
    ``spelling_neighbours`` and ``short_pieces`` read."""
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def spelling_neighbours(pieces: list[str]) -> list[np.ndarray]:
    """For each vocabulary entry, the ids of entries spelled alike: the same word-start mark and the
    same first two letters, case-blind (the tokenizer's own piece strings, e.g. ``Ġcoast``)."""
    keys: dict[tuple[bool, str], list[int]] = {}
    key_of = []
    for i, p in enumerate(pieces):
        start = p.startswith(("Ġ", "▁", " "))
        letters = p.lstrip("Ġ▁ ").lower()
        k = (start, letters[:2]) if len(letters) >= 2 and letters[:2].isalpha() else None
        key_of.append(k)
        if k is not None:
            keys.setdefault(k, []).append(i)
    groups = {k: np.asarray(v, dtype=np.int64) for k, v in keys.items()}
    empty = np.zeros(0, dtype=np.int64)
    return [groups[k] if k is not None else empty for k in key_of]


def short_pieces(pieces: list[str]) -> np.ndarray:
    """Ids of one- and two-letter pieces: what a CTC read-out strews between words."""
    return np.asarray([i for i, p in enumerate(pieces) if 1 <= len(p.lstrip("Ġ▁ ")) <= 2 and p.lstrip("Ġ▁ ").isalpha()],
                      dtype=np.int64)


def corrupt(ids: list[int], rng: np.random.Generator, neighbours: list[np.ndarray], strays: np.ndarray,
            cfg: NoiseConfig = NoiseConfig()) -> list[int]:
    """``ids`` as a CTC read-out might have heard them; never empty."""
    if rng.random() < cfg.clean:
        return list(ids)
    k = rng.uniform(*cfg.severity)
    drop, swap, stutter, insert = (min(r * k, 1.0) for r in (cfg.drop, cfg.swap, cfg.stutter, cfg.insert))
    out: list[int] = []
    losing = False
    for t in ids:
        if losing and rng.random() < cfg.burst:
            continue
        u = rng.random()
        losing = u < drop
        if losing:
            continue
        alike = neighbours[t]
        if len(alike) > 1 and rng.random() < stutter:
            out.append(int(alike[rng.integers(len(alike))]))
        out.append(int(alike[rng.integers(len(alike))]) if u < drop + swap and len(alike) > 1 else int(t))
        if len(strays) and rng.random() < insert:
            out.append(int(strays[rng.integers(len(strays))]))
    return out or list(ids[:1])


@dataclass
class TextBatch:
    """A text-only micro-batch: the LLM reads the word pieces ``read[i]`` where audio would be and must
    write ``targets[i]`` (``SteerMoEModel.forward`` dispatches it to ``text_forward``)."""

    targets: list[str]
    read: list[list[int]]
    prompt: str


class ReaderText:
    """The sentences of a text file as text-only micro-batches, the same for a given step whatever came
    before it (a resumed run reads what the uninterrupted one would have): shuffled once with ``seed``;
    micro-batch ``k`` of process ``rank`` takes its sentences in turn, cuts a share ``fragments`` of them
    to a few words (``fragment``) and corrupts them with a generator seeded by (seed, k, rank)."""

    def __init__(self, path: str | Path, pieces: list[str], ids_of: Callable[[list[str]], list[list[int]]],
                 prompt: str, seed: int = 0, noise: NoiseConfig = NoiseConfig(), fragments: float = 0.0):
        from steermoe_core.errors import RecipeError

        path = Path(path)
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"data.reader_text: cannot read {path} ({e})") from None
        if not lines:
            raise RecipeError(f"data.reader_text: {path} holds no sentences")
        random.Random(seed).shuffle(lines)
        self.lines, self.ids_of, self.prompt, self.seed, self.noise = lines, ids_of, prompt, seed, noise
        self.fragments = fragments
        self.neighbours, self.strays = spelling_neighbours(pieces), short_pieces(pieces)

    @classmethod
    def for_tokenizer(cls, path: str | Path, tokenizer, ids_of: Callable[[list[str]], list[list[int]]], prompt: str,
                      seed: int = 0, noise: NoiseConfig = NoiseConfig(), fragments: float = 0.0) -> ReaderText:
        """The reader text of a Hugging Face tokenizer's model (its pieces: ``tokenizer_pieces``)."""
        return cls(path, tokenizer_pieces(tokenizer), ids_of, prompt, seed, noise, fragments)

    def batch(self, k: int, size: int, rank: int = 0, world_size: int = 1) -> TextBatch:
        start = ((k * world_size + rank) * size) % len(self.lines)
        texts = [self.lines[(start + i) % len(self.lines)] for i in range(size)]
        rng = np.random.default_rng([self.seed, k, rank])
        if self.fragments:
            texts = [fragment(t, rng) if rng.random() < self.fragments else t for t in texts]
        read = [corrupt(ids, rng, self.neighbours, self.strays, self.noise) for ids in self.ids_of(texts)]
        return TextBatch(texts, read, self.prompt)


def fragment(sentence: str, rng: np.random.Generator, longest: int = 4) -> str:
    """1 to ``longest`` consecutive words of ``sentence``, capitalised and closed with a full stop: a short
    utterance ("Hello world.") for a reader that otherwise reads only 5-20-word sentences and, shown a
    two-word read-out, runs on past it (it wrote the prompt back after "Howlow w")."""
    words = sentence.split()
    n = int(rng.integers(1, min(longest, len(words)) + 1))
    i = int(rng.integers(0, len(words) - n + 1))
    text = " ".join(words[i:i + n]).strip(" ,;:.!?\"'()-")
    return text[:1].upper() + text[1:] + "." if text else sentence
