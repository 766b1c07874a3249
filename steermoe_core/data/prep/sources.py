"""Each corpus's on-disk layout -> a list of Items plus the inputs that cannot become one.

A transcript line with no audio, and audio with no transcript, are reported, never dropped silently.
So is a transcript that is not in the expected encoding (UTF-8 unless ``encoding`` says otherwise;
a byte-order mark is dropped). A file every input depends on (a manifest, AISHELL's transcript)
that cannot be decoded is a one-line ``SourceError`` naming it and the byte offset.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

from steermoe_core.audio.load import AUDIO_SUFFIXES
from steermoe_core.data.prep.item import Item
from steermoe_core.errors import SourceError, UsageError, decode_error_text

Skipped = list[dict]
DEFAULT_ENCODING = "utf-8"


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or a ``UsageError`` for one Python does not know."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UsageError(f"--encoding {encoding}: not a text encoding Python knows (e.g. utf-8, latin-1, cp1252, gbk)") from None


def read_text(path: Path, encoding: str = DEFAULT_ENCODING) -> str:
    """A text file, without a leading byte-order mark. Raises ``UnicodeDecodeError`` (the caller
    decides whether the file is one bad input or the whole source)."""
    text = path.read_bytes().decode(check_encoding(encoding))
    return text[1:] if text.startswith("\ufeff") else text


def _undecodable(e: UnicodeDecodeError, path: Path, encoding: str) -> str:
    """Why a transcript was skipped (or a source refused): which file, which byte, what was expected."""
    name = "UTF-8" if check_encoding(encoding) == "utf-8" else encoding
    return decode_error_text(e, path, name) + " (re-save it as UTF-8, or give its encoding with --encoding)"


def _read_source_file(path: Path, encoding: str) -> str:
    """A file the whole source depends on: undecodable text is one line naming it."""
    try:
        return read_text(path, encoding)
    except UnicodeDecodeError as e:
        raise SourceError(_undecodable(e, path, encoding)) from None



def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise SourceError(f"{path}: no such folder ({what})")


def librispeech(src: Path, subsets: list[str] | None = None, encoding: str = DEFAULT_ENCODING) -> tuple[list[Item], Skipped, str]:
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
            try:
                lines = read_text(trans, encoding).splitlines()
            except UnicodeDecodeError as e:  # this chapter's transcripts are unreadable: listed, the rest goes on
                skipped.append({"id": chapter.name, "input": str(trans), "reason": _undecodable(e, trans, encoding)})
                continue
            for n, line in enumerate(lines, 1):
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


def aishell(src: Path, encoding: str = DEFAULT_ENCODING) -> dict[str, tuple[list[Item], Skipped]]:
    """AISHELL-1: wav/{train,dev,test}/SPEAKER/ID.wav + transcript/aishell_transcript_v0.8.txt."""
    trans = src / "transcript" / "aishell_transcript_v0.8.txt"
    if not trans.is_file():
        raise SourceError(f"{trans}: missing (AISHELL-1 transcript)")
    _need_dir(src / "wav", "AISHELL-1 wav/ tree")
    texts: dict[str, str] = {}
    for line in _read_source_file(trans, encoding).splitlines():
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


def clothoaqa(src: Path, encoding: str = DEFAULT_ENCODING) -> dict[str, tuple[list[Item], Skipped]]:
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
        reader = csv.DictReader(io.StringIO(_read_source_file(path, encoding), newline=""))
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


def folder(src: Path, encoding: str = DEFAULT_ENCODING, allow_outside: bool = False) -> tuple[list[Item], Skipped]:
    """Audio files with sidecar .txt, or a manifest (csv/tsv/jsonl) of path,text[,prompt,language].
    A manifest's paths must resolve inside its own folder unless ``allow_outside``: a manifest from
    elsewhere must not make prep read any file on the machine."""
    if src.is_file():
        return _manifest(src, encoding, allow_outside)
    _need_dir(src, "audio folder")
    manifests = [p for p in src.iterdir() if p.name in {"manifest.csv", "manifest.tsv", "manifest.jsonl", "metadata.csv"}]
    if manifests:
        return _manifest(manifests[0], encoding, allow_outside)
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
        try:
            text = read_text(txt, encoding).strip()
        except UnicodeDecodeError as e:
            skipped.append({"id": uid, "input": str(txt), "reason": _undecodable(e, txt, encoding)})
            continue
        if not text:
            skipped.append({"id": uid, "input": str(txt), "reason": "empty transcript"})
            continue
        items.append(Item(uid, text, str(p)))
    for txt in sorted(src.rglob("*.txt")):
        if txt.with_suffix("") not in audio_stems:
            skipped.append({"id": txt.stem, "input": str(txt), "reason": "transcript without audio file"})
    return items, skipped


def _manifest(path: Path, encoding: str = DEFAULT_ENCODING, allow_outside: bool = False) -> tuple[list[Item], Skipped]:
    base = path.parent
    root = base.resolve()
    rows: list[dict] = []
    text = _read_source_file(path, encoding)
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append({**json.loads(line), "_line": n})
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        delim = "\t" if path.suffix == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
        if not {"path", "text"} <= set(reader.fieldnames or []):
            raise SourceError(f"{path}: expected a header with path,text[,prompt,language], found {reader.fieldnames}")
        rows = [{**r, "_line": n} for n, r in enumerate(reader, 2)]
    items, skipped = [], []
    for r in rows:
        if "path" not in r or "text" not in r:
            raise SourceError(f"{path}:{r['_line']}: needs 'path' and 'text'")
        given = Path(str(r["path"]))
        audio = (given if given.is_absolute() else base / given).resolve()
        uid = str(r.get("id") or given.with_suffix("")).replace("/", "__")
        if not allow_outside and not audio.is_relative_to(root):
            skipped.append({"id": uid, "input": f"{path}:{r['_line']}",
                            "reason": f"path {given} resolves outside {root} (pass --allow-outside to read it)"})
            continue
        if not audio.exists():
            skipped.append({"id": uid, "input": f"{path}:{r['_line']}", "reason": f"audio file {audio} not found"})
            continue
        items.append(Item(uid, str(r["text"]).strip(), str(audio), prompt=r.get("prompt") or None, language=r.get("language") or None))
    return items, skipped
