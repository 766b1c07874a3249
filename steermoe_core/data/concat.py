"""Training on long windows: neighbouring utterances of one source joined into one example.

A model trained on single sentences of a few seconds reads a 20 s window badly: it loses the audio
and loops. ``data.concat_seconds`` joins neighbouring utterances of the same source (a speaker's
chapter, a recording's consecutive lines: ids that agree up to their last ``-`` or ``_``, in shard
order) into examples of up to that length, audio with a short pause between utterances and
transcripts with a space, for ``data.concat_prob`` of the groups; the rest stay single utterances,
so the model keeps reading short clips as well. Every utterance appears exactly once per epoch
either way. Which neighbours are joined is a function of the seed alone (same run, same examples).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.data.dataset import Example

PAUSE_S = 0.3  # between joined utterances: a sentence pause, which is what the VAD cuts long audio at


def source_of(example_id: str) -> str:
    """The source an utterance belongs to: its id up to the last '-' or '_' (LibriSpeech's
    ``spk-chapter-utt``, synth's ``prefix-voice-n``); an id without either is its own source."""
    cut = max(example_id.rfind("-"), example_id.rfind("_"))
    return example_id[:cut] if cut > 0 else example_id


class ConcatDataset(torch.utils.data.Dataset):
    """A view of a ``ShardedDataset`` whose items are runs of neighbouring utterances.

    Exposes what the sampler and the loader need: ``rows`` (the shard of each item's first
    utterance; an item never crosses shards), ``durations``, ``too_long``, ``meta``."""

    def __init__(self, base, max_seconds: float, prob: float, seed: int = 0, pause_s: float = PAUSE_S):
        self.base, self.pause = base, pause_s
        self.too_long = base.too_long
        rng = random.Random(seed)
        self.items: list[list[int]] = []
        i, n = 0, len(base)
        while i < n:
            group, total = [i], base.durations[i]
            if rng.random() < prob:
                j = i + 1
                while (
                    j < n and base.rows[j][0] == base.rows[i][0]
                    and source_of(base.meta[j]["id"]) == source_of(base.meta[i]["id"])
                    and (base.meta[j]["prompt"] or None) == (base.meta[i]["prompt"] or None)
                    and total + pause_s + base.durations[j] <= max_seconds
                ):
                    total += pause_s + base.durations[j]
                    group.append(j)
                    j += 1
            self.items.append(group)
            i = group[-1] + 1
        self.rows = [base.rows[g[0]] for g in self.items]
        self.durations = [sum(base.durations[k] for k in g) + pause_s * (len(g) - 1) for g in self.items]
        self.meta = [self._meta(g) for g in self.items]

    def _meta(self, group: list[int]) -> dict:
        first = self.base.meta[group[0]]
        return {**first, "id": first["id"] if len(group) == 1 else f"{first['id']}+{len(group) - 1}",
                "text": " ".join(self.base.meta[k]["text"] for k in group), "duration": None}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        parts = [self.base[k] for k in self.items[i]]
        if len(parts) == 1:
            return parts[0]
        gap = np.zeros(int(self.pause * SAMPLE_RATE), np.float32)
        audio = np.concatenate([x for p in parts for x in (p.audio, gap)][:-1])
        m = self.meta[i]
        return Example(m["id"], audio, m["text"], parts[0].prompt, parts[0].language)


def training_audio_stats(ds, tokenizer, sample: int = 2000) -> dict:
    """What a checkpoint records about the audio it trained on (meta.json ``training_audio``), so
    `infer` cuts long recordings into segments no longer than that and budgets each segment's
    decoding by the rate of its training transcripts: clip lengths and transcript tokens per second
    (the 95th percentile over up to ``sample`` examples)."""
    while hasattr(ds, "targets") and hasattr(ds, "base"):  # behaviour alignment's answers are not transcripts
        ds = ds.base
    durs = np.asarray(ds.durations, np.float64)
    if len(durs) == 0:
        return {}
    idx = np.linspace(0, len(durs) - 1, num=min(sample, len(durs))).astype(int)
    rates = []
    for i in idx:
        text = ds.meta[i]["text"] or ""
        if durs[i] > 0.2:
            rates.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]) / durs[i])
    return {
        "examples": int(len(durs)),
        "p50_seconds": round(float(np.percentile(durs, 50)), 2),
        "p95_seconds": round(float(np.percentile(durs, 95)), 2),
        "max_seconds": round(float(durs.max()), 2),
        "tokens_per_second": round(float(np.percentile(rates, 95)), 2) if rates else None,
    }
