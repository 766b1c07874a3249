"""The CTC read-out's WER: a checkpoint's audio tokens read greedily through the LLM's embedding table.

    python benchmarks/ctc_readout.py --checkpoint base=checkpoints/base --data neural=SET [--data ...]

No LLM runs (``SteerMoEModel.ctc_transcribe``): argmax of each audio token against the input
embeddings, repeats merged, blanks (the space token) read as word breaks. The floor any reader of the same tokens must beat, cheap
enough to score on every set (an encoder pass per clip).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\\n\\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="NAME=FOLDER (repeatable)")
    ap.add_argument("--data", action="append", required=True, help="NAME=prepared dataset folder (repeatable)")
    ap.add_argument("--max-examples", type=int, default=0, help="the first N clips of each set (0 = all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import predict_dataset
    from steermoe_core.evaluation.metrics import word_error_rate
    from steermoe_core.model.checkpoint import load_checkpoint

    res: dict = {}
    for spec in args.checkpoint:
        name, _, folder = spec.partition("=")
        model, recipe, _ = load_checkpoint(folder, torch.device("cpu"))
        recipe.eval.batch_size = args.batch
        res[name] = {}
        for dspec in args.data:
            dname, _, dfolder = dspec.partition("=")
            ds = ShardedDataset(dfolder)
            n = min(len(ds), args.max_examples or len(ds))
            t = time.perf_counter()
            preds = predict_dataset(model, ds, recipe, shard=lambda chosen: [i for i in chosen if i < n], read="ctc")
            refs, hyps = [p["reference"] for p in preds], [p["prediction"] for p in preds]
            res[name][dname] = {"ctc_wer": word_error_rate(refs, hyps), "clips": n, "seconds": time.perf_counter() - t,
                                "example": {"ref": refs[0], "ctc": hyps[0]}}
            print(json.dumps({"checkpoint": name, "data": dname, **res[name][dname]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
