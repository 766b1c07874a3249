"""Is the projector what limits the CTC read-out? Heads trained on a checkpoint's own encoder frames.

    python benchmarks/ctc_heads.py --checkpoint checkpoints/base --train CORPUS --clips 600,1200 \\
        --data neural=SET --data robotic=SET [--heads checkpoint,linear,mlp] [--steps 400]

The checkpoint's encoder runs once per clip, its steering on (``SteerMoEModel.encoder_frames``), and the
final-normed frames are kept in memory; every head then trains on those frames with the product's own
pooling (``pool_frames``), CTC loss and read-out (``SteerMoEModel.ctc_loss`` / ``ctc_read``). Fixing
the frames isolates the head: a head that cannot fit the training clips is short of capacity, one that
fits them and reads held-out voices no better is short of data. Heads: ``checkpoint`` (the checkpoint's
projector, trained further), ``linear`` (a fresh projector of the recipe's form) and ``mlp`` (stacked
frames -> Linear -> GELU -> Linear, SLAM-ASR's projector). Each row also shows the untrained
checkpoint's read-out. No augmentation: the frames are fixed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from torch import nn


def encode(model, ds, n: int, batch: int = 16) -> list[dict]:
    """The first ``n`` clips of ``ds`` -> their final-normed encoder frames (fp16) and transcripts."""
    from steermoe_core.data.dataset import collate

    out = []
    with torch.no_grad():
        for s in range(0, n, batch):
            exs = [ds[i] for i in range(s, min(n, s + batch))]
            b = collate(exs, "")
            z, _ = model.encoder_frames(b.waves, b.lengths)
            for k, frames in enumerate(model.encoder.output_lengths(b.lengths).tolist()):
                out.append({"frames": z[k, :frames].half(), "text": b.targets[k]})
    return out


def make_head(kind: str, model, hidden: int) -> tuple[nn.Module, str]:
    """A head and the pooling it reads (``avg``/``max``/``stack`` over the recipe's stride)."""
    p, proj = model.cfg.projector, model.adapter.projector
    if kind == "checkpoint":
        return copy.deepcopy(proj), p.pooling
    if kind == "linear":
        return nn.Linear(proj.in_features, proj.out_features), p.pooling
    if kind == "mlp":
        d = model.encoder.dim * p.stride
        return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, proj.out_features)), "stack"
    raise SystemExit(f"unknown head {kind!r} (checkpoint, linear, mlp)")


def tokens(model, head: nn.Module, pooling: str, items: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """Clips' frames -> (B, T', H) audio tokens through ``head`` and their real counts."""
    from steermoe_core.model.steering import pool_frames, pooled_lengths

    z = nn.utils.rnn.pad_sequence([it["frames"].float() for it in items], batch_first=True)
    frames = torch.tensor([len(it["frames"]) for it in items])
    mask = torch.arange(z.shape[1])[None] < frames[:, None]
    pooled, _ = pool_frames(z, mask, model.cfg.projector.stride, pooling)
    return head(pooled), pooled_lengths(frames, model.cfg.projector.stride).tolist()


def read_out(model, head, pooling, sets: dict[str, list[dict]]) -> dict[str, float]:
    from steermoe_core.evaluation.metrics import word_error_rate

    head.eval()
    res = {}
    with torch.no_grad():
        for name, items in sets.items():
            hyps = []
            for s in range(0, len(items), 16):
                audio, counts = tokens(model, head, pooling, items[s : s + 16])
                hyps += model.ctc_read(audio, counts)
            res[name] = round(100 * word_error_rate([it["text"] for it in items], hyps), 1)
    head.train()
    return res


def train(model, head, pooling, items, steps: int, lr: float, batch: int, precision, schedule) -> float:
    """AdamW on ``schedule`` (a ``TrainConfig``: the checkpoint recipe's warm-up and cosine, stretched over
    ``steps``); returns the mean CTC loss of the last 25 steps."""
    from steermoe_core.runtime import autocast
    from steermoe_core.training.optim import lr_lambda

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    schedule = dataclasses.replace(schedule, max_steps=steps, decay_steps=steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, schedule))
    rng, order, losses = random.Random(0), [], []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(items)), len(items))
        pick, order = [items[i] for i in order[:batch]], order[batch:]
        with autocast(torch.device("cpu"), precision):
            audio, counts = tokens(model, head, pooling, pick)
            loss = model.ctc_loss(audio, counts, model.ctc_targets([it["text"] for it in pick]))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return sum(losses[-25:]) / len(losses[-25:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/base")
    ap.add_argument("--train", type=Path, required=True, help="prepared training set (its first clips are used)")
    ap.add_argument("--clips", default="600", help="training-set sizes, comma-separated")
    ap.add_argument("--data", action="append", required=True, help="NAME=prepared held-out set (repeatable)")
    ap.add_argument("--heads", default="checkpoint,linear,mlp")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", default="checkpoint=5e-4,linear=2e-3,mlp=1e-3", help="HEAD=LR, comma-separated")
    ap.add_argument("--hidden", type=int, default=2048, help="the MLP's hidden width")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.model.checkpoint import load_checkpoint
    from steermoe_core.runtime import resolve_precision

    torch.manual_seed(0)
    model, recipe, _ = load_checkpoint(args.checkpoint, torch.device("cpu"))
    model.eval()
    precision = resolve_precision(recipe.train.precision, torch.device("cpu"))
    sizes = [int(c) for c in args.clips.split(",")]
    t = time.perf_counter()
    pool = encode(model, ShardedDataset(args.train), max(sizes))
    sets = {}
    for spec in args.data:
        name, _, folder = spec.partition("=")
        ds = ShardedDataset(folder)
        sets[name] = encode(model, ds, len(ds))
    print(f"encoded {len(pool)} training clips and {sum(map(len, sets.values()))} held-out clips in {time.perf_counter() - t:.0f} s",
          flush=True)
    lrs = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(","))}
    if missing := [k for k in args.heads.split(",") if k not in lrs]:
        raise SystemExit(f"--lr names no learning rate for {', '.join(missing)} (HEAD=LR, comma-separated)")
    base = read_out(model, model.adapter.projector, model.cfg.projector.pooling, sets)
    rows = [{"head": "checkpoint, untrained", "clips": 0, **base}]
    print(json.dumps(rows[0]), flush=True)
    for n in sizes:
        for kind in args.heads.split(","):
            torch.manual_seed(0)
            head, pooling = make_head(kind, model, args.hidden)
            t = time.perf_counter()
            loss = train(model, head, pooling, pool[:n], args.steps, lrs[kind], args.batch, precision, recipe.train)
            row = {"head": kind, "clips": n, "params": sum(p.numel() for p in head.parameters()), "train_ctc": round(loss, 3),
                   "s_per_step": round((time.perf_counter() - t) / args.steps, 2), **read_out(model, head, pooling, sets)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = list(sets)
    print(f"\n| head | training clips | trainable | train CTC loss | {' | '.join(names)} |")
    print("|---|---:|---:|---:|" + "---:|" * len(names))
    for r in rows:
        print(f"| {r['head']} | {r['clips'] or ''} | {r.get('params', '')} | {r.get('train_ctc', '')} | "
              + " | ".join(f"{r[n]}%" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
