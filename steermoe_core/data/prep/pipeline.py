"""Items -> shards, in parallel, resumable and idempotent.

Items are sorted by id and cut into fixed-size shards, so shard k always holds the same items;
each shard is written atomically with its own skip list in the Parquet metadata. ``--resume`` keeps
every finished shard, and a re-run writes byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from steermoe_core.audio.load import SAMPLE_RATE, AudioError, load_audio
from steermoe_core.data.prep.item import Item
from steermoe_core.data.prep.shards import Row, write_manifest, write_shard
from steermoe_core.errors import SourceError

SKIP_KEY = b"steermoe_skipped"


@dataclass
class PrepResult:
    out: Path
    manifest: dict
    skipped: list[dict] = field(default_factory=list)


def _passthrough_flac(path: str) -> bytes | None:
    """A 16 kHz mono 16-bit FLAC source is stored as is: no decode, no re-encode, same bytes."""
    if not path.lower().endswith(".flac"):
        return None
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:
        return None
    if info.samplerate == SAMPLE_RATE and info.channels == 1 and info.subtype == "PCM_16" and info.frames > 0:
        data = Path(path).read_bytes()
        try:  # prove it decodes to the end: a truncated file must be skipped, not stored
            audio, _ = sf.read(path, dtype="int16")
        except Exception:
            return None
        if len(audio) == info.frames and audio.any():
            return data
    return None


def _load(item: Item):
    if item.synth is not None:
        from steermoe_core.data.prep.synth import synthesize

        return synthesize(item.text, *item.synth)
    data = _passthrough_flac(item.path)
    if data is not None:
        return data
    return load_audio(item.path)


def _process_shard(items: list[Item], path: Path) -> dict:
    rows, skipped = [], []
    for it in items:
        try:
            audio = _load(it)
        except AudioError as e:
            skipped.append({"id": it.id, "input": it.path or it.text, "reason": str(e)})
            continue
        except Exception as e:  # a synthesiser crash or odd codec: still listed, never lost
            skipped.append({"id": it.id, "input": it.path or it.text, "reason": f"{type(e).__name__}: {e}"})
            continue
        rows.append(Row(it.id, audio, it.text, it.prompt, it.language, it.extra))
    info = write_shard(rows, path, {SKIP_KEY: json.dumps(skipped, ensure_ascii=False).encode()})
    return {**info, "skipped": skipped}


def _finished_shard(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except Exception:
        return None
    kv = meta.metadata or {}
    if SKIP_KEY not in kv:
        return None
    durations = pq.read_table(path, columns=["duration"]).column("duration").to_pylist()
    return {"examples": meta.num_rows, "seconds": float(sum(durations)), "skipped": json.loads(kv[SKIP_KEY])}


def run_prep(
    items: list[Item],
    out: Path,
    source: str,
    split: str,
    pre_skipped: list[dict] | None = None,
    workers: int = 0,
    shard_size: int = 1000,
    resume: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> PrepResult:
    """Write ``out/shard-NNNNN.parquet`` + ``out/manifest.json``; bad inputs land in the skip list."""
    out.mkdir(parents=True, exist_ok=True)
    items = sorted(items, key=lambda it: it.id)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        inputs = [it.path or it.text[:40] for it in items if it.id == dup]
        raise SourceError(f"{source}: duplicate utterance id {dup!r} ({' and '.join(map(str, inputs))})")
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    names = [f"shard-{k:05d}.parquet" for k in range(len(chunks))]
    stale = {p.name for p in out.glob("shard-*.parquet")} - set(names)
    for name in stale:  # shards of an earlier, larger run of this folder
        (out / name).unlink()
    if on_total:
        on_total(len(items))
    infos: dict[str, dict] = {}
    todo = []
    for name, chunk in zip(names, chunks):
        done = _finished_shard(out / name) if resume else None
        if done is not None:
            infos[name] = done
            if progress:
                progress(len(chunk))
        else:
            todo.append((name, chunk))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) <= 1:
        for name, chunk in todo:
            infos[name] = _process_shard(chunk, out / name)
            if progress:
                progress(len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(_process_shard, chunk, out / name): (name, len(chunk)) for name, chunk in todo}
            for fut in as_completed(futures):
                name, n = futures[fut]
                infos[name] = fut.result()
                if progress:
                    progress(n)
    skipped = list(pre_skipped or []) + [s for name in names for s in infos[name]["skipped"]]
    shard_info = {name: {"examples": i["examples"], "seconds": round(i["seconds"], 3)} for name, i in infos.items()}
    manifest = write_manifest(out, source, split, shard_info, skipped)
    return PrepResult(out, manifest, skipped)
