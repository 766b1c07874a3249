"""Long recordings with the shipped model: transcripts that stay on the audio, and instructions.

    nice python benchmarks/longform.py --minutes 1 5 15 --qa-recordings 3 --out /tmp/longform.json
    nice python benchmarks/longform.py --short 90 --pause 0.6 --qa-recordings 0     # short sentences, short pauses

Builds recordings from held-out sentences (the demo's held-out Brown pool) spoken by held-out voices
(the demo's HELDOUT_VOICES, never trained on), joined with 0.4-1.0 s pauses, and measures:

- WER of the transcript of the whole recording (`SteerMoE.transcribe`: voice activity segments,
  per-segment budgets, loop guards) against the same model's WER on the same sentences given as
  separate clips; segments flagged as loops or budget cuts; real-time factor (audio s / wall s).
- `Summarize the main points.` over each recording (strategy auto): non-empty, and its time.
- QA: recordings of fact sentences ("Maria will present the budget report on Tuesday.") mixed
  with filler sentences; each fact asked as a question. Accuracy (lenient containment, the
  reference's QA score) of the direct strategy (the LLM reads the audio tokens), the transcript
  strategy (the frozen LLM over the model's transcript), and the frozen LLM over the reference
  transcript (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import numpy as np

from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.data.prep.synth import parse_voice, synthesize
from steermoe_core.demo.text import HELDOUT_VOICES, in_domain_sentences
from steermoe_core.evaluation.metrics import qa_scores, word_error_rate
from steermoe_core.inference import SteerMoE
from steermoe_core.inference.longform import whole_messages

NAMES = ["Maria", "Daniel", "Priya", "Thomas", "Aisha", "Carlos", "Helen", "Kenji", "Olga", "Samuel", "Rosa", "Victor"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
CITIES = ["London", "Chicago", "Madrid", "Tokyo", "Berlin", "Toronto", "Sydney", "Paris", "Dublin", "Boston", "Denver", "Seattle"]
NUMBERS = [("three", "3"), ("four", "4"), ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"),
           ("ten", "10"), ("twelve", "12"), ("fifteen", "15"), ("twenty", "20"), ("eleven", "11")]


def facts() -> list[tuple[str, str, str]]:
    """(sentence spoken, question, accepted answers separated by |): 36 facts, 3 per name."""
    out = []
    for i, name in enumerate(NAMES):
        day, city, (word, digits) = DAYS[i % len(DAYS)], CITIES[i], NUMBERS[i]
        out.append((f"{name} will present the budget report on {day}.",
                    f"On which day will {name} present the budget report?", day))
        out.append((f"The new office for {name}'s team is in {city}.",
                    f"In which city is the new office for {name}'s team?", city))
        out.append((f"{name} ordered {word} new laptops for the team.",
                    f"How many new laptops did {name} order?", f"{word}|{digits}"))
    return out


def speak(sentences: list[str], seed: int, pause: float = 0.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """The sentences spoken by held-out voices in turn, joined with pauses of ``pause`` s (0: 0.4-1.0 s
    at random); and the clips."""
    rng = random.Random(seed)
    voices = [parse_voice(v) for v in HELDOUT_VOICES]
    clips = [synthesize(s, *voices[k % len(voices)], 1.0).astype(np.float32) for k, s in enumerate(sentences)]
    parts = [np.zeros(int(0.5 * SAMPLE_RATE), np.float32)]
    for c in clips:
        parts += [c, np.zeros(int((pause or rng.uniform(0.4, 1.0)) * SAMPLE_RATE), np.float32)]
    return np.concatenate(parts), clips


def errors(refs: list[str], hyps: list[str]) -> dict:
    """Word errors by kind: a segment that holds two sentences and reads one shows up as deletions."""
    import jiwer

    from steermoe_core.evaluation.metrics import normalize_english

    out = jiwer.process_words([normalize_english(r) for r in refs], [normalize_english(h) for h in hyps])
    return {"deletions": out.deletions, "insertions": out.insertions, "substitutions": out.substitutions,
            "words": sum(len(normalize_english(r).split()) for r in refs)}


def short_sentences(n: int) -> list[str]:
    """The ``n`` shortest held-out sentences, in the pool's order: recordings of short utterances with short pauses."""
    pool = in_domain_sentences(10_000)
    keep = set(sorted(range(len(pool)), key=lambda i: len(pool[i]))[:n])
    return [s for i, s in enumerate(pool) if i in keep]


def sentences_for(seconds: float, pool: list[str], start: int) -> tuple[list[str], int]:
    """Consecutive pool sentences (wrapping) adding up to about ``seconds`` (the held-out voices speak
    about 0.062 s a character at speed 1.0; + the pause)."""
    out, total, i = [], 0.0, start
    while total < seconds:
        s = pool[i % len(pool)]
        out.append(s)
        total += 0.062 * len(s) + 0.7
        i += 1
    return out, i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="*", default=[1, 5])
    ap.add_argument("--qa-recordings", type=int, default=3, help="recordings of 12 facts each (36 questions at 3)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                    help="auto: what `steermoe infer` runs here (onnxruntime on a CPU, from its cached export)")
    ap.add_argument("--summary-tokens", type=int, default=128, help="budget of each summary")
    ap.add_argument("--max-segment-seconds", type=float, default=0.0, help="override the checkpoint's segment length (0 = its own)")
    ap.add_argument("--join-seconds", type=float, default=-1.0,
                    help="join speech regions up to this many seconds (-1 = the checkpoint's rule; 0 = never)")
    ap.add_argument("--short", type=int, default=0,
                    help="instead of --minutes: one recording of the N shortest held-out sentences (90 for about 5 minutes)")
    ap.add_argument("--pause", type=float, default=0.0, help="pause between sentences in seconds (0 = 0.4-1.0 s at random)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    import transformers

    from steermoe_core.inference.choice import backend_for
    from steermoe_core.inference import default_model_path

    path, backend = backend_for(args.model or default_model_path(), args.backend, "cpu")
    sm = SteerMoE.load(path, "cpu", backend=backend)
    if args.max_segment_seconds > 0:
        sm.policy.max_segment_seconds = args.max_segment_seconds
    if args.join_seconds >= 0:
        sm.policy.join_seconds = args.join_seconds
    report: dict = {"cpu": platform.processor() or platform.machine(), "backend": backend, "torch": torch.__version__,
                    "transformers": transformers.__version__, "policy": vars(sm.policy), "recordings": [], "qa": {}}
    pool = in_domain_sentences(300)
    start = 0
    for minutes in ([0] if args.short else args.minutes):
        if args.short:
            sents = short_sentences(args.short)
        else:
            sents, start = sentences_for(minutes * 60, pool, start)
        audio, clips = speak(sents, seed=int(minutes * 10), pause=args.pause)
        t0 = time.perf_counter()
        sep = [r.text for r in sm.transcribe(clips, batch_size=8)]
        t_sep = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        r = sm.transcribe(audio, batch_size=8)[0]
        t_long, c_long = time.perf_counter() - t0, time.process_time() - c0
        ref = " ".join(sents)
        t0 = time.perf_counter()
        summary = sm.ask(audio, "Summarize the main points.", max_new_tokens=args.summary_tokens)[0]
        t_sum = time.perf_counter() - t0
        rec = {
            "minutes": round(len(audio) / SAMPLE_RATE / 60, 2), "sentences": len(sents), "segments": len(r.segments),
            "wer_separate_clips": round(word_error_rate(sents, sep), 4),
            "wer_separate_joined": round(word_error_rate([ref], [" ".join(sep)]), 4),
            "wer_recording": round(word_error_rate([ref], [r.text]), 4),
            "loops": sum(s.flag == "loop" for s in r.segments), "budget_cuts": sum(s.flag == "budget" for s in r.segments),
            "rtf_recording": round(len(audio) / SAMPLE_RATE / t_long, 2),
            "audio_s_per_cpu_s": round(len(audio) / SAMPLE_RATE / c_long, 2), "load_avg": round(os.getloadavg()[0], 1), "rtf_separate": round(len(audio) / SAMPLE_RATE / t_sep, 2),
            "summary": summary.text[:300], "summary_error": summary.error, "summary_strategy": summary.strategy,
            "summary_rounds": summary.rounds, "summary_s": round(t_sum, 1),
            "max_segment_s": round(max((s.end - s.start for s in r.segments), default=0), 2),
        }
        rec["wer_ratio"] = round(rec["wer_recording"] / max(rec["wer_separate_joined"], 1e-9), 3)
        rec["errors_separate"] = errors(sents, sep)
        rec["errors_recording"] = errors([ref], [r.text])
        print(json.dumps(rec), flush=True)
        report["recordings"].append(rec)

    if args.qa_recordings == 0:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        return
    fs = facts()
    fillers = in_domain_sentences(300)[::-1]
    rows = {"direct": [], "transcript": [], "ceiling": []}
    refs: list[str] = []
    per_rec = len(fs) // max(1, args.qa_recordings)
    for k in range(args.qa_recordings):
        chunk = fs[k * per_rec : (k + 1) * per_rec]
        sents = []
        for j, (s, _, _) in enumerate(chunk):
            sents.append(s)
            if j % 3 == 2:
                sents.append(fillers[k * 10 + j])
        audio, _ = speak(sents, seed=100 + k)
        transcript = sm.transcribe(audio, batch_size=8)[0].text
        reference = " ".join(sents)
        for _, q, a in chunk:
            question = f"{q} Answer in a few words."
            refs.append(a)
            d = sm.ask(audio, question, strategy="direct", max_new_tokens=24)[0]
            rows["direct"].append(d.text if not d.error else "")
            rows["transcript"].append(sm.chat_text(whole_messages(question, transcript), 24))
            rows["ceiling"].append(sm.chat_text(whole_messages(question, reference), 24))
            print(json.dumps({"q": q, "a": a, **{name: rows[name][-1] for name in rows}}), flush=True)
        report["qa"].setdefault("examples", []).append(
            {"transcript": transcript[:400], "q": chunk[0][1], "a": chunk[0][2],
             **{name: rows[name][-len(chunk)] for name in rows}})
    report["qa"]["questions"] = len(refs)
    for name, hyps in rows.items():
        report["qa"][name] = qa_scores(refs, hyps)
    print(json.dumps(report["qa"], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
