"""Synthetic training speech at scale: one clip per distinct sentence, hundreds of voices, in resumable chunks.

``prep synth`` rotates a handful of voices over a text file and writes its shards at the end; a set of
tens of hours in Kokoro voices costs a CPU-day, so it has to be built in the background, a little at a
time, and be trainable on while it grows. ``plan`` draws every sentence's voice, pitch and tempo from a
seeded generator (the plan of sentence n never depends on how many sentences follow it);
``synthesise_chunks`` writes ``shard-NNNNN.parquet`` one chunk of the plan at a time, each atomically
and with the hash of the items it was cut from, and rewrites ``manifest.json`` after each. Killed and
restarted, it keeps every finished shard and redoes only the one it was in (whose Kokoro clips come back
from the synthesis cache). ``ShardedDataset`` reads whatever shards exist, so a run can train on the first
hours while the rest is made.

Voices (what varies clip by clip, per the literature on synthetic ASR data: speakers, rate, noise):

- ``kokoro:mix-K`` for K below ``n_mix``: seeded blends of Kokoro's four training voices, one speaker per K;
  ``jf_tebukuro`` is in none (a held-out neural voice), nor are the voices reserved for evaluation.
- ``kokoro:en-mix-K`` instead, on ``english_fraction`` of the Kokoro clips: seeded blends of two of
  Kokoro's American and British English voices (``$STEERMOE_KOKORO_VOICES``, see ``synth``), native
  speakers where the packaged ones read English with a Japanese accent.
- a pitch and formant shift (``@pS``) of -3 to +3 semitones on about two clips in three, and a speaking
  rate of 0.85-1.2.
- ``robotic_fraction`` of the clips in flite and espeak-ng voices (``ROBOTIC_TRAIN_VOICES``: none of the
  demo's held-out robotic voices or dialects).

Noise and room effects are left to training-time augmentation (``data.noise_prob``, ``data.reverb_prob``),
drawn afresh every epoch.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from steermoe_core.data.prep.item import Item

# espeak-ng dialects and variants, flite's US voices; the demo's held-out voices (flite:awb,
# espeak en-us-nyc, en-gb-x-rp, en-gb-x-gbcwmd) are left out whole, dialect and all
ESPEAK_DIALECTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-029")
ESPEAK_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+klatt", "+croak")
ROBOTIC_TRAIN_VOICES = ("flite:slt", "flite:rms", "flite:kal16") + tuple(
    f"espeak:{d}{v}" for d in ESPEAK_DIALECTS for v in ESPEAK_VARIANTS)
PITCHES = (-3, -2, -1, 0, 0, 0, 1, 2, 3)  # semitones; a third of clips unshifted
SPEEDS = (0.85, 0.9, 0.95, 1.0, 1.0, 1.05, 1.1, 1.2)


def voice_for(n: int, seed: int, n_mix: int, robotic_fraction: float, english_fraction: float = 0.0) -> tuple[str, float]:
    """Sentence ``n``'s voice (``ENGINE:NAME[@pS]``) and speaking rate, from (seed, n) alone. The English
    voices are drawn last, so ``english_fraction`` = 0 plans exactly what a plan without them did."""
    rng = np.random.default_rng([seed, n])
    if rng.random() < robotic_fraction:
        voice = ROBOTIC_TRAIN_VOICES[int(rng.integers(len(ROBOTIC_TRAIN_VOICES)))]
        pitch = int(rng.choice((-2, -1, 0, 0, 1, 2)))
    else:
        voice = f"kokoro:mix-{int(rng.integers(n_mix))}"
        pitch = int(rng.choice(PITCHES))
    speed = float(rng.choice(SPEEDS))
    if english_fraction and voice.startswith("kokoro:") and rng.random() < english_fraction:
        voice = f"kokoro:en-mix-{int(rng.integers(n_mix))}"
    return (f"{voice}@p{pitch:+d}" if pitch else voice), speed


def plan(sentences: list[str], seed: int = 0, n_mix: int = 400, robotic_fraction: float = 0.2,
         prefix: str = "corpus", english_fraction: float = 0.0) -> list[Item]:
    """One training item per sentence, each in its own drawn voice and rate (reserved voices refused)."""
    from steermoe_core.data.prep.synth import check_training_voices, parse_voice

    items = []
    parsed: dict[str, tuple[str, str]] = {}
    for n, text in enumerate(sentences):
        spec, speed = voice_for(n, seed, n_mix, robotic_fraction, english_fraction)
        if spec not in parsed:
            check_training_voices([spec])
            parsed[spec] = parse_voice(spec)
        engine, voice = parsed[spec]
        items.append(Item(f"{prefix}-{n:06d}", text, synth=(engine, voice, speed), language="en",
                          extra={"voice": spec, "speed": speed}))
    return items


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (espeak-ng phonemisation, flite)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed_shard(part: list[Item], path: Path, digest: str) -> tuple[dict, float, float]:
    """``_process_shard`` with its wall and CPU seconds, measured where it runs (a worker or this process)."""
    from steermoe_core.data.prep.pipeline import _process_shard

    t0, c0 = time.monotonic(), cpu_seconds()
    info = _process_shard(part, path, digest)
    return info, time.monotonic() - t0, cpu_seconds() - c0


def synthesise_chunks(items: list[Item], out: Path, chunk: int = 200, log: Callable[[str], None] = print,
                      stop_after: int = 0, first: int = 0, workers: int = 1) -> dict:
    """Write ``items`` as shards of ``chunk`` items under ``out``, skipping shards already finished from the
    same items; ``manifest.json`` is rewritten after every shard. ``stop_after`` > 0 stops after that many
    new shards; ``first`` > 0 synthesises no shard before that one (a machine that lost the set starts on
    sentences it has not trained on; finished earlier shards are still listed, whatever plan made them, so
    a set can go on in new voices from shard ``first``). ``workers`` > 1 makes that
    many shards at once, one process each (Kokoro runs one thread a clip, so one process uses one core).
    Returns the manifest."""
    from steermoe_core.data.prep.pipeline import _chunk_hash, _finished_shard, _item_record
    from steermoe_core.workers import die_with_parent

    out.mkdir(parents=True, exist_ok=True)
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    infos: dict[str, dict] = {}
    todo: list[tuple[int, str, list[Item], str]] = []
    last = -1  # the latest shard finished: the manifest counts the sentences up to its end
    for k, part in enumerate(chunks):
        name = f"shard-{k:05d}.parquet"
        digest = _chunk_hash([_item_record(it) for it in part]) if k >= first else None  # before first: any finished shard
        info = _finished_shard(out / name, digest)
        if info is not None:
            infos[name], last = info, k
        elif k >= first and not (stop_after and len(todo) >= stop_after):
            todo.append((k, name, part, digest))

    def record(k: int, name: str, info: dict, wall: float, cpu: float) -> dict:
        nonlocal last
        infos[name], last = info, max(last, k)
        log(json.dumps({"shard": name, "clips": info["examples"], "skipped": len(info["skipped"]),
                        "speech_s": round(info["seconds"], 1), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                        "speech_per_cpu_s": round(info["seconds"] / max(cpu, 1e-9), 3),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return _write(out, infos, chunks[: last + 1], len(items))

    manifest = _write(out, infos, chunks[: last + 1], len(items)) if infos else {}
    if workers <= 1:
        for k, name, part, digest in todo:
            manifest = record(k, name, *_timed_shard(part, out / name, digest))
        return manifest
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        queue, running = list(todo), {}
        while queue or running:
            while queue and len(running) < workers:  # submit in order, so shards finish roughly in order
                k, name, part, digest = queue.pop(0)
                running[pool.submit(_timed_shard, part, out / name, digest)] = (k, name)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                manifest = record(*running.pop(fut), *fut.result())
    return manifest


def _write(out: Path, infos: dict[str, dict], covered: list[list[Item]], planned: int) -> dict:
    from steermoe_core.data.prep.shards import write_manifest

    infos = dict(sorted(infos.items()))
    shard_info = {n: {"examples": i["examples"], "seconds": round(i["seconds"], 3)} for n, i in infos.items()}
    skipped = [s for i in infos.values() for s in i["skipped"]]
    return write_manifest(out, "synth:corpus", "train", shard_info, skipped,
                          inputs={"count": sum(len(c) for c in covered), "planned": planned})
