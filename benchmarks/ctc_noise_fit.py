"""How well the text reader's simulated read-out errors (``data.ctc_noise``) match a checkpoint's real ones.

    python benchmarks/ctc_noise_fit.py --checkpoint RUN/model --data CORPUS --first 4400 --clips 200 [--noise drop=0.1 ...]

Reads ``--clips`` clips of a prepared set from clip ``--first`` on with the checkpoint's CTC read-out
(``SteerMoEModel.ctc_transcribe``, no LLM; pick clips it never trained on), then corrupts the same
transcripts with ``corrupt`` and prints both error profiles side by side: word error rate split into
substitutions, deletions and insertions (per reference word), the share of rows read without error,
and the spread of per-row WER. A reader trained on text learns the errors it is shown; these figures
say whether they are the ones the audio will hand it. ``--readouts`` keeps the read-outs in a JSON file
and reuses them, so other noise settings cost no encoder pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch


def profile(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Word-level error profile of hypotheses against references, on the English normaliser's words."""
    import jiwer

    from steermoe_core.evaluation.metrics import normalize_english

    r = [normalize_english(x) or "-" for x in refs]
    h = [normalize_english(x) or "-" for x in hyps]
    o = jiwer.process_words(r, h)
    n = o.hits + o.substitutions + o.deletions
    rows = np.array([jiwer.wer(a, b) for a, b in zip(r, h)])
    q10, q50, q90 = np.quantile(rows, [0.1, 0.5, 0.9])
    return {"wer": o.wer, "sub": o.substitutions / n, "del": o.deletions / n, "ins": o.insertions / n,
            "clean_rows": float(np.mean(rows == 0)), "row_wer_p10": q10, "row_wer_p50": q50, "row_wer_p90": q90}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="prepared dataset folder")
    ap.add_argument("--first", type=int, default=0, help="index of the first clip read")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--noise", action="append", default=[], help="a NoiseConfig field, KEY=VALUE (repeatable)")
    ap.add_argument("--seeds", type=int, default=3, help="simulated corruptions of each transcript")
    ap.add_argument("--readouts", type=Path, help="JSON file of read-outs: reused if it exists, else written")
    args = ap.parse_args()

    from steermoe_core.data.ctc_noise import NoiseConfig, corrupt, short_pieces, spelling_neighbours, tokenizer_pieces
    from steermoe_core.errors import RecipeError
    from steermoe_core.model.checkpoint import load_checkpoint

    try:
        cfg = NoiseConfig.parse(args.noise)  # before the model loads: a typo fails at once
    except RecipeError as e:
        raise SystemExit(f"error: {e}") from None
    model, recipe, _ = load_checkpoint(args.checkpoint, torch.device("cpu"))
    if args.readouts and args.readouts.exists():
        pairs = json.loads(args.readouts.read_text())
    else:
        from steermoe_core.data.dataset import ShardedDataset
        from steermoe_core.evaluation.evaluate import predict_dataset

        lo, hi = args.first, args.first + args.clips
        preds = predict_dataset(model, ShardedDataset(args.data), recipe, shard=lambda c: [i for i in c if lo <= i < hi], read="ctc")
        pairs = [{"ref": p["reference"], "ctc": p["prediction"]} for p in preds]
        if args.readouts:
            args.readouts.write_text(json.dumps(pairs, indent=0))
    refs = [p["ref"] for p in pairs]

    tok = model.tokenizer
    pieces = tokenizer_pieces(tok)  # spelled as the reader's training batches spell them (ReaderText.for_tokenizer)
    neighbours, strays = spelling_neighbours(pieces), short_pieces(pieces)
    ids = model.ctc_targets(refs)
    rng = np.random.default_rng(0)
    sim_refs, sims = [], []
    for _ in range(args.seeds):
        sim_refs += refs
        sims += [" ".join(tok.decode(corrupt(i, rng, neighbours, strays, cfg), skip_special_tokens=True).split()) for i in ids]
    rows = {"read-out": profile(refs, [p["ctc"] for p in pairs]), "simulated": profile(sim_refs, sims)}
    print(json.dumps({"clips": len(refs), "noise": dataclasses.asdict(cfg)}))
    print(f"{'':10s} " + " ".join(f"{k:>11s}" for k in rows["read-out"]))
    for name, r in rows.items():
        print(f"{name:10s} " + " ".join(f"{v:11.3f}" for v in r.values()))


if __name__ == "__main__":
    main()
