"""Held-out evaluation sets by voice family: robotic, neural and real speech, scored apart.

One number over every voice hides what matters: a model can be close to Whisper on robotic voices and
four times worse on speech that sounds like people. These sets hold sentences and voices that no
training set of the project uses:

- sentences: the last ``EVAL_POOL`` Harvard sentences (the demo scores on the first 60; nothing trains
  on any of them). The test sentences are the last ``TEST_POOL``; the ones before them form a dev set
  for learning curves, so a run that watches the dev set never looks at the test set.
- voices: ``FAMILIES``. Robotic: the demo's held-out flite / espeak-ng voices. Neural: Kokoro's
  jf_tebukuro (never in a training blend), hibari's heart and Piper's en_US-joe-medium (reserved for
  evaluation: ``synth.EVAL_ONLY_VOICES``). Every voice reads every sentence, so families compare on the
  same words.
- real: pytest-audioeval's English recordings (3 clips: a sanity check, not a statistic).
"""

from __future__ import annotations

from pathlib import Path

from steermoe_core.data.prep.item import Item
from steermoe_core.errors import UsageError

HARVARD = Path(__file__).resolve().parent.parent / "demo" / "data" / "harvard.txt"
EVAL_POOL = 120  # Harvard sentences 600-719
TEST_POOL = 60
ROBOTIC = ("flite:awb", "espeak:en-us-nyc+f4", "espeak:en-gb-x-rp+m5", "espeak:en-gb-x-gbcwmd+f1")
NEURAL = ("kokoro:jf_tebukuro", "hibari:heart", "piper:en_US-joe-medium")
FAMILIES = {"robotic": ROBOTIC, "neural": NEURAL}
REAL_CLIPS = "pkg:pytest_audioeval/samples/audio/en"
SPLITS = ("test", "dev")


def sentences(split: str, n: int) -> list[str]:
    """``n`` held-out Harvard sentences of ``split`` (test: the last 60; dev: the 60 before them)."""
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    lines = [ln.strip() for ln in HARVARD.read_text(encoding="utf-8").splitlines() if ln.strip()]
    pool = lines[-TEST_POOL:] if split == "test" else lines[-EVAL_POOL:-TEST_POOL]
    if not 0 < n <= len(pool):
        raise UsageError(f"{split}: between 1 and {len(pool)} sentences, not {n}")
    return pool[:n]


def family_items(family: str, split: str = "test", n: int = 20) -> list[Item]:
    """Every voice of ``family`` reading the same ``n`` sentences, at its natural rate."""
    from steermoe_core.data.prep.synth import parse_voice

    if family not in FAMILIES:
        raise UsageError(f"family {family!r}: expected one of {', '.join(FAMILIES)} (real clips are a folder)")
    items = []
    for spec in FAMILIES[family]:
        engine, voice = parse_voice(spec)
        slug = spec.replace(":", "-").replace("+", "_")
        for k, text in enumerate(sentences(split, n)):
            items.append(Item(f"{family}-{slug}-{k:03d}", text, synth=(engine, voice, 1.0), language="en",
                              extra={"voice": spec, "family": family}))
    return items


def build_sets(out: Path, n: int = 20, split: str = "test", families: tuple[str, ...] = ("robotic", "neural", "real"),
               workers: int = 0, log=print) -> dict[str, Path]:
    """Prepared sets ``out/<family>`` (reused when their manifest exists); returns family -> folder."""
    from steermoe_core.backbones.weights import resolve_path
    from steermoe_core.data.prep.pipeline import run_prep
    from steermoe_core.data.prep.sources import folder

    done = {}
    for fam in families:
        dest = out / fam
        if not (dest / "manifest.json").exists():
            if fam == "real":
                items, skipped = folder(Path(resolve_path(REAL_CLIPS)))
                run_prep(items, dest, "pytest-audioeval:en", fam, skipped, workers=1)
            else:
                m = run_prep(family_items(fam, split, n), dest, f"voices:{fam}:{split}", fam, workers=workers, shard_size=200).manifest
                log(f"{fam}: {m['examples']} clips, {m['hours'] * 3600:.0f} s of speech into {dest}")
        done[fam] = dest
    return done
