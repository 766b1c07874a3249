"""Writing the prepared layout (docs/design.md#prepared-data): Parquet shards of FLAC bytes + manifest.json.

Shards are written atomically and deterministically (fixed FLAC settings, no timestamps), so a
re-run produces byte-identical files and ``--resume`` can trust any shard that exists.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steermoe_core.atomic import atomic_file, write_text
from steermoe_core.audio.load import SAMPLE_RATE

PREP_VERSION = 1


@dataclass
class Row:
    id: str
    audio: np.ndarray | bytes  # float32 mono 16 kHz, or FLAC bytes already in the stored format
    text: str
    prompt: str | None = None
    language: str | None = None
    extra: dict | None = None  # source-specific (ClothoAQA: every answer with its confidence)


def encode_flac(audio: np.ndarray) -> bytes:
    """16-bit FLAC at 16 kHz: lossless for 16-bit sources, a third of the size of WAV."""
    import soundfile as sf

    buf = io.BytesIO()
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)  # soundfile scales by 2^15
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def schema(metadata: dict[bytes, bytes] | None = None):
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("audio", pa.binary()), ("duration", pa.float32()),
        ("text", pa.string()), ("prompt", pa.string()), ("language", pa.string()),
        ("extra", pa.string()),  # JSON or null; beyond the documented columns, ignored by readers that don't know it
    ], metadata=metadata)


def _flac_and_duration(audio: np.ndarray | bytes) -> tuple[bytes, float]:
    if isinstance(audio, bytes):
        import soundfile as sf

        return audio, sf.info(io.BytesIO(audio)).frames / SAMPLE_RATE
    return encode_flac(audio), len(audio) / SAMPLE_RATE


def write_shard(rows: list[Row], path: Path, metadata: dict[bytes, bytes] | None = None) -> dict:
    """Write one shard; returns its counts for the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = [_flac_and_duration(r.audio) for r in rows]
    cols = {
        "id": [r.id for r in rows],
        "audio": [e[0] for e in encoded],
        "duration": [e[1] for e in encoded],
        "text": [r.text for r in rows],
        "prompt": [r.prompt for r in rows],
        "language": [r.language for r in rows],
        "extra": [json.dumps(r.extra, ensure_ascii=False, sort_keys=True) if r.extra else None for r in rows],
    }
    table = pa.table(cols, schema=schema(metadata))
    with atomic_file(path) as f:
        pq.write_table(table, f, compression="none", row_group_size=256, write_statistics=False)
    return {"examples": len(rows), "seconds": float(sum(cols["duration"]))}


def write_manifest(out: Path, source: str, split: str, shards: dict[str, dict], skipped: list[dict],
                   inputs: dict | None = None) -> dict:
    """``inputs``: how many inputs were read and the hash of their record (names, sizes, mtimes, texts)."""
    manifest = {
        "source": source,
        "split": split,
        "prep_version": PREP_VERSION,
        "examples": sum(s["examples"] for s in shards.values()),
        "hours": round(sum(s["seconds"] for s in shards.values()) / 3600, 6),
        "shards": dict(sorted(shards.items())),
        "skipped": skipped,
        **({"inputs": inputs} if inputs is not None else {}),
    }
    write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest
