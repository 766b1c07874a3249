"""Items -> shards, in parallel, resumable and idempotent.

Items are sorted by id and cut into fixed-size shards, so shard k always holds the same items;
each shard is written atomically with its own skip list in the Parquet metadata. ``--resume`` keeps
every finished shard, and a re-run writes byte-identical files.

A resumed prep continues exactly or not at all: before any shard is written, ``.prep_inputs.json``
records every input (id, path, size, mtime, a hash of its text) and the shard size; ``--resume``
compares the inputs it finds now with that record and refuses, naming what changed, rather than
keep shards cut from other inputs (which would duplicate or lose ids). Each shard also carries a
hash of its own items, so a shard of anything else is never taken for finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from steermoe_core.audio.load import SAMPLE_RATE, AudioError, load_audio
from steermoe_core.data.prep.item import Item
from steermoe_core.atomic import write_text
from steermoe_core.data.prep.shards import Row, write_manifest, write_shard
from steermoe_core.errors import SourceError
from steermoe_core.workers import die_with_parent

SKIP_KEY = b"steermoe_skipped"
CHUNK_KEY = b"steermoe_items_sha256"  # the hash of the items a shard was cut from
INPUTS_FILE = ".prep_inputs.json"


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


def _item_record(it: Item) -> dict:
    """What a resumed prep compares: the input file's name, size and mtime, and a hash of the text,
    prompt, language and synthesis settings (so a changed transcript counts as a change too)."""
    words = json.dumps([it.text, it.prompt, it.language, it.synth, it.extra], ensure_ascii=False, sort_keys=True, default=str)
    rec = {"id": it.id, "text_sha256": hashlib.sha256(words.encode()).hexdigest()[:16]}
    if it.path is not None:
        try:
            st = os.stat(it.path)
            rec.update(path=str(it.path), size=st.st_size, mtime_ns=st.st_mtime_ns)
        except OSError:
            rec.update(path=str(it.path), size=None, mtime_ns=None)
    return rec


def _chunk_hash(records: list[dict]) -> str:
    """A shard's own items: ids, text hashes and sizes (not paths or mtimes, so a copy of the corpus
    elsewhere still writes byte-identical shards)."""
    key = [(r["id"], r["text_sha256"], r.get("size")) for r in records]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _describe_changes(out: Path, before: dict, now: dict) -> str | None:
    """One line naming what differs between the recorded inputs and today's, or None when nothing does."""
    parts = []
    if before.get("shard_size") != now["shard_size"]:
        parts.append(f"--shard-size was {before.get('shard_size')}, now {now['shard_size']}")
    old = {r["id"]: r for r in before.get("inputs", [])}
    new = {r["id"]: r for r in now["inputs"]}

    def some(ids: list[str], show) -> str:
        shown = ", ".join(show(i) for i in ids[:3])
        return shown + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")

    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(i for i in set(old) & set(new) if old[i] != new[i])
    if added:
        parts.append(f"{len(added)} added ({some(added, lambda i: new[i].get('path') or i)})")
    if removed:
        parts.append(f"{len(removed)} removed ({some(removed, lambda i: old[i].get('path') or i)})")
    if changed:
        def what(i: str) -> str:
            o, n = old[i], new[i]
            diff = [k for k in ("path", "size", "mtime_ns", "text_sha256") if o.get(k) != n.get(k)]
            return f"{n.get('path') or i}: {'/'.join(k.replace('_sha256', '').replace('_ns', '') for k in diff)}"
        parts.append(f"{len(changed)} changed ({some(changed, what)})")
    if not parts:
        return None
    return (f"{out}: the inputs changed since the prep being resumed ({'; '.join(parts)}); --resume would mix shards "
            "cut from both: prepare into a fresh --out, or run without --resume to redo this one")


def _check_resume(out: Path, state: dict) -> None:
    """Refuse a ``--resume`` whose inputs are not the ones the kept shards were cut from."""
    path = out / INPUTS_FILE
    if not path.is_file():
        if any(out.glob("shard-*.parquet")):
            raise SourceError(f"{out}: no record of the inputs its shards were cut from ({INPUTS_FILE}), so --resume "
                              "cannot check them: run without --resume, or prepare into a fresh --out")
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: unreadable ({e}); run without --resume") from None
    why = _describe_changes(out, before, state)
    if why:
        raise SourceError(why)


def _process_shard(items: list[Item], path: Path, chunk_hash: str = "") -> dict:
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
    meta = {SKIP_KEY: json.dumps(skipped, ensure_ascii=False).encode()}
    if chunk_hash:
        meta[CHUNK_KEY] = chunk_hash.encode()
    info = write_shard(rows, path, meta)
    return {**info, "skipped": skipped}


def _finished_shard(path: Path, chunk_hash: str | None) -> dict | None:
    """The counts of a shard already written from exactly these items (``chunk_hash`` None: from any
    items, as long as it was finished), or None (redo it)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except Exception:
        return None
    kv = meta.metadata or {}
    if SKIP_KEY not in kv or (chunk_hash is not None and kv.get(CHUNK_KEY, b"").decode() != chunk_hash):
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
    records = [_item_record(it) for it in items]
    state = {"shard_size": shard_size, "inputs": records}
    if resume:
        _check_resume(out, state)
    write_text(out / INPUTS_FILE, json.dumps(state, ensure_ascii=False))  # before any shard: what they are cut from
    hashes = [_chunk_hash(records[i : i + shard_size]) for i in range(0, len(items), shard_size)]
    stale = {p.name for p in out.glob("shard-*.parquet")} - set(names)
    for name in stale:  # shards of an earlier, larger run of this folder
        (out / name).unlink()
    if on_total:
        on_total(len(items))
    infos: dict[str, dict] = {}
    todo = []
    for name, chunk, digest in zip(names, chunks, hashes):
        done = _finished_shard(out / name, digest) if resume else None
        if done is not None:
            infos[name] = done
            if progress:
                progress(len(chunk))
        else:
            todo.append((name, chunk, digest))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) <= 1:
        for name, chunk, digest in todo:
            infos[name] = _process_shard(chunk, out / name, digest)
            if progress:
                progress(len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_process_shard, chunk, out / name, digest): (name, len(chunk)) for name, chunk, digest in todo}
            for fut in as_completed(futures):
                name, n = futures[fut]
                infos[name] = fut.result()
                if progress:
                    progress(n)
    skipped = list(pre_skipped or []) + [s for name in names for s in infos[name]["skipped"]]
    shard_info = {name: {"examples": i["examples"], "seconds": round(i["seconds"], 3)} for name, i in infos.items()}
    inputs_sha = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    manifest = write_manifest(out, source, split, shard_info, skipped, inputs={"count": len(items), "sha256": inputs_sha, "file": INPUTS_FILE})
    return PrepResult(out, manifest, skipped)
