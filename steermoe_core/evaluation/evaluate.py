"""`steermoe eval`: decode a prepared set deterministically and score it (docs/design.md#evaluation)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from steermoe_core.atomic import atomic_file
from steermoe_core.config import Recipe
from steermoe_core.data.dataset import ShardedDataset, make_loader
from steermoe_core.data.sampler import length_bucketed_batches
from steermoe_core.evaluation.metrics import score
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.runtime import Precision, autocast, resolve_precision


def pick_examples(n: int, max_examples: int, seed: int) -> list[int] | None:
    """None = all ``n``; else a seeded random sample of ``max_examples`` (not the first, shortest ones)."""
    if not max_examples or max_examples >= n:
        return None
    return sorted(random.Random(seed).sample(range(n), max_examples))


@torch.no_grad()
def predict_dataset(
    model: SteerMoEModel,
    ds: ShardedDataset,
    recipe: Recipe,
    precision: Precision | None = None,
    max_examples: int = 0,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
    shard: Callable[[list[int]], list[int]] | None = None,
    read: str = "llm",
) -> list[dict]:
    """Predictions in dataset order, one dict per example (index, id, reference, prediction, prompt).

    ``shard`` picks this process's share of the chosen examples (multi-process validation). ``read``:
    ``llm`` decodes as ``infer`` does; ``ctc`` is the CTC read-out (``SteerMoEModel.ctc_transcribe``, no
    LLM), the floor a reader of the same audio tokens has to beat."""
    if read not in ("llm", "ctc"):
        raise ValueError(f"read: 'llm' or 'ctc', not {read!r}")
    precision = precision or resolve_precision(recipe.train.precision, model.device, "decode")
    chosen = pick_examples(len(ds), max_examples, seed) or list(range(len(ds)))
    if shard is not None:
        chosen = shard(chosen)
    batches = length_bucketed_batches(ds, recipe.eval.batch_size, shuffle=False, only=set(chosen))
    out: dict[int, dict] = {}
    model.eval()
    for bidx, (batch, examples) in enumerate(make_loader(ds, batches, recipe.data.prompt, 0)):
        batch.waves = batch.waves.to(model.device)
        with autocast(model.device, precision):
            hyps = model.ctc_transcribe(batch) if read == "ctc" else model.generate(batch, recipe.eval.max_new_tokens, recipe.eval.num_beams)
        for i, e, h, p in zip(batches[bidx], examples, hyps, batch.prompts):
            out[i] = {"index": i, "id": e.id, "reference": e.text, "prediction": h, "prompt": p, "language": e.language}
        if progress:
            progress(len(examples))
    return [out[i] for i in sorted(out)]


def evaluate(
    model: SteerMoEModel,
    data: str | Path | ShardedDataset,
    recipe: Recipe,
    predictions_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
    shard: Callable[[list[int]], list[int]] | None = None,
    gather: Callable[[list], list] | None = None,
    precision: Precision | None = None,
) -> dict:
    """Score ``data`` (``steermoe eval``, and validation during training). With several processes,
    ``shard`` gives this one its share of the examples and ``gather`` collects every share (in rank
    order); predictions are re-sorted into dataset order, so the score and the predictions file are
    those of one process."""
    ds = data if isinstance(data, ShardedDataset) else ShardedDataset(data)
    precision = precision or resolve_precision(recipe.train.precision, model.device, "decode")
    preds = predict_dataset(model, ds, recipe, precision, recipe.eval.max_examples, progress, recipe.train.seed, shard)
    if gather is not None:
        preds = sorted(gather(preds), key=lambda p: p["index"])
    summary = {
        "data": str(ds.folder) if isinstance(data, ShardedDataset) else str(data),
        "examples": len(preds),
        "precision": precision.name,
        **score(recipe.eval.metric, [p["reference"] for p in preds], [p["prediction"] for p in preds]),
    }
    if predictions_path is not None:
        with atomic_file(predictions_path, "w") as f:
            for p in preds:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return summary
