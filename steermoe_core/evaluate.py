"""`steermoe eval`: decode a prepared set deterministically and score it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .atomic import atomic_file
from .config import Recipe
from .data import ShardedDataset, length_bucketed_batches, make_loader
from .metrics import score
from .model import SteerMoEModel, autocast


def predict_dataset(
    model: SteerMoEModel,
    ds: ShardedDataset,
    recipe: Recipe,
    max_examples: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Predictions in dataset order, one dict per example (id, reference, prediction, prompt)."""
    device = next(model.projector.parameters()).device
    batches = length_bucketed_batches(ds, recipe.eval.batch_size, shuffle=False)
    if max_examples:
        keep = set(range(min(max_examples, len(ds))))
        batches = [[i for i in b if i in keep] for b in batches]
        batches = [b for b in batches if b]
    order = [i for b in batches for i in b]
    out: dict[int, dict] = {}
    model.eval()
    for bidx, (batch, examples) in enumerate(make_loader(ds, batches, recipe.data.prompt, 0)):
        with autocast(device, recipe.train.precision):
            hyps = model.generate(batch, recipe.eval.max_new_tokens, recipe.eval.num_beams)
        for i, e, h, p in zip(batches[bidx], examples, hyps, batch.prompts):
            out[i] = {"id": e.id, "reference": e.text, "prediction": h, "prompt": p, "language": e.language}
        if progress:
            progress(len(examples))
    return [out[i] for i in sorted(order)]


def evaluate(
    model: SteerMoEModel,
    data: str | Path,
    recipe: Recipe,
    predictions_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    ds = ShardedDataset(data)
    with torch.no_grad():
        preds = predict_dataset(model, ds, recipe, recipe.eval.max_examples, progress)
    summary = {
        "data": str(data),
        "examples": len(preds),
        **score(recipe.eval.metric, [p["reference"] for p in preds], [p["prediction"] for p in preds]),
    }
    if predictions_path is not None:
        with atomic_file(predictions_path, "w") as f:
            for p in preds:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return summary
