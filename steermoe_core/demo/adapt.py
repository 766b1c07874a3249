"""`steermoe demo` (what `make demo` runs): the shipped model adapted, before your eyes, to a voice it never heard.

A reader cannot be trained from scratch in 20 minutes on 2 CPU cores (`demo --full` takes hours), but an
adapter that already reads English can be adapted in minutes. The demo starts from whatever adapter ships in
``demo/pretrained`` (loaded from its path, so a new shipped model is picked up with no other change),
fine-tunes it on a held-out voice (``ADAPT_VOICES``) speaking a kind of text it never trained on (Harvard
sentences), and scores it before and after on Harvard sentences in that voice that the fine-tune never sees, plus the
training voices it already knew (to show it did not forget them). Fine-tuning on the new voice alone made it
forget them (their WER rose from 60% to 74% while the new voice's fell from 65% to 54%), so each batch also
replays clips of the start adapter's own training text in its own training voices (``REPLAY_FRACTION``).

The training length comes from a measured step time: the first few steps are timed, and the run takes as
many steps as fit its time budget (and what is left of the demo's), between a floor that still shows the
score fall and a ceiling. Every stage leaves its result in the work folder and is reused by the next run.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steermoe_core.atomic import write_text
from steermoe_core.demo.text import (
    ADAPT_TEST_POOL,
    ADAPT_VOICES,
    TRAIN_VOICES,
    adapt_replay_sentences,
    adapt_test_sentences,
    adapt_train_sentences,
    in_domain_sentences,
)
from steermoe_core.errors import UsageError
from steermoe_core.inference.api import SHIPPED_MODEL

Log = Callable[[str], None]

# The share of each adaptation batch that replays the start adapter's own training data (Brown training
# sentences in its training voices): without it, adapting to the new voice made it forget the old ones.
REPLAY_FRACTION = 0.5


@dataclass
class AdaptConfig:
    """What `make demo` runs. Sized so that the whole command (set-up aside) ends within about 15 minutes
    on 2 CPU cores of either kind: the fixed part (synthesis, loading, scoring twice) takes 4-6 minutes
    there, the training what its time budget allows at the measured step time."""

    workdir: Path
    start: Path = SHIPPED_MODEL  # the adapter to adapt: the shipped one, whatever it is now
    voices: tuple[str, ...] = ADAPT_VOICES  # the voices to adapt to; the shipped run never heard them
    train_sentences: int = 600  # Harvard sentences after the test pool, spoken in ``voices``
    test_sentences: int = 40  # held-out Harvard sentences in ``voices``: the fine-tune never sees them
    control_sentences: int = 20  # held-out Brown sentences in the training voices (0 = no such column)
    batch_size: int = 8
    replay_fraction: float = REPLAY_FRACTION  # of each batch: replayed clips in the training voices (0 = none)
    replay_sentences: int = 300  # Brown training sentences (the shipped run's own) spoken in the training voices, to replay
    lr_scale: float = 0.3  # times the start adapter's own recipe lrs (0.3 = its floor lr)
    steps: int = 0  # > 0: exactly this many steps; 0 = sized from the measured step time
    probe_steps: int = 3  # timed steps (part of the run) that size it; the first is warm-up, not counted
    min_steps: int = 24  # the floor: fewer steps do not move the score reliably
    max_steps: int = 240
    train_budget_s: float = 420.0  # training's share of the demo's time
    total_budget_s: float = 900.0  # the whole run (not the set-up): training shrinks to keep to it
    seed: int = 0
    max_new_tokens: int = 0  # 0 = the start adapter's recipe's eval.max_new_tokens
    whisper: bool = True  # score Whisper tiny.en's own decoder on the same clips (the reference row)

    def __post_init__(self) -> None:
        for name in ("train_sentences", "test_sentences", "batch_size", "probe_steps", "min_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"demo: {name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.control_sentences < 0:
            raise UsageError("demo: steps and control_sentences must be 0 or more")
        if self.test_sentences > ADAPT_TEST_POOL:
            raise UsageError(f"demo: at most {ADAPT_TEST_POOL} test sentences, {self.test_sentences} asked for")
        if self.probe_steps > self.min_steps:
            raise UsageError(f"demo: probe_steps {self.probe_steps} is above min_steps {self.min_steps} (the timed steps are part of the run)")
        if self.min_steps > self.max_steps:
            raise UsageError(f"demo: min_steps {self.min_steps} is above max_steps {self.max_steps}")
        if not 0 <= self.replay_fraction < 1:
            raise UsageError(f"demo: replay_fraction must be at least 0 and below 1, got {self.replay_fraction}")
        if self.replay_fraction and (self.replay_sentences < 1 or self.batch_size < 2):
            raise UsageError("demo: replaying needs replay_sentences >= 1 and batch_size >= 2 (a batch holds both kinds)")
        if not self.lr_scale > 0:
            raise UsageError(f"demo: lr_scale must be above 0, got {self.lr_scale}")
        if set(self.voices) & set(TRAIN_VOICES):
            raise UsageError(f"demo: {sorted(set(self.voices) & set(TRAIN_VOICES))} are training voices, not new ones")


def describe_voices(voices: tuple[str, ...] | list[str]) -> str:
    return f"the voice {voices[0]}" if len(voices) == 1 else f"{len(voices)} voices ({', '.join(voices)})"


def plan_steps(step_s: float, budget_s: float, min_steps: int, max_steps: int) -> int:
    """How many steps fit ``budget_s`` at ``step_s`` a step, within [min_steps, max_steps]. The floor
    wins over the budget: a run too short to move the score would show nothing at all."""
    fit = int(budget_s // step_s) if step_s > 0 else max_steps
    return max(min_steps, min(max_steps, fit))


def replay_per_batch(batch_size: int, fraction: float) -> int:
    """How many clips of a batch are replayed: ``fraction`` of it, rounded, but at least one of each kind
    when replaying at all (a batch with no new-voice clip would not adapt)."""
    if not fraction:
        return 0
    return min(batch_size - 1, max(1, round(batch_size * fraction)))


def mixed_batches(new, replay, batch_size: int, n_replay: int, recipe, seed: int) -> Iterator:
    """Training batches forever, each ``n_replay`` clips from ``replay`` and the rest from ``new``
    (both ShardedDatasets), every pool walked in a fresh random order each pass. Mixing inside each batch,
    not batch by batch, keeps every step's gradient pulling towards both kinds of speech; length bucketing
    would have split them, Brown sentences being longer than Harvard ones."""
    from steermoe_core.data.augment import Augment
    from steermoe_core.data.dataset import Collate

    rng = random.Random(seed)

    def cycle(n: int) -> Iterator[int]:
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from order

    batch_of = Collate(recipe.data.prompt, Augment.from_data(recipe.data, seed))
    new_ix, replay_ix = cycle(len(new)), cycle(len(replay))
    while True:
        examples = [new[next(new_ix)] for _ in range(batch_size - n_replay)] + [replay[next(replay_ix)] for _ in range(n_replay)]
        yield batch_of(examples)[0]


def adapter_fingerprint(model_dir: Path) -> str:
    """The start adapter's identity by content (not path or mtime): a stored result is reused only for
    the very adapter it came from, so a newly shipped model is adapted afresh."""
    return hashlib.sha256((model_dir / "adapter.safetensors").read_bytes()).hexdigest()[:16]


def _claim(cfg: AdaptConfig, start_key: str, log: Log) -> None:
    """A folder holds one demo's data and runs; another size or start adapter starts afresh in it
    (the data is kept when only the adapter or the training changed)."""
    data_keys = ("voices", "train_sentences", "test_sentences", "control_sentences", "replay_sentences")
    stamp = cfg.workdir / "demo.json"
    now = {k: v for k, v in json.loads(json.dumps(asdict(cfg), default=str)).items() if k != "workdir"}
    now["start_key"] = start_key
    if stamp.exists():
        old = json.loads(stamp.read_text())
        # a key the old stamp lacks names data that older demo did not make (it is made now), not other data
        changed = [k for k in data_keys if k in old and old[k] != now[k]]
        if changed:
            diff = ", ".join(f"{k} {old[k]} -> {now[k]}" for k in changed)
            raise UsageError(f"{cfg.workdir}: made by a demo with other data ({diff}); pass another --workdir or delete it")
        if old != now:
            import shutil

            log(f"{cfg.workdir}: another start adapter or training settings; adapting afresh (the data is reused)")
            for stale in ("adapted", "results.json", "before.json"):
                p = cfg.workdir / stale
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, json.dumps(now, indent=2))


def _prep(cfg: AdaptConfig, data: Path, log: Log) -> dict[str, Path]:
    """The sets to score on; the training sets (``train``, and ``replay`` when replaying) are made beside them."""
    from steermoe_core.demo.run import _prep_synth

    _prep_synth(adapt_train_sentences(cfg.train_sentences), data / "train", list(cfg.voices), 0, log)
    if cfg.replay_fraction:
        _prep_synth(adapt_replay_sentences(cfg.replay_sentences), data / "replay", list(TRAIN_VOICES), 0, log)
    _prep_synth(adapt_test_sentences(cfg.test_sentences), data / "test", list(cfg.voices), 0, log)
    sets = {"new voice": data / "test"}
    if cfg.control_sentences:
        _prep_synth(in_domain_sentences(cfg.control_sentences), data / "control", list(TRAIN_VOICES), 0, log)
        sets["training voices"] = data / "control"
    return sets


def _score(model, recipe, sets: dict[str, Path], precision) -> dict:
    """WER on each set, the LLM's loss on the new voice's transcripts, the predictions, and the decode time."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import predict_dataset
    from steermoe_core.evaluation.metrics import word_error_rate
    from steermoe_core.training.loop import validation_loss
    from steermoe_core.training.strategy import SingleDevice

    model.eval()
    wer, preds, t0 = {}, {}, time.perf_counter()
    for label, path in sets.items():
        p = predict_dataset(model, ShardedDataset(path), recipe)  # decoding's own precision policy
        wer[label] = word_error_rate([x["reference"] for x in p], [x["prediction"] for x in p])
        preds[label] = [{"reference": x["reference"], "prediction": x["prediction"]} for x in p]
    decode_s = time.perf_counter() - t0
    loss = validation_loss(model, ShardedDataset(sets["new voice"]), recipe, precision, SingleDevice())
    return {"wer": wer, "loss": loss, "predictions": preds, "decode_s": decode_s}


def _fine_tune(model, recipe, cfg: AdaptConfig, out: Path, precision, deadline: float, after_s: float, log: Log) -> dict:
    """Train from the loaded adapter at a constant lr; the first ``probe_steps`` are timed and size the rest."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.model.checkpoint import model_identity, save_checkpoint
    from steermoe_core.training.loop import Position, micro_batch_stream, train_step
    from steermoe_core.training.optim import make_optimizer
    from steermoe_core.training.strategy import SingleDevice

    torch.manual_seed(cfg.seed)
    model.max_target_tokens = recipe.data.max_target_tokens
    model.ctc_weight = recipe.train.ctc_weight
    model.pad_to_repeated_shapes(recipe.data.pad_multiple_seconds)
    model.ctc_only = recipe.train.ctc_only_steps > 0  # every step or none (``adapt_overrides``)
    opt = make_optimizer(model, recipe.train, model.device)
    n_replay = replay_per_batch(recipe.data.batch_size, cfg.replay_fraction)
    if n_replay:
        stream = mixed_batches(ShardedDataset(recipe.data.train), ShardedDataset(cfg.workdir / "data" / "replay"),
                               recipe.data.batch_size, n_replay, recipe, cfg.seed)
        log(f"each batch of {recipe.data.batch_size}: {recipe.data.batch_size - n_replay} clips in the new voice, "
            f"{n_replay} replayed in the training voices")
    else:
        stream = (b[0] for b in micro_batch_stream(ShardedDataset(recipe.data.train), recipe, Position(), SingleDevice()))
    model.train()
    losses, times, step, bad, steps = [], [], 0, 0, cfg.steps or cfg.max_steps
    while step < steps:
        batch = next(stream)
        t = time.perf_counter()
        stats = train_step(model, opt, [batch], precision, recipe.train.clip_grad)
        if stats["bad"]:  # a NaN/inf loss: the step was skipped on every parameter; too many stop the run
            bad += 1
            if bad >= recipe.train.max_bad_steps:
                from steermoe_core.errors import TrainingError

                raise TrainingError(f"{out}: {bad} adaptation steps had a NaN/inf loss (train.max_bad_steps); nothing saved")
            continue
        losses.append(float(stats["ce"]))
        times.append(time.perf_counter() - t)
        step += 1
        if step == cfg.probe_steps and not cfg.steps:
            step_s = statistics.mean(times[1:] or times)  # the first step builds the kernels for the new shapes
            left = deadline - time.monotonic() - after_s  # what the demo's budget leaves once scoring is done
            budget = min(cfg.train_budget_s, left)
            steps = plan_steps(step_s, budget, cfg.min_steps, cfg.max_steps)
            log(f"measured {step_s:.1f} s a step (batch {recipe.data.batch_size}, {precision.name}) -> {steps} steps, "
                f"about {steps * step_s / 60:.0f} min of training" + (
                    f" (the {cfg.total_budget_s / 60:.0f}-minute budget leaves {max(budget, 0):.0f} s of it; "
                    f"{cfg.min_steps} steps at least)" if budget < cfg.train_budget_s else ""))
        if step % 10 == 0 or step == steps:
            log(f"  step {step}/{steps}: loss {statistics.mean(losses[-10:]):.3f}, {times[-1]:.1f} s a step")
    model.eval()
    save_checkpoint(model, recipe, out, step, {"train_loss_last10": statistics.mean(losses[-10:])},
                    run_info={"precision": precision.name, "engine": "single", "world_size": 1}, identity=model_identity(model))
    return {"steps": step, "step_s": statistics.mean(times[1:] or times), "train_s": sum(times),
            "first_loss": statistics.mean(losses[:5]), "last_loss": statistics.mean(losses[-5:])}


def adapt_overrides(start, cfg: AdaptConfig, train: Path) -> list[str]:
    """The start adapter's recipe as the adaptation changes it: its data, batch and seed, its own learning
    rates times ``lr_scale``, and which loss trains. An adapter whose LLM reads the CTC read-out as text
    (``model.projector.argmax_embeddings``) gets no gradient through the LLM, so it adapts on the CTC
    loss alone, every step CTC-only, and its reader (the LLM's LoRA, if any) stays as it is; any other
    adapter trains on the LLM's loss (plus CTC where its recipe has it), as it was trained last."""
    ctc_only = max(cfg.steps, cfg.max_steps) if start.model.projector.argmax_embeddings else 0
    overrides = [f"data.train={train}", "data.valid=", f"data.batch_size={cfg.batch_size}", "data.num_workers=0",
                 f"train.seed={cfg.seed}", f"train.ctc_only_steps={ctc_only}"]
    for k in ("lr", "lr_steering", "lr_router", "lr_scales", "lr_projector", "lr_lora"):
        base = getattr(start.train, k)
        if base:
            overrides.append(f"train.{k}={base * cfg.lr_scale:g}")
    if cfg.max_new_tokens:
        overrides.append(f"eval.max_new_tokens={cfg.max_new_tokens}")
    return overrides


def _whisper(encoder_path: str, sets: dict[str, Path]) -> dict:
    from steermoe_core.demo.run import _whisper_wer

    return {label: _whisper_wer(encoder_path, path) for label, path in sets.items()}


def run_adapt(cfg: AdaptConfig, log: Log = print) -> dict:
    """Synthesise, score the start adapter, fine-tune it, score it again. Returns (and stores in
    ``results.json``) the before/after table and how the run was sized."""
    from steermoe_core.model.checkpoint import load_checkpoint, read_checkpoint
    from steermoe_core.runtime import resolve_precision
    from steermoe_core.training.init_from import lineage

    began = time.monotonic()
    deadline = began + cfg.total_budget_s
    if not (cfg.start / "adapter.safetensors").is_file():
        raise UsageError(f"{cfg.start}: no adapter to start from (`make demo-full` trains and ships one)")
    start_key = adapter_fingerprint(cfg.start)
    _claim(cfg, start_key, log)
    stored = cfg.workdir / "results.json"
    if stored.exists():
        log(f"reusing {stored}: the same start adapter and settings were adapted and scored")
        return json.loads(stored.read_text())
    data = cfg.workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    sets = _prep(cfg, data, log)

    overrides = adapt_overrides(read_checkpoint(cfg.start)[0], cfg, data / "train")
    model, recipe, meta = load_checkpoint(cfg.start, overrides=overrides)
    precision = resolve_precision(recipe.train.precision, model.device)
    # the steps of every run it grew from, then its own (the shipped model: base run, CTC stage, reader)
    grown = [x["step"] for x in lineage(recipe, meta)]
    log(f"start: {cfg.start} ({' + '.join(f'{n:,}' for n in grown)} steps); training precision {precision}")

    before_file = cfg.workdir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        log("scoring the start adapter")
        before = _score(model, recipe, sets, precision)
        write_text(before_file, json.dumps(before, indent=2))
    log("before: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in before["wer"].items()) + f", loss {before['loss']:.3f} "
        f"({before['decode_s']:.0f} s to decode)")

    out = cfg.workdir / "adapted"
    if (out / "meta.json").exists():
        log(f"reusing {out}")
        model = load_checkpoint(out, model=model, overrides=overrides)[0]
        trained = json.loads((cfg.workdir / "trained.json").read_text())
    else:
        log(f"adapting to {describe_voices(cfg.voices)} it never heard on {cfg.train_sentences} Harvard sentences"
            + (f", replaying {cfg.replay_sentences} of its training sentences in its training voices" if cfg.replay_fraction else ""))
        trained = _fine_tune(model, recipe, cfg, out, precision, deadline, before["decode_s"] * 1.2, log)
        write_text(cfg.workdir / "trained.json", json.dumps(trained, indent=2))
    log("scoring the adapted adapter")
    after = _score(model, recipe, sets, precision)
    log("after: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in after["wer"].items()) + f", loss {after['loss']:.3f}")
    result = {
        "start": str(cfg.start), "start_step": meta.get("step"), "start_key": start_key,
        "start_lineage": grown,
        "voices": list(cfg.voices), "train_sentences": cfg.train_sentences, "batch_size": cfg.batch_size,
        "replay_per_batch": replay_per_batch(cfg.batch_size, cfg.replay_fraction), "replay_sentences": cfg.replay_sentences,
        "precision": str(precision), "trained": trained,
        "wer": {"start adapter": before["wer"], "adapted": after["wer"]},
        "loss": {"start adapter": before["loss"], "adapted": after["loss"]},
        "examples": [{"reference": b["reference"], "before": b["prediction"], "after": a["prediction"]}
                     for b, a in zip(before["predictions"]["new voice"], after["predictions"]["new voice"])],
        "checkpoint": str(out),
        "sets": {k: str(v) for k, v in sets.items()},
    }
    if cfg.whisper:
        result["wer"]["whisper tiny.en decoder"] = _whisper(recipe.model.encoder.path, sets)
    result["seconds"] = time.monotonic() - began
    write_text(stored, json.dumps(result, indent=2))
    return result
