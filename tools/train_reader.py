"""Train the LLM's reader on text alone: LoRA on the frozen LLM learns to read a CTC read-out and stop.

    python tools/train_reader.py steermoe_core/demo/pretrained/recipe.toml --init-from steermoe_core/demo/pretrained \
        --set model.projector.argmax_embeddings=true --set model.projector.drop_blank=true \
        --set model.llm.lora.rank=8 --set train.lr_lora=0.001 --text brown_train.txt --out runs/reader

The recipe (with ``--set`` overrides) must set ``model.projector.argmax_embeddings`` (the LLM reads each audio token as the embedding of
its nearest word piece) and ``drop_blank``, and a ``[model.llm.lora]`` section. The adapter comes from
``--init-from`` and does not change; each step reads ``--batch`` sentences of ``--text`` (``data.ctc_noise.ReaderText``, as
``train.reader_batch`` does: shuffled with the recipe's seed, corrupted as a CTC read-out errs) and trains the
LoRA to write them clean (``SteerMoEModel.text_forward``): no audio, no encoder. What it reads in training
is exactly what audio hands it at inference (a test checks the two losses agree), so the reader learns
from every sentence of a text file instead of the few hundred clips a CPU can synthesise and train on.
The learning rate is ``train.lr_lora`` on the recipe's own schedule (``train.warmup_steps``, then a cosine
to ``train.min_lr_ratio``: ``training.optim.lr_lambda``), stretched over ``--steps``. The result is a
checkpoint folder like any other (`steermoe infer --model OUT`, `steermoe export`), written at the end.
A long reader keeps a checkpoint every ``--save-every`` steps in ``OUT-checkpoints/step-N`` (with its
optimizer's state in ``reader_state.pt``), and ``--resume`` continues from the latest one: the sentences
of a step depend on the step alone, so a resumed reader reads what an uninterrupted one would.
See docs/training_cpu.md, "Recipe levers, measured".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--init-from", type=Path, required=True, help="the checkpoint whose adapter the reader reads")
    ap.add_argument("--text", type=Path, required=True, help="sentences to read, one a line")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="a recipe override, KEY=VALUE (repeatable)")
    ap.add_argument("--noise", action="append", default=[],
                    help="a data.ctc_noise.NoiseConfig setting, KEY=VALUE (repeatable; e.g. clean=0.1): fit them with benchmarks/ctc_noise_fit.py")
    ap.add_argument("--fragments", type=float, default=0.0,
                    help="share of rows cut to 1-4 of their words (data.reader_fragments): short utterances")
    ap.add_argument("--save-every", type=int, default=0, help="keep a checkpoint every N steps in OUT-checkpoints/step-N; 0 = off")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT-checkpoints/")
    args = ap.parse_args()

    import torch
    from rich.progress import Progress

    from steermoe_core.config import load_recipe
    from steermoe_core.data.ctc_noise import NoiseConfig, ReaderText
    from steermoe_core.errors import RecipeError
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint
    from steermoe_core.model.lora import lora_parameters
    from steermoe_core.runtime import autocast, pick_device, resolve_precision
    from steermoe_core.training.init_from import init_from
    from steermoe_core.training.optim import lr_lambda

    recipe = load_recipe(args.recipe, args.set)
    p = recipe.model.projector
    if not (p.argmax_embeddings and p.drop_blank and recipe.model.llm.lora is not None):
        raise RecipeError(f"{args.recipe}: a text-trained reader needs model.projector.argmax_embeddings, drop_blank and [model.llm.lora]")
    device = pick_device(recipe.train.device)
    model = build_model(recipe.model, device, recipe.train.seed)
    taken = init_from(model, None, args.init_from)
    model.max_target_tokens = recipe.data.max_target_tokens
    model.train()
    params = lora_parameters(model.llm)
    peak = recipe.train.lr_lora or recipe.train.lr
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
    schedule = dataclasses.replace(recipe.train, max_steps=args.steps, decay_steps=args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, schedule))
    precision = resolve_precision(recipe.train.precision, device)
    noise = NoiseConfig.parse(args.noise)
    reader = ReaderText.for_tokenizer(args.text, model.tokenizer, model.ctc_targets, recipe.data.prompt, recipe.train.seed, noise,
                                      args.fragments)
    losses: list[float] = []
    steps_dir = args.out.with_name(args.out.name + "-checkpoints")
    start = 0
    if args.resume:
        start, losses = resume(model, opt, sched, steps_dir)
    t0 = time.perf_counter()
    with Progress() as bar:
        task = bar.add_task("reader steps", total=args.steps, completed=start)
        for step in range(start, args.steps):
            with autocast(device, precision):
                loss = model(reader.batch(step, args.batch))["loss"]  # the same text micro-batches as train.reader_batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.train.clip_grad or float("inf"))
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"reader steps, loss {sum(losses[-25:]) / len(losses[-25:]):.3f}")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                keep(model, recipe, steps_dir / f"step-{step + 1:07d}", step + 1, losses, opt, sched, taken)
    model.eval()
    metrics = {"text_loss_last25": sum(losses[-25:]) / len(losses[-25:]), "seconds": round(time.perf_counter() - t0, 1),
               "sentences": args.steps * args.batch, "noise": noise.__dict__,
               "fragments": args.fragments}
    save_checkpoint(model, recipe, args.out, args.steps, metrics, run_info={"reader_init_from": taken})
    print(json.dumps({"out": str(args.out), **metrics}))


def keep(model, recipe, path: Path, step: int, losses: list[float], opt, sched, taken: dict) -> None:
    """A checkpoint folder like the final one, plus the optimizer's state for ``--resume``."""
    import torch

    from steermoe_core.atomic import atomic_file
    from steermoe_core.model.checkpoint import save_checkpoint

    save_checkpoint(model, recipe, path, step, {"text_loss_last25": sum(losses[-25:]) / len(losses[-25:])},
                    run_info={"reader_init_from": taken})
    with atomic_file(path / "reader_state.pt") as f:
        torch.save({"step": step, "losses": losses, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, f)


def resume(model, opt, sched, steps_dir: Path) -> tuple[int, list[float]]:
    """Load the latest kept checkpoint's LoRA and optimizer state; returns (its step, the losses so far)."""
    import torch

    from steermoe_core.errors import CheckpointError
    from steermoe_core.training.init_from import init_from

    kept = sorted(steps_dir.glob("step-*/reader_state.pt"))
    if not kept:
        raise CheckpointError(f"{steps_dir}: no checkpoint to resume from (--save-every keeps them)")
    init_from(model, None, kept[-1].parent)
    st = torch.load(kept[-1], weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(st["step"]), list(st["losses"])


if __name__ == "__main__":
    from steermoe_core.errors import SteermoeError

    try:
        sys.exit(main())
    except SteermoeError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
