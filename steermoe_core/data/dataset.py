"""Reading prepared datasets (docs/design.md#prepared-data): Parquet shards of FLAC bytes + manifest.json.

Shards are read lazily and one at a time per worker, and batches are drawn within a shard, sorted
by length: memory stays at one shard, padding stays small, and order is still random (shards and
batches are shuffled each epoch from the seed).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.data.augment import Augment
from steermoe_core.data.batch import AudioBatch, pad_clips
from steermoe_core.errors import DataError

COLUMNS = ("id", "duration", "text", "prompt", "language")



@dataclass
class Example:
    id: str
    audio: np.ndarray  # float32 mono 16 kHz
    text: str
    prompt: str | None
    language: str | None


def list_shards(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder")
    shards = sorted(folder.glob("*.parquet"))
    if not shards:
        raise DataError(f"{folder}: no .parquet shards (prepare one with `steermoe prep`)")
    return shards


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def decode_flac(data: bytes) -> np.ndarray:
    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise DataError(f"stored audio is {sr} Hz, expected {SAMPLE_RATE}")
    return audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]


class ShardedDataset(torch.utils.data.Dataset):
    """Index = (shard, row). Metadata for all rows is read up front (small); audio on demand."""

    def __init__(self, folder: str | Path, max_duration: float | None = None):
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.shards = list_shards(folder)
        self.rows: list[tuple[int, int]] = []
        self.durations: list[float] = []
        self.meta: list[dict] = []
        self.too_long = 0
        for si, path in enumerate(self.shards):
            try:
                table = pq.read_table(path, columns=list(COLUMNS))
            except Exception as e:
                raise DataError(f"{path}: unreadable shard ({e})") from None
            for ri, row in enumerate(table.to_pylist()):
                if max_duration is not None and row["duration"] > max_duration:
                    self.too_long += 1
                    continue
                self.rows.append((si, ri))
                self.durations.append(float(row["duration"]))
                self.meta.append(row)
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _audio_column(self, si: int) -> list:
        if self._cached is None or self._cached[0] != si:
            import pyarrow.parquet as pq

            self._cached = (si, pq.read_table(self.shards[si], columns=["audio"]).column("audio").to_pylist())
        return self._cached[1]

    def __getitem__(self, i: int) -> Example:
        si, ri = self.rows[i]
        m = self.meta[i]
        try:
            audio = decode_flac(self._audio_column(si)[ri])
        except Exception as e:
            raise DataError(f"{self.shards[si]}: example {m['id']}: audio does not decode ({e})") from None
        return Example(m["id"], audio, m["text"], m["prompt"], m["language"])


def collate(examples: list[Example], default_prompt: str) -> AudioBatch:
    waves, lengths = pad_clips([e.audio for e in examples])
    return AudioBatch(
        waves=waves, lengths=lengths,
        prompts=[e.prompt or default_prompt for e in examples],
        targets=[e.text for e in examples],
    )


class Collate:
    """Training and evaluation batches: ``augment`` applied (training only), then ``collate``; the
    examples come back without their audio (ids for predictions files). Picklable for DataLoader workers."""

    def __init__(self, prompt: str, augment: Augment | None = None):
        self.prompt, self.augment = prompt, augment

    def __call__(self, examples: list[Example]) -> tuple[AudioBatch, list[Example]]:
        if self.augment is not None and self.augment.active:
            examples = [dataclasses.replace(e, audio=self.augment(e.audio, e.id)) for e in examples]
        batch = collate(examples, self.prompt)
        if self.augment is not None:
            batch.masks = self.augment.masks([e.id for e in examples])
        return batch, [Example(e.id, np.empty(0, np.float32), e.text, e.prompt, e.language) for e in examples]


def make_loader(
    ds: ShardedDataset, batches: list[list[int]], prompt: str, num_workers: int, augment: Augment | None = None
) -> Iterator:
    """(AudioBatch, examples without audio) per batch; ``augment`` applies to training only."""
    return iter(
        torch.utils.data.DataLoader(
            ds, batch_sampler=batches, collate_fn=Collate(prompt, augment), num_workers=num_workers,
            persistent_workers=False, prefetch_factor=4 if num_workers else None,
            pin_memory=torch.cuda.is_available(),
        )
    )
