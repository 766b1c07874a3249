"""WER by voice family (robotic / neural / real) of checkpoints and of Whisper tiny.en's own decoder.

    python benchmarks/voice_families.py                       # the shipped model + Whisper, 20 sentences a voice
    python benchmarks/voice_families.py --checkpoint run=/work/exp32/run/checkpoints/step-000100 --no-whisper
    python benchmarks/voice_families.py --split dev --n 8     # the dev sentences (learning curves)
    python benchmarks/voice_families.py --recorded recorded/set  # plus real recordings (tools/recorded_speech.py)

The sets (steermoe_core.evaluation.voice_sets) are held-out Harvard sentences read by voices no training
set uses; they are prepared once into ``--sets`` (default $STEERMOE_CACHE/voice_sets/SPLIT-N) and reused.
The neural family needs the optional voices (`pip install -e '.[voices]'`). Prints one markdown table
(WER per family and per voice, with each checkpoint's CTC read-out beside it: the same audio tokens read
without the LLM) and writes every transcript to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def _voice_of(example_id: str) -> str:
    """``neural-hibari-heart-003`` -> ``neural-hibari-heart``; a real clip's id is its own voice."""
    head, _, tail = example_id.rpartition("-")
    return head if tail.isdigit() and head.count("-") >= 1 else "real"


def _score(refs: list[str], hyps: list[str], ids: list[str]) -> dict:
    from steermoe_core.evaluation.metrics import word_error_rate

    out = {"all": word_error_rate(refs, hyps)}
    for v in sorted({_voice_of(i) for i in ids}):
        pick = [k for k, i in enumerate(ids) if _voice_of(i) == v]
        out[v] = word_error_rate([refs[k] for k in pick], [hyps[k] for k in pick])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH or PATH (model folder or checkpoints/step-N); "
                    "repeat; default: the shipped model")
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    ap.add_argument("--n", type=int, default=20, help="sentences per voice")
    ap.add_argument("--families", default="robotic,neural,real")
    ap.add_argument("--sets", type=Path, default=None, help="where the prepared sets live")
    ap.add_argument("--no-whisper", action="store_true", help="skip Whisper tiny.en's own decoder")
    ap.add_argument("--no-ctc", action="store_true", help="skip each checkpoint's CTC read-out (its audio tokens read without the LLM)")
    ap.add_argument("--json", type=Path, default=None, help="write scores and transcripts here")
    ap.add_argument("--workers", type=int, default=0, help="synthesis processes when a set is built")
    ap.add_argument("--recorded", type=Path, default=None, help="the prepared set of tools/recorded_speech.py: "
                    "real recordings from the package registries, scored as one more family, per source")
    args = ap.parse_args()

    from steermoe_core.backbones.weights import cache_root
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import predict_dataset
    from steermoe_core.evaluation.voice_sets import build_sets
    from steermoe_core.inference.api import SHIPPED_MODEL
    from steermoe_core.model.checkpoint import load_checkpoint, read_checkpoint

    families = tuple(f for f in args.families.split(",") if f)
    sets_dir = args.sets or cache_root() / "voice_sets" / f"{args.split}-{args.n}"
    t0 = time.perf_counter()
    sets = build_sets(sets_dir, args.n, args.split, families, args.workers)
    if args.recorded is not None:
        sets["recorded"] = args.recorded
    print(f"sets ready in {time.perf_counter() - t0:.0f} s: {sets_dir}")
    data = {fam: ShardedDataset(path) for fam, path in sets.items()}
    exs = {fam: [ds[i] for i in range(len(ds))] for fam, ds in data.items()}

    ckpts = [(c.split("=", 1) if "=" in c else (Path(c).name, c)) for c in args.checkpoint] or [("shipped", str(SHIPPED_MODEL))]
    results: dict[str, dict] = {}
    transcripts: dict[str, dict] = {}
    model, model_cfg, encoder_path = None, None, None
    for name, path in ckpts:
        recipe = read_checkpoint(path)[0]
        t = time.perf_counter()
        same = model is not None and recipe.model == model_cfg
        model, recipe, meta = load_checkpoint(path, model=model if same else None)
        model_cfg, encoder_path = recipe.model, recipe.model.encoder.path
        # the LLM's reading, and beside it the floor: the same audio tokens read without the LLM
        for row, read in [(name, "llm")] + ([] if args.no_ctc else [(f"{name}, CTC read-out", "ctc")]):
            results[row], transcripts[row] = {}, {}
            for fam, ds in data.items():
                preds = predict_dataset(model, ds, recipe, read=read)
                results[row][fam] = _score([p["reference"] for p in preds], [p["prediction"] for p in preds], [p["id"] for p in preds])
                transcripts[row][fam] = [{"id": p["id"], "reference": p["reference"], "prediction": p["prediction"]} for p in preds]
            results[row]["_step"] = meta.get("step")
        print(f"{name} (step {meta.get('step')}): scored in {time.perf_counter() - t:.0f} s: "
              + ", ".join(f"{f} {100 * results[name][f]['all']:.1f}%" for f in data))
    if not args.no_whisper:
        from steermoe_core.evaluation.whisper_decoder import WhisperDecoderBaseline

        t = time.perf_counter()
        whisper = WhisperDecoderBaseline(encoder_path)
        results["whisper tiny.en decoder"], transcripts["whisper tiny.en decoder"] = {}, {}
        for fam, items in exs.items():
            hyps = [h for k in range(0, len(items), 16) for h in whisper.transcribe([e.audio for e in items[k : k + 16]])]
            results["whisper tiny.en decoder"][fam] = _score([e.text for e in items], hyps, [e.id for e in items])
            transcripts["whisper tiny.en decoder"][fam] = [{"id": e.id, "reference": e.text, "prediction": h} for e, h in zip(items, hyps)]
        print(f"whisper scored in {time.perf_counter() - t:.0f} s")

    import transformers

    env = {"cpu": _cpu(), "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "split": args.split, "sentences_per_voice": args.n,
           "clips": {f: len(e) for f, e in exs.items()}}
    print(f"\n{env}\n")
    head = "| model | " + " | ".join(f"{f} ({len(exs[f])} clips)" for f in data) + " |"
    print(head + "\n|" + "---|" * (len(data) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * r[f]['all']:.1f}%" for f in data) + " |")
    print("\nper voice:")
    for name, r in results.items():
        print(f"  {name}: " + "; ".join(f"{v} {100 * w:.1f}%" for f in data for v, w in r[f].items() if v != "all"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "wer": results, "transcripts": transcripts}, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
