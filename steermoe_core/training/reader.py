"""A reader trained on text alone: LoRA on the frozen LLM learns to read a CTC read-out and stop.

With ``model.projector.argmax_embeddings`` and ``drop_blank`` the LLM reads each kept audio token as the
embedding of its nearest word piece: the CTC read-out, as text. So the reader can learn from every
sentence of a text file, corrupted as a read-out errs (``data.ctc_noise.ReaderText``, the same
micro-batches ``train.reader_batch`` adds to audio steps), instead of from the few hundred clips a CPU
can synthesise and train on; ``SteerMoEModel.text_forward`` trains it to write them clean, with no audio
and no encoder. The adapter comes from ``init_from`` and does not change. The learning rate is
``train.lr_lora`` on the recipe's own schedule (``train.warmup_steps``, then a cosine to
``train.min_lr_ratio``), stretched over ``steps``.

The result is a checkpoint folder like any other (`steermoe infer --model OUT`, `steermoe export`). A
long reader keeps a checkpoint every ``save_every`` steps in ``OUT-checkpoints/step-N``, with its
optimizer's state in ``reader_state.pt``, and ``resume`` continues from the latest one: the sentences of
a step depend on the step alone, so a resumed reader reads what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from steermoe_core.config import Recipe
from steermoe_core.data.ctc_noise import NoiseConfig, ReaderText
from steermoe_core.errors import CheckpointError, RecipeError
from steermoe_core.model.build import build_model
from steermoe_core.model.checkpoint import save_checkpoint
from steermoe_core.model.lora import lora_parameters
from steermoe_core.runtime import autocast, pick_device, resolve_precision
from steermoe_core.training.init_from import init_from
from steermoe_core.training.optim import lr_lambda

STATE_FILE = "reader_state.pt"


def checkpoints_dir(out: Path) -> Path:
    """Where a reader writing ``out`` keeps its intermediate checkpoints (beside it, not in it: ``out``
    itself is written atomically at the end)."""
    return out.with_name(out.name + "-checkpoints")


def check_reader_recipe(recipe: Recipe) -> None:
    """The reader reads the read-out as text and trains the LLM's LoRA: the recipe must say both."""
    if not recipe.model.reads_text:
        raise RecipeError("a text-trained reader needs model.projector.argmax_embeddings, drop_blank and [model.llm.lora]")


def train_reader(recipe: Recipe, init_from_path: Path, text: Path, out: Path, steps: int, batch: int = 16,
                 noise: NoiseConfig | None = None, fragments: float = 0.0, save_every: int = 0, resume: bool = False,
                 on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train the reader and write ``out``; returns its metrics. ``on_step(step, mean of the last 25 losses)``
    after each step (a progress bar)."""
    check_reader_recipe(recipe)
    device = pick_device(recipe.train.device)
    model = build_model(recipe.model, device, recipe.train.seed)
    taken = init_from(model, None, init_from_path)
    model.max_target_tokens = recipe.data.max_target_tokens
    model.train()
    params = lora_parameters(model.llm)
    opt = torch.optim.AdamW(params, lr=recipe.train.lr_lora or recipe.train.lr, weight_decay=0.0)
    schedule = dataclasses.replace(recipe.train, max_steps=steps, decay_steps=steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, schedule))
    precision = resolve_precision(recipe.train.precision, device)
    noise = noise or NoiseConfig()
    reader = ReaderText.for_tokenizer(text, model.tokenizer, model.ctc_targets, recipe.data.prompt, recipe.train.seed, noise,
                                      fragments)
    kept = checkpoints_dir(out)
    start, losses = _resume(model, opt, sched, kept) if resume else (0, [])
    t0 = time.perf_counter()
    for step in range(start, steps):
        with autocast(device, precision):
            loss = model(reader.batch(step, batch))["loss"]  # the same text micro-batches as train.reader_batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.clip_grad or float("inf"))
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, _recent(losses))
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _keep(model, recipe, kept / f"step-{step + 1:07d}", step + 1, losses, opt, sched, taken)
    model.eval()
    metrics = {"text_loss_last25": _recent(losses), "seconds": round(time.perf_counter() - t0, 1),
               "sentences": steps * batch, "noise": dataclasses.asdict(noise), "fragments": fragments}
    # the audio side is the init checkpoint's: so is what `infer` cuts long recordings to
    heard = {k: v for k, v in json.loads((Path(init_from_path) / "meta.json").read_text()).items() if k == "training_audio"}
    save_checkpoint(model, recipe, out, steps, metrics, run_info={"reader_init_from": taken, **heard})
    return metrics


def _recent(losses: list[float]) -> float:
    """The mean of the last 25 losses: what the progress bar and the checkpoints' metrics show."""
    return sum(losses[-25:]) / max(len(losses[-25:]), 1)


def _keep(model, recipe: Recipe, path: Path, step: int, losses: list[float], opt, sched, taken: dict) -> None:
    """A checkpoint folder like the final one, then the optimizer's state for ``resume`` (a folder
    without it, from a reader killed in between, is passed over)."""
    from steermoe_core.atomic import atomic_file

    save_checkpoint(model, recipe, path, step, {"text_loss_last25": _recent(losses)},
                    run_info={"reader_init_from": taken})
    with atomic_file(path / STATE_FILE) as f:
        torch.save({"step": step, "losses": losses, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, f)


def _resume(model, opt, sched, kept: Path) -> tuple[int, list[float]]:
    """Load the latest kept checkpoint's LoRA and optimizer state; returns (its step, the losses so far)."""
    states = sorted(kept.glob(f"step-*/{STATE_FILE}"))
    if not states:
        raise CheckpointError(f"{kept}: no checkpoint to resume from (a reader keeps them with save_every)")
    init_from(model, None, states[-1].parent)
    st = torch.load(states[-1], weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(st["step"]), list(st["losses"])
