"""`steermoe train`: the training loop as small functions (docs/design.md#training).

Resumable at any checkpoint: the batch order is a pure function of (seed, epoch), so the data
position is just (epoch, batches done) and nothing has to be replayed to get back to it. An
optimizer step always takes exactly ``grad_accum`` micro-batches, across epoch boundaries too.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steermoe_core.atomic import write_text
from steermoe_core.audio.load import SAMPLE_RATE
from steermoe_core.config import Recipe, dump_recipe
from steermoe_core.data.augment import Augment
from steermoe_core.data.batch import AudioBatch
from steermoe_core.data.ctc_noise import ReaderText, TextBatch
from steermoe_core.data.concat import training_audio_stats
from steermoe_core.data.dataset import ShardedDataset, make_loader
from steermoe_core.data.sampler import length_bucketed_batches
from steermoe_core.errors import DataError, TrainingError, UsageError, storage_error
from steermoe_core.evaluation.evaluate import evaluate
from steermoe_core.model.checkpoint import (
    load_checkpoint,
    model_identity,
    read_train_state,
    save_checkpoint,
)
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.runtime import Precision, autocast, pick_device, resolve_precision
from steermoe_core.training.engines import make_strategy
from steermoe_core.training.init_from import initialise
from steermoe_core.training.optim import make_optimizer, make_scheduler
from steermoe_core.training.run_folder import (
    ResumePoint,
    clean_leftovers,
    clear_run,
    holds_a_run,
    latest_complete,
    prune,
    resume_point,
    run_folder_lock,
)
from steermoe_core.training.strategy import SingleDevice, Strategy


@dataclass
class Callbacks:
    """How the CLI watches a run without the core knowing about terminals."""

    on_start: Callable[[dict], None] = lambda info: None
    on_step: Callable[[dict], None] = lambda rec: None
    on_eval: Callable[[dict], None] = lambda rec: None
    on_save: Callable[[Path], None] = lambda path: None
    on_skip: Callable[[dict], None] = lambda rec: None


@dataclass
class TrainResult:
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    final_metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Position:
    """Where the data stream stands: epoch, and batches of it already consumed."""

    epoch: int = 0
    batch_in_epoch: int = 0


# -- one step --------------------------------------------------------------------------------------
def train_step(
    model: SteerMoEModel,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[AudioBatch | TextBatch],
    precision: Precision | str,
    clip_grad: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    strategy: Strategy | None = None,
) -> dict:
    """One optimizer step over ``micro_batches`` (gradient accumulation): forward + backward each,
    then clip, step and zero. Returns device tensors where a value would force a sync. A text-only
    micro-batch goes first, so that the last one, whose backward synchronises processes, is an audio
    batch that gives every trainable weight its gradient."""
    strategy = strategy or SingleDevice()
    device = model.device
    ce = torch.zeros((), device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    samples, audio_s = 0, 0.0
    for i, batch in enumerate(micro_batches):
        audio = isinstance(batch, AudioBatch)  # else a text-only reader batch (data.ctc_noise.TextBatch)
        if audio:
            batch.waves = batch.waves.to(device, non_blocking=True)
        with strategy.accumulating(last=i == len(micro_batches) - 1):
            with autocast(device, precision):
                out = strategy.forward(model, batch)
            finite &= torch.isfinite(out["loss"].detach())
            strategy.backward(out["loss"] / len(micro_batches), out["tokens"])
        ce += out["ce"].detach()
        if audio:
            samples += len(batch.lengths)
            audio_s += float(batch.lengths.sum()) / SAMPLE_RATE
    # one host sync per step: every process must agree before any of them steps
    bad = strategy.any_rank(~finite)
    grad_norm = strategy.optimizer_step(optimizer, clip_grad, skip=bad)
    if scheduler is not None and not bad:
        scheduler.step()
    return {"ce": ce / len(micro_batches), "grad_norm": grad_norm, "samples": samples, "audio_s": audio_s, "bad": bad}


def micro_batch_stream(
    ds: ShardedDataset, recipe: Recipe, start: Position, strategy: Strategy
) -> Iterator[tuple[AudioBatch, list[str], Position]]:
    """Training micro-batches forever, epoch after epoch, each with its example ids and the position just after it."""
    epoch, done = start.epoch, start.batch_in_epoch
    d = recipe.data
    while True:
        batches = length_bucketed_batches(ds, d.batch_size, d.max_batch_seconds, recipe.train.seed, epoch)
        batches = strategy.shard(batches)
        augment = Augment.from_data(d, recipe.train.seed, epoch)
        for batch, examples in make_loader(ds, batches[done:], d.prompt, d.num_workers, augment):
            done += 1
            yield batch, [e.id for e in examples], Position(epoch, done)
        epoch, done = epoch + 1, 0


# -- validation ------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model: SteerMoEModel, ds: ShardedDataset, recipe: Recipe, precision: Precision, strategy: Strategy) -> float:
    """Mean target-token cross-entropy over the whole set (each process takes its share)."""
    total, n = 0.0, 0
    batches = length_bucketed_batches(ds, recipe.eval.batch_size, shuffle=False, only=set(strategy.shard_items(list(range(len(ds))))))
    for batch, _ in make_loader(ds, batches, recipe.data.prompt, 0):
        batch.waves = batch.waves.to(model.device)
        with autocast(model.device, precision):
            out = model(batch)
        total += out["ce"].item() * out["tokens"].item()
        n += out["tokens"].item()
    total, n = strategy.reduce_sum([total, n])
    return total / max(n, 1)


def validate(model: SteerMoEModel, ds: ShardedDataset, recipe: Recipe, precision: Precision, strategy: Strategy | None = None) -> dict:
    """Loss over the whole validation set, and the headline metric over the whole set too, or over a
    seeded random sample of ``eval.max_examples`` (never the shortest clips only). With several
    processes each decodes its share and the predictions are gathered."""
    strategy = strategy or SingleDevice()
    model.eval()
    metrics = {"valid_loss": validation_loss(model, ds, recipe, precision, strategy)}
    # the loss at the training precision; the decoded metric at the decoding one, as `steermoe eval` scores it
    summary = evaluate(model, ds, recipe, shard=strategy.shard_items, gather=strategy.gather)
    metrics.update({k: v for k, v in summary.items() if k not in ("data", "examples", "precision")})
    metrics["valid_examples"] = summary["examples"]
    model.train()
    return metrics


# -- checkpoints -----------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out`` (what ``--resume`` starts from), or None."""
    return latest_complete(out)


def _train_state(opt, sched, step: int, pos: Position, device: torch.device, strategy: Strategy, bad_steps: int) -> dict:
    return {
        "optimizer": strategy.optimizer_state(opt), "scheduler": sched.state_dict(), "step": step, "epoch": pos.epoch,
        "world_size": strategy.world_size, "bad_steps": bad_steps,
        "batch_in_epoch": pos.batch_in_epoch, "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _restore(start: Path, sched, device: torch.device) -> tuple[dict, int, Position]:
    """(the saved train state, step, position). The optimizer state is the strategy's to restore,
    after ``prepare`` (``Strategy.load_engine``): ZeRO must see it after flattening its partitions."""
    st = read_train_state(start)
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng"])
    if device.type == "cuda" and st.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(st["cuda_rng"], device)
    return st, int(st["step"]), Position(int(st["epoch"]), int(st["batch_in_epoch"]))


def _model_for_run(recipe: Recipe, start: Path | None, device: torch.device) -> SteerMoEModel:
    """A fresh model, or the one in the checkpoint being resumed. ``trust_remote_code`` comes from
    the recipe the user passed to this run, never from what the checkpoint stored."""
    trust = recipe.model.llm.trust_remote_code
    if start is not None:
        model, _, _ = load_checkpoint(start, device, trust_remote_code=trust)
    else:
        from steermoe_core.model.build import build_model

        model = build_model(recipe.model, device, recipe.train.seed, trust)
    model.max_target_tokens = recipe.data.max_target_tokens
    model.ctc_weight = recipe.train.ctc_weight
    model.pad_to_repeated_shapes(recipe.data.pad_multiple_seconds)  # this run's recipe, not the checkpoint's
    if recipe.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if recipe.train.compile:
        layers = model.encoder.layers
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer, dynamic=True)
        model.llm.base_model.forward = torch.compile(model.llm.base_model.forward)
    return model


def _drop_records_after(log_path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old lines (and a line cut
    short by the kill) so that metrics.jsonl holds each step once."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    write_text(log_path, "".join(x + "\n" for x in keep))


def _likely_cause(cfg, step: int, lrs: list[float]) -> str:
    """What the NaN stop message suggests. Losses that were finite and then were not, after updates,
    point at the learning rates (named, with their value now); non-finite before any update cannot be
    the learning rate's doing: the data or the backbones (the skipped batch ids are in metrics.jsonl)."""
    if step == 0:
        return "the loss was not finite before any update, so not the learning rate: check the data (batch ids in metrics.jsonl) and the backbones"
    set_ = [f"train.{k} = {getattr(cfg, k):g}" for k in ("lr", "lr_steering", "lr_router", "lr_scales", "lr_projector", "lr_lora")
            if getattr(cfg, k)]
    now = ", ".join(f"{x:.3g}" for x in sorted(set(lrs)))
    return f"the likely cause is a learning rate too high: {', '.join(set_)} (now {now}); lower it and resume"


class _Window:
    """Running totals between two log lines."""

    def __init__(self, device: torch.device):
        self.ce, self.steps, self.samples, self.audio_s = torch.zeros((), device=device), 0, 0, 0.0
        self.grad_norm = torch.zeros((), device=device)
        self.t0 = time.perf_counter()

    def add(self, stats: dict) -> None:
        self.ce += stats["ce"]
        self.grad_norm += stats["grad_norm"].to(self.grad_norm.device)
        self.steps += 1
        self.samples += stats["samples"]
        self.audio_s += stats["audio_s"]

    def record(self, step: int, lr: float, epoch: int, strategy: Strategy) -> dict:
        dt = time.perf_counter() - self.t0
        loss, samples, audio_s = strategy.reduce_sum([(self.ce / self.steps).item(), self.samples, self.audio_s])
        return {
            "step": step, "loss": loss / strategy.world_size, "grad_norm": (self.grad_norm / self.steps).item(),
            "lr": lr, "samples_per_s": samples / dt, "audio_s_per_s": audio_s / dt, "epoch": epoch,
            "world_size": strategy.world_size,
        }


# -- the loop --------------------------------------------------------------------------------------
def train(
    recipe: Recipe, out: Path, resume: bool = False, callbacks: Callbacks | None = None, strategy: Strategy | None = None,
    overwrite: bool = False, init_from: Path | None = None,
) -> TrainResult:
    """Train into the run folder ``out``. A folder that holds an earlier run (checkpoints or a model)
    is refused unless ``resume`` (continue it from its newest complete checkpoint) or ``overwrite``
    (remove it first); the writing process holds the folder's lock throughout.

    ``init_from``: a new run starts from that checkpoint's weights and, where it kept them, its Adam
    moments (``training.init_from``); a resumed run continues from its own checkpoint and ignores it."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    cfg = recipe.train
    device = pick_device(cfg.device)
    if strategy is not None:
        return _train(recipe, out, resume, overwrite, callbacks or Callbacks(), strategy, device, init_from)
    strategy, device = make_strategy(recipe.distributed.engine, device, recipe, resolve_precision(cfg.precision, device))
    try:
        return _train(recipe, out, resume, overwrite, callbacks or Callbacks(), strategy, device, init_from)
    finally:
        strategy.close()


def _claim(out: Path, resume: bool, overwrite: bool, main: bool) -> ResumePoint | None:
    """Decide where this run starts, under the lock. Every process decides the same from the same
    folder; only the main one cleans up or clears it."""
    if main:
        clean_leftovers(out)
    if resume:
        return resume_point(out)
    earlier = holds_a_run(out)
    if earlier and not overwrite:
        raise UsageError(f"{out}: holds an earlier run ({', '.join(earlier)}); continue it with --resume, "
                         "replace it with --overwrite, or give another --out")
    if main:
        clear_run(out)  # also the metrics.jsonl of a run killed before its first checkpoint
    return None


def _train(recipe: Recipe, out: Path, resume: bool, overwrite: bool, cb: Callbacks, strategy: Strategy,
           device: torch.device, init_from: Path | None = None) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(out) if strategy.is_main else contextlib.nullcontext():
        return _train_locked(recipe, out, resume, overwrite, cb, strategy, device, init_from)


def _train_locked(recipe: Recipe, out: Path, resume: bool, overwrite: bool, cb: Callbacks, strategy: Strategy,
                  device: torch.device, init_from: Path | None = None) -> TrainResult:
    cfg = recipe.train
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    point = _claim(out, resume, overwrite, strategy.is_main)
    start = point.path if point is not None else None
    model = _model_for_run(recipe, start, device)
    train_ds = ShardedDataset(recipe.data.train, recipe.data.max_duration)
    if len(train_ds) == 0:
        raise DataError(f"{recipe.data.train}: no training examples of at most {recipe.data.max_duration} s")
    valid_ds = ShardedDataset(recipe.data.valid) if recipe.data.valid else None
    if recipe.data.concat_seconds > 0 or recipe.data.align_instructions:  # joined utterances; behaviour-alignment targets
        from steermoe_core.data.alignment import training_view
        from steermoe_core.generation.chat import llm_chat

        train_ds = training_view(train_ds, recipe.data, cfg.seed, out, llm_chat(model, precision.name), strategy.is_main)

    opt = make_optimizer(model, cfg, device)
    sched = make_scheduler(opt, cfg)
    init = initialise(model, opt, out, start, init_from, strategy)
    saved, step, pos = _restore(start, sched, device) if start is not None else ({}, 0, Position())
    bad_steps = int(saved.get("bad_steps", 0))
    log_path = out / "metrics.jsonl"
    if start is not None and strategy.is_main:
        _drop_records_after(log_path, step)
    identity = model_identity(model)  # before ZeRO-3 partitions the weights (backbones too)
    strategy.prepare(model, opt)
    if start is not None:
        strategy.load_engine(start, saved, opt)

    history: list[dict] = []
    run_info = {"engine": strategy.name, "world_size": strategy.world_size, "precision": precision.name,
                "training_audio": training_audio_stats(train_ds, model.tokenizer)}  # what `infer` cuts long audio to
    if init is not None:
        run_info["init_from"] = init
    if strategy.is_main:
        write_text(out / "recipe.toml", dump_recipe(recipe))
    cb.on_start({
        "device": str(device), "precision": str(precision), "parameters": identity["parameters"],
        "train_examples": len(train_ds), "skipped_too_long": train_ds.too_long, "start_step": step,
        "max_steps": cfg.max_steps, "world_size": strategy.world_size,
        "resumed_from": str(start) if start is not None else None, "init_from": init,
        "passed_over": list(point.passed_over) if point is not None else [],
    })

    def log(rec: dict) -> None:
        history.append(rec)
        if strategy.is_main:
            try:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:  # a full disk: one line naming the file (the checkpoints are intact)
                err = storage_error(e, log_path)
                if err is None:
                    raise
                raise err from e

    def evaluate_now() -> dict:
        stage, model.ctc_only = model.ctc_only, False  # validation always scores the full model
        metrics = {"step": step, **validate(model, valid_ds, recipe, precision, strategy)}
        model.ctc_only = stage
        log(metrics)
        cb.on_eval(metrics)
        return metrics

    def save(metrics: dict) -> None:
        """Every process takes part (ZeRO-3 gathers the adapter, DeepSpeed writes each rank's
        optimizer partition); ``latest`` moves only once the whole checkpoint is on disk."""
        path = out / "checkpoints" / f"step-{step:07d}"
        with strategy.gathered(model):
            if strategy.is_main:
                save_checkpoint(model, recipe, path, step, metrics,
                                _train_state(opt, sched, step, pos, device, strategy, bad_steps), run_info, identity)
        strategy.barrier()
        strategy.save_engine(path)
        strategy.barrier()
        if strategy.is_main:
            write_text(out / "checkpoints" / "latest", path.name)
            prune(out, step, cfg.keep_checkpoints)
            cb.on_save(path)
        strategy.barrier()

    def skipped(ids: list[str]) -> None:
        """A non-finite loss on some process: logged with every process's batch ids; too many stop the run."""
        nonlocal bad_steps
        bad_steps += 1
        rec = {"step": step, "skipped": "non-finite loss", "bad_steps": bad_steps, "batch_ids": strategy.gather(ids)}
        log(rec)
        cb.on_skip(rec)
        if bad_steps >= cfg.max_bad_steps:
            last = latest_checkpoint(out)
            raise TrainingError(
                f"{out}: {bad_steps} steps had a NaN/inf loss (train.max_bad_steps = {cfg.max_bad_steps}); stopped at step {step}, "
                + (f"last good checkpoint {last} (continue with --resume after fixing the cause)" if last else "no checkpoint saved yet")
                + f"; {_likely_cause(cfg, step, sched.get_last_lr())}")

    stream = micro_batch_stream(train_ds, recipe, pos, strategy)
    reader = ReaderText.for_tokenizer(recipe.data.reader_text, model.tokenizer, model.ctc_targets, recipe.data.prompt, recipe.train.seed,
                                      fragments=recipe.data.reader_fragments) if recipe.train.reader_batch else None
    model.train()
    window = _Window(device)
    metrics: dict = {}
    while step < cfg.max_steps:
        model.ctc_only = step < cfg.ctc_only_steps
        group = [next(stream) for _ in range(cfg.grad_accum)]
        text = [reader.batch(step, cfg.reader_batch, strategy.rank, strategy.world_size)] if reader and not model.ctc_only else []
        stats = train_step(model, opt, text + [b for b, _, _ in group], precision, cfg.clip_grad, sched, strategy)
        pos = group[-1][2]
        if stats["bad"]:
            skipped([i for _, ids, _ in group for i in ids])
            continue
        step += 1
        window.add(stats)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rec = window.record(step, sched.get_last_lr()[0], pos.epoch, strategy)
            log(rec)
            cb.on_step(rec)
            window = _Window(device)
        if valid_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics = evaluate_now()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save(metrics)

    if valid_ds is not None:
        metrics = evaluate_now()
    save(metrics)
    with strategy.gathered(model):
        final = save_checkpoint(model, recipe, out / "model", step, metrics, run_info=run_info,
                                identity=identity) if strategy.is_main else out / "model"
    return TrainResult(model_dir=final, history=history, final_metrics=metrics)
