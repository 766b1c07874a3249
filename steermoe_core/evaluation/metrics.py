"""Scoring (docs/design.md#evaluation): WER/CER through jiwer after the normalisation the field reports with."""

from __future__ import annotations

import functools
import re
import string
import unicodedata


@functools.lru_cache(maxsize=1)
def _english():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """Whisper's English normaliser: case, punctuation, spelling variants, numbers."""
    return " ".join(_english()(text).split())


_ZH_PUNCT = set(string.punctuation) | set("，。！？、；：“”‘’（）《》【】…—～·「」『』")


def normalize_chinese(text: str) -> str:
    """Full-width to half-width (NFKC), drop punctuation and all spaces: CER counts characters only."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if not c.isspace() and c not in _ZH_PUNCT and not unicodedata.category(c).startswith("P"))


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    pairs = [(r, h) for r, h in zip(map(normalize_english, refs), map(normalize_english, hyps)) if r]
    if not pairs:
        return 0.0
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def char_error_rate(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    pairs = [(r, h) for r, h in zip(map(normalize_chinese, refs), map(normalize_chinese, hyps)) if r]
    if not pairs:
        return 0.0
    return float(jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]))


def _qa_norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_scores(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Exact match after normalisation, and the reference's lenient containment, reported apart.

    ``refs`` may hold several acceptable answers separated by ``|``.
    """
    exact = lenient = 0
    for ref, hyp in zip(refs, hyps):
        answers = [_qa_norm(a) for a in ref.split("|") if a.strip()]
        h = _qa_norm(hyp)
        exact += any(h == a for a in answers)
        lenient += any(a and (a in h or (h and h in a)) for a in answers)
    n = max(len(refs), 1)
    return {"qa_exact": exact / n, "qa_lenient": lenient / n}


def score(metric: str, refs: list[str], hyps: list[str]) -> dict[str, float]:
    """All figures for a headline metric name; the headline is under the metric's own name."""
    if metric == "wer":
        return {"wer": word_error_rate(refs, hyps)}
    if metric == "cer":
        return {"cer": char_error_rate(refs, hyps)}
    if metric == "qa":
        return qa_scores(refs, hyps)
    raise ValueError(f"unknown metric {metric!r}")
