"""Build (or resume) the large synthetic training set: one clip per sentence, hundreds of voices.

    python tools/brown_sentences.py package/ --out brown_train.txt
    nohup nice -n 19 python tools/synth_corpus.py brown_train.txt --out corpus --workers 2 >> synth.log 2>&1 &
    STEERMOE_KOKORO_VOICES=package/voices python tools/synth_corpus.py ... --english 0.6   # Kokoro's native English voices too

Kokoro makes 1.2-2.2 s of speech a CPU-second (AVX2 to AVX512 CPUs), so this runs for hours: every shard it finishes is
kept (re-run the same command to resume; the shard it was in comes back from the synthesis cache), and
a training run can read the shards finished so far (``data.train = corpus``). ``--workers N`` makes N shards at
once, one process (one core) each. Pause it with ``pkill -STOP -f synth_corpus`` (the workers too) and resume
with ``pkill -CONT -f synth_corpus``. Each shard logs one JSON line: its clips, seconds of
speech, and the CPU seconds it took (this process and its espeak-ng / flite children).
See ``steermoe_core/data/prep/corpus.py`` for the voice plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sentences", type=Path, help="one sentence a line (tools/brown_sentences.py)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chunk", type=int, default=200, help="clips a shard")
    ap.add_argument("--mix", type=int, default=400, help="Kokoro blends to draw speakers from (kokoro:mix-0 ...)")
    ap.add_argument("--robotic", type=float, default=0.2, help="fraction of clips in flite / espeak-ng voices")
    ap.add_argument("--english", type=float, default=0.0, help="fraction of the Kokoro clips in blends of its English "
                    "voices (kokoro:en-mix-N; needs $STEERMOE_KOKORO_VOICES, see steermoe_core/data/prep/synth.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N sentences (0 = all)")
    ap.add_argument("--stop-after", type=int, default=0, help="stop after N new shards (0 = run to the end)")
    ap.add_argument("--first-shard", type=int, default=0, help="synthesise no shard before this one (each shard is "
                    "--chunk sentences in a fixed order: a new machine can start where the sentences trained on so far end)")
    ap.add_argument("--workers", type=int, default=1, help="shards made at once, one process (one core) each")
    args = ap.parse_args()

    from steermoe_core.data.prep.corpus import cpu_seconds, plan, synthesise_chunks

    lines = [ln.strip() for ln in args.sentences.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if args.limit:
        lines = lines[: args.limit]
    items = plan(lines, seed=args.seed, n_mix=args.mix, robotic_fraction=args.robotic, english_fraction=args.english)
    voices = {it.extra["voice"] for it in items}
    print(json.dumps({"start": str(args.out), "sentences": len(lines), "distinct_voices": len(voices),
                      "robotic_clips": sum(it.synth[0] in ("flite", "espeak") for it in items)}), flush=True)
    manifest = synthesise_chunks(items, args.out, chunk=args.chunk, stop_after=args.stop_after, first=args.first_shard,
                                 workers=args.workers,
                                 log=lambda line: print(line, flush=True))
    print(json.dumps({"done": str(args.out), "examples": manifest.get("examples"), "hours": manifest.get("hours"),
                      "cpu_s_this_run": round(cpu_seconds(), 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
