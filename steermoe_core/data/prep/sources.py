"""Each corpus's on-disk layout -> a list of Items plus the inputs that cannot become one.

A transcript line with no audio, and audio with no transcript, are reported, never dropped silently.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

from steermoe_core.audio.load import AUDIO_SUFFIXES
from steermoe_core.data.prep.item import Item
from steermoe_core.errors import SourceError

Skipped = list[dict]



def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise SourceError(f"{path}: no such folder ({what})")


def librispeech(src: Path, subsets: list[str] | None = None) -> tuple[list[Item], Skipped, str]:
    """LibriSpeech: SUBSET/SPEAKER/CHAPTER/{ID.flac, SPEAKER-CHAPTER.trans.txt}."""
    _need_dir(src, "LibriSpeech root")
    if subsets:
        roots = [src / s for s in subsets]
        for r in roots:
            _need_dir(r, "LibriSpeech subset")
    elif list(src.glob("*/*/*.trans.txt")):  # SRC is itself one subset
        roots = [src]
    else:
        roots = sorted(p for p in src.iterdir() if p.is_dir() and list(p.glob("*/*/*.trans.txt")))
    if not roots:
        raise SourceError(f"{src}: no LibriSpeech subset found (expected SUBSET/SPEAKER/CHAPTER/*.trans.txt)")
    items, skipped = [], []
    for root in roots:
        for trans in sorted(root.glob("*/*/*.trans.txt")):
            chapter = trans.parent
            seen = set()
            for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                uid, _, text = line.strip().partition(" ")
                audio = chapter / f"{uid}.flac"
                seen.add(audio.name)
                if not text.strip():
                    skipped.append({"id": uid, "input": f"{trans}:{n}", "reason": "empty transcript"})
                elif not audio.exists():
                    skipped.append({"id": uid, "input": str(audio), "reason": "transcript line without audio file"})
                else:
                    items.append(Item(uid, text.strip(), str(audio), language="en"))
            for audio in sorted(chapter.glob("*.flac")):
                if audio.name not in seen:
                    skipped.append({"id": audio.stem, "input": str(audio), "reason": "audio file without transcript"})
    return items, skipped, "+".join(r.name for r in roots)


def aishell(src: Path) -> dict[str, tuple[list[Item], Skipped]]:
    """AISHELL-1: wav/{train,dev,test}/SPEAKER/ID.wav + transcript/aishell_transcript_v0.8.txt."""
    trans = src / "transcript" / "aishell_transcript_v0.8.txt"
    if not trans.is_file():
        raise SourceError(f"{trans}: missing (AISHELL-1 transcript)")
    _need_dir(src / "wav", "AISHELL-1 wav/ tree")
    texts: dict[str, str] = {}
    for line in trans.read_text(encoding="utf-8").splitlines():
        uid, _, text = line.strip().partition(" ")
        if uid:
            texts[uid] = "".join(text.split())  # transcripts are space-separated characters
    out: dict[str, tuple[list[Item], Skipped]] = {}
    found: set[str] = set()
    for split_dir in sorted(p for p in (src / "wav").iterdir() if p.is_dir()):
        items, skipped = [], []
        for wav in sorted(split_dir.glob("*/*.wav")):
            found.add(wav.stem)
            if wav.stem in texts and texts[wav.stem]:
                items.append(Item(wav.stem, texts[wav.stem], str(wav), language="zh"))
            else:
                skipped.append({"id": wav.stem, "input": str(wav), "reason": "audio file without transcript"})
        out[split_dir.name] = (items, skipped)
    orphans = [{"id": u, "input": str(trans), "reason": "transcript line without audio file"} for u in sorted(set(texts) - found)]
    if orphans:
        first = "train" if "train" in out or not out else next(iter(out))
        out.setdefault(first, ([], []))[1].extend(orphans)
    return out


_CLOTHO_SPLITS = {"train": "clotho_aqa_train.csv", "val": "clotho_aqa_val.csv", "test": "clotho_aqa_test.csv"}


def clothoaqa(src: Path) -> dict[str, tuple[list[Item], Skipped]]:
    """ClothoAQA: audio_files/*.wav + clotho_aqa_{train,val,test}.csv (file_name, QuestionText, answer, confidence).

    Each (clip, question) becomes one example; ``text`` is the most frequent answer, and every answer
    with its annotator confidence is kept in ``extra``.
    """
    audio_dir = next((d for d in (src / "audio_files", src / "audio") if d.is_dir()), None)
    if audio_dir is None:
        raise SourceError(f"{src}: no audio_files/ folder (ClothoAQA layout)")
    out = {}
    for split, name in _CLOTHO_SPLITS.items():
        path = src / name
        if not path.exists():
            continue
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        skipped: Skipped = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"file_name", "QuestionText", "answer"}
            if not need <= set(reader.fieldnames or []):
                raise SourceError(f"{path}: expected columns {sorted(need)}, found {reader.fieldnames}")
            for row in reader:
                groups[(row["file_name"], row["QuestionText"].strip())].append(row)
        items = []
        qid: Counter = Counter()
        for (fname, question), rows in sorted(groups.items()):
            audio = audio_dir / fname
            stem = Path(fname).stem.replace(" ", "_")
            qid[stem] += 1
            uid = f"{stem}-q{qid[stem]:03d}"
            if not audio.exists():
                skipped.append({"id": uid, "input": str(audio), "reason": "question refers to a missing audio file"})
                continue
            answers = [{"answer": r["answer"].strip(), "confidence": r.get("confidence", "").strip()} for r in rows]
            best = Counter(a["answer"].lower() for a in answers if a["answer"]).most_common(1)
            if not best:
                skipped.append({"id": uid, "input": f"{path}", "reason": "question without any answer"})
                continue
            items.append(Item(uid, best[0][0], str(audio), prompt=question, language="en", extra={"answers": answers}))
        out[split] = (items, skipped)
    if not out:
        raise SourceError(f"{src}: none of {', '.join(_CLOTHO_SPLITS.values())} found")
    return out


def folder(src: Path) -> tuple[list[Item], Skipped]:
    """Audio files with sidecar .txt, or a manifest (csv/tsv/jsonl) of path,text[,prompt,language]."""
    if src.is_file():
        return _manifest(src)
    _need_dir(src, "audio folder")
    manifests = [p for p in src.iterdir() if p.name in {"manifest.csv", "manifest.tsv", "manifest.jsonl", "metadata.csv"}]
    if manifests:
        return _manifest(manifests[0])
    items, skipped = [], []
    audio_stems = set()
    audio = [p for p in sorted(src.rglob("*")) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
    stems = Counter(p.with_suffix("") for p in audio)
    for p in audio:
        audio_stems.add(p.with_suffix(""))
        rel = p.relative_to(src)
        # the relative path names the utterance; two files of one stem (x.flac, x.mp3) keep their suffix
        uid = str(rel if stems[p.with_suffix("")] > 1 else rel.with_suffix("")).replace("/", "__")
        txt = p.with_suffix(".txt")
        if not txt.exists():
            skipped.append({"id": uid, "input": str(p), "reason": "audio file without sidecar .txt"})
            continue
        text = txt.read_text(encoding="utf-8").strip()
        if not text:
            skipped.append({"id": uid, "input": str(txt), "reason": "empty transcript"})
            continue
        items.append(Item(uid, text, str(p)))
    for txt in sorted(src.rglob("*.txt")):
        if txt.with_suffix("") not in audio_stems:
            skipped.append({"id": txt.stem, "input": str(txt), "reason": "transcript without audio file"})
    return items, skipped


def _manifest(path: Path) -> tuple[list[Item], Skipped]:
    base = path.parent
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append({**json.loads(line), "_line": n})
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        delim = "\t" if path.suffix == ".tsv" else ","
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delim)
            if not {"path", "text"} <= set(reader.fieldnames or []):
                raise SourceError(f"{path}: expected a header with path,text[,prompt,language], found {reader.fieldnames}")
            rows = [{**r, "_line": n} for n, r in enumerate(reader, 2)]
    items, skipped = [], []
    for r in rows:
        if "path" not in r or "text" not in r:
            raise SourceError(f"{path}:{r['_line']}: needs 'path' and 'text'")
        audio = (base / r["path"]).resolve() if not Path(r["path"]).is_absolute() else Path(r["path"])
        uid = str(r.get("id") or Path(r["path"]).with_suffix("")).replace("/", "__")
        if not audio.exists():
            skipped.append({"id": uid, "input": f"{path}:{r['_line']}", "reason": f"audio file {audio} not found"})
            continue
        items.append(Item(uid, str(r["text"]).strip(), str(audio), prompt=r.get("prompt") or None, language=r.get("language") or None))
    return items, skipped
