"""Train the LLM's reader on text alone: LoRA on the frozen LLM learns to read a CTC read-out and stop.

    python tools/train_reader.py recipes/demo_ctc_stage.toml --init-from checkpoints/ctc_stage \
        --set model.projector.argmax_embeddings=true --set model.projector.drop_blank=true \
        --set model.llm.lora.rank=8 --set train.lr_lora=0.001 --text brown_train.txt --out runs/reader

The recipe (with ``--set`` overrides) must set ``model.projector.argmax_embeddings`` and ``drop_blank``,
and a ``[model.llm.lora]`` section; the adapter comes from ``--init-from`` and does not change. Each step
reads ``--batch`` sentences of ``--text``, corrupted as a CTC read-out errs. ``--save-every N`` keeps a
checkpoint every N steps in ``OUT-checkpoints/step-N``; ``--resume`` continues from the latest. What it
does and why: ``steermoe_core/training/reader.py``.
See docs/training_cpu.md, "Recipe levers, measured".
"""

from __future__ import annotations

import argparse
import json
import sys
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

    from rich.progress import Progress

    from steermoe_core.config import load_recipe
    from steermoe_core.data.ctc_noise import NoiseConfig
    from steermoe_core.errors import RecipeError
    from steermoe_core.training.reader import check_reader_recipe, train_reader

    recipe = load_recipe(args.recipe, args.set)
    try:
        check_reader_recipe(recipe)
    except RecipeError as e:
        raise RecipeError(f"{args.recipe}: {e}") from None
    noise = NoiseConfig.parse(args.noise)
    with Progress() as bar:
        task = bar.add_task("reader steps", total=args.steps)

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step, description=f"reader steps, loss {loss:.3f}")

        metrics = train_reader(recipe, args.init_from, args.text, args.out, args.steps, args.batch, noise, args.fragments,
                               args.save_every, args.resume, on_step)
    print(json.dumps({"out": str(args.out), **metrics}))


if __name__ == "__main__":
    from steermoe_core.errors import SteermoeError

    try:
        sys.exit(main())
    except SteermoeError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
