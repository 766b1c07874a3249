"""`steermoe train`: single-device training of the adapter (DESIGN.md section 8).

Resumable at any checkpoint: the batch order is a pure function of (seed, epoch), so the data
position is just (epoch, batches done) and nothing has to be replayed to get back to it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import write_text
from .checkpoint import load_checkpoint, load_train_state, save_checkpoint
from .config import Recipe, TrainConfig, dump_recipe
from .data import ShardedDataset, length_bucketed_batches, make_loader
from .evaluate import predict_dataset
from .metrics import score
from .model import SteerMoEModel, autocast
from .weights import pick_device

KEEP_CHECKPOINTS = 2


@dataclass
class Callbacks:
    """How the CLI watches a run without the core knowing about terminals."""

    on_start: Callable[[dict], None] = lambda info: None
    on_step: Callable[[dict], None] = lambda rec: None
    on_eval: Callable[[dict], None] = lambda rec: None
    on_save: Callable[[Path], None] = lambda path: None


@dataclass
class TrainResult:
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    final_metrics: dict = field(default_factory=dict)


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to ``min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: SteerMoEModel, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """One AdamW group per parameter family, each with its own learning rate."""
    per_group = {"steering_vectors": cfg.lr_steering, "router": cfg.lr_router, "scales": cfg.lr_scales, "projector": cfg.lr_projector}
    groups = []
    for name, params in model.parameter_groups().items():
        lr = per_group[name] or cfg.lr
        if name == "projector" and cfg.weight_decay:
            groups.append({"name": "projector", "params": [model.projector.weight], "lr": lr, "weight_decay": cfg.weight_decay})
            groups.append({"name": "projector_bias", "params": [model.projector.bias], "lr": lr, "weight_decay": 0.0})
        else:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), fused=device.type == "cuda")


def latest_checkpoint(out: Path) -> Path | None:
    marker = out / "checkpoints" / "latest"
    if marker.exists():
        path = out / "checkpoints" / marker.read_text().strip()
        if (path / "train_state.pt").exists():
            return path
    return None


def _prune(out: Path) -> None:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    for old in ckpts[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def validate(model: SteerMoEModel, ds: ShardedDataset, recipe: Recipe, device: torch.device) -> dict:
    """Validation loss over the set (capped) and the headline metric on ``eval.max_examples``."""
    model.eval()
    batches = length_bucketed_batches(ds, recipe.data.batch_size, shuffle=False)[:50]
    total, n = 0.0, 0
    with torch.no_grad():
        for batch, _ in make_loader(ds, batches, recipe.data.prompt, 0):
            with autocast(device, recipe.train.precision):
                out = model(batch)
            total += out["ce"].item() * out["tokens"].item()
            n += out["tokens"].item()
        preds = predict_dataset(model, ds, recipe, recipe.eval.max_examples or 64)
    model.train()
    metrics = {"valid_loss": total / max(n, 1)}
    metrics.update(score(recipe.eval.metric, [p["reference"] for p in preds], [p["prediction"] for p in preds]))
    return metrics


def train(recipe: Recipe, out: Path, resume: bool = False, callbacks: Callbacks | None = None) -> TrainResult:
    cb = callbacks or Callbacks()
    cfg = recipe.train
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    start = latest_checkpoint(out) if resume else None
    if resume and start is None and (out / "model").exists():
        raise RuntimeError(f"{out}: this run already finished (model/ exists); nothing to resume")
    if start is not None:
        model, _, _ = load_checkpoint(start, device)
    else:
        from .builder import build_model

        model = build_model(recipe.model, device, cfg.seed)
    model.max_target_tokens = recipe.data.max_target_tokens
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile:
        model.encoder.layers = torch.nn.ModuleList(torch.compile(layer) for layer in model.encoder.layers)
        model.llm.base_model.forward = torch.compile(model.llm.base_model.forward)

    train_ds = ShardedDataset(recipe.data.train, recipe.data.max_duration)
    if len(train_ds) == 0:
        raise RuntimeError(f"{recipe.data.train}: no training examples of at most {recipe.data.max_duration} s")
    valid_ds = ShardedDataset(recipe.data.valid) if recipe.data.valid else None

    opt = make_optimizer(model, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg))
    step, epoch, done_in_epoch = 0, 0, 0
    if start is not None:
        st = load_train_state(start)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, epoch, done_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
        torch.set_rng_state(st["rng"])
        if device.type == "cuda" and st.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(st["cuda_rng"], device)

    write_text(out / "recipe.toml", dump_recipe(recipe))
    cb.on_start({
        "device": str(device), "parameters": model.parameter_counts(), "train_examples": len(train_ds),
        "skipped_too_long": train_ds.too_long, "start_step": step, "max_steps": cfg.max_steps,
    })
    log_path = out / "metrics.jsonl"
    history: list[dict] = []

    def train_state() -> dict:
        return {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
            "batch_in_epoch": done_in_epoch, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def log(rec: dict) -> None:
        history.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def save(metrics: dict) -> None:
        path = save_checkpoint(model, recipe, out / "checkpoints" / f"step-{step:07d}", step, metrics, train_state())
        write_text(out / "checkpoints" / "latest", path.name)
        _prune(out)
        cb.on_save(path)

    model.train()
    window_loss = torch.zeros((), device=device)
    window_n, window_samples, window_audio, t0 = 0, 0, 0.0, time.perf_counter()
    last_metrics: dict = {}
    while step < cfg.max_steps:
        batches = length_bucketed_batches(train_ds, recipe.data.batch_size, recipe.data.max_batch_seconds, cfg.seed, epoch)
        loader = make_loader(train_ds, batches[done_in_epoch:], recipe.data.prompt, recipe.data.num_workers)
        for micro, (batch, _) in enumerate(loader):
            batch.waves = batch.waves.to(device, non_blocking=True)
            with autocast(device, cfg.precision):
                out_ = model(batch)
            (out_["loss"] / cfg.grad_accum).backward()
            window_loss += out_["ce"].detach()
            window_n += 1
            window_samples += len(batch.lengths)
            window_audio += float(batch.lengths.sum()) / 16_000
            done_in_epoch += 1
            if (micro + 1) % cfg.grad_accum:
                continue
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - t0
                rec = {
                    "step": step, "loss": (window_loss / window_n).item(), "lr": sched.get_last_lr()[0],
                    "samples_per_s": window_samples / dt, "audio_s_per_s": window_audio / dt, "epoch": epoch,
                }
                log(rec)
                cb.on_step(rec)
                window_loss.zero_()
                window_n, window_samples, window_audio, t0 = 0, 0, 0.0, time.perf_counter()
            if valid_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                last_metrics = {"step": step, **validate(model, valid_ds, recipe, device)}
                log(last_metrics)
                cb.on_eval(last_metrics)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save(last_metrics)
            if step >= cfg.max_steps:
                break
        else:
            epoch, done_in_epoch = epoch + 1, 0
            continue
        break

    if valid_ds is not None:
        last_metrics = {"step": step, **validate(model, valid_ds, recipe, device)}
        log(last_metrics)
        cb.on_eval(last_metrics)
    save(last_metrics)
    final = save_checkpoint(model, recipe, out / "model", step, last_metrics)
    return TrainResult(model_dir=final, history=history, final_metrics=last_metrics)
