"""The from-scratch demo (`steermoe demo --full`): prep -> train -> eval -> infer with real pretrained backbones, offline.

Every stage leaves its result in the work folder and is skipped when that result exists, so a
second run reuses the data and checkpoints (and re-prints the table).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from steermoe_core.atomic import write_text
from steermoe_core.config import MACHINE_FIELDS, load_recipe
from steermoe_core.demo.text import (
    HELDOUT_VOICES,
    TRAIN_VOICES,
    in_domain_sentences,
    out_of_domain_sentences,
    train_sentences,
)
from steermoe_core.errors import UsageError
from steermoe_core.inference.api import SHIPPED_MODEL
# what ships: adapter, meta.json, recipe and, where the run's last checkpoint kept its optimizer state,
# Adam's moments by weight name, so `steermoe train --init-from` continues it (training.init_from)
from steermoe_core.training.init_from import MOMENTS_FILE as SHIPPED_MOMENTS
from steermoe_core.training.init_from import PORTABLE_FILES as SHIPPED_FILES

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_tiny.toml"  # shipped in the package
REAL_CLIPS = "pkg:pytest_audioeval/samples/audio/en"
PRETRAINED = SHIPPED_MODEL  # demo/pretrained: the model `make demo-full` trains (demo.stages), shipped
FULL_STEPS, FULL_CTC_ONLY_STEPS, FULL_EVAL_EVERY = 3000, 700, 250
# the cosine reaches its floor (30% of the peak lr) at step 2,000 and stays there: the run first shipped
# stopped at 2,000, and its out-of-domain WER was still falling at the floor lr (63.5% at 2,000, 57.5% at
# 2,250), so the longer run is that run continued step for step, not a new one
FULL_DECAY_STEPS = 2000
# a checkpoint every 50 steps: on a 2-core CPU a joint step takes about 19 s, so a killed run (or a
# session that ends) loses at most about 16 minutes; `make demo-full` again resumes from it
FULL_SAVE_EVERY = 50
# on a GPU a step takes milliseconds and one process decoding and augmenting 16 clips (about 80 ms) would
# be the bottleneck; on a CPU they cost nothing beside a 19-second step. Never more than the cores this
# process may use (torch warns, and on 2 cores 4 workers only compete). The count changes speed, not what
# trains: each example's augmentation is drawn from (seed, epoch, example id), whichever worker loads it.
FULL_LOADER_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
SETS = {"in-domain": "valid_in", "out-of-domain": "ood", "real clips": "real"}


@dataclass
class DemoConfig:
    """A from-scratch run: `make demo-full` (``full_config``), or any size of it (`steermoe demo --full --steps N`);
    CI uses a much smaller one. `make demo` itself adapts the shipped model instead (``demo.adapt``)."""

    workdir: Path
    train_sentences: int = 3000
    valid_sentences: int = 60  # in-domain: held-out Brown sentences, training voices
    ood_sentences: int = 60  # out-of-domain: Harvard sentences, held-out voices
    steps: int = 200
    decay_steps: int = 0  # the lr reaches its floor here and stays; 0 = at the last step
    recipe: Path = RECIPE
    voices: tuple[str, ...] = TRAIN_VOICES
    heldout_voices: tuple[str, ...] = HELDOUT_VOICES
    workers: int = 0
    ctc_only_steps: int = 150  # first stage: CTC alone, no LLM pass (several times faster a step); at most steps // 2
    batch_size: int = 0  # 0 = the recipe's (16); the CI-size test uses a smaller one
    pretrained: Path | None = PRETRAINED  # scored beside the short run when present
    train_linear: bool = True
    eval_every: int = 0  # > 0: score the out-of-domain set every so many steps (the learning curve) and checkpoint
    save_every: int = 0  # checkpoint every so many steps; 0 = at each evaluation (eval_every)
    loader_workers: int = 0  # DataLoader processes; 0 = the recipe's (none: on 2 CPU cores they only compete)


def full_config(workdir: Path, workers: int = 0) -> DemoConfig:
    """The base run of `make demo-full`, which the shipped model's later stages grow from (SteerMoE; with
    ``train_linear`` a linear-only adapter beside it on the same data, schedule and seed)."""
    return DemoConfig(workdir, train_sentences=12000, steps=FULL_STEPS, decay_steps=FULL_DECAY_STEPS,
                      ctc_only_steps=FULL_CTC_ONLY_STEPS, workers=workers, pretrained=None, train_linear=False,
                      eval_every=FULL_EVAL_EVERY, save_every=FULL_SAVE_EVERY, loader_workers=FULL_LOADER_WORKERS)


Log = Callable[[str], None]


def check_full_run(model_dir: Path) -> dict:
    """Raise unless ``model_dir`` holds the adapter `steermoe demo --full` trains: its recipe (data folders
    aside, they are the trainer's machine's, and its DataLoader worker count, which changes only speed)
    trained to the last step. Returns its meta.json. The shipped model grows from such an adapter only
    (``demo.stages``), so its figures are reproducible with one documented command."""
    from dataclasses import asdict

    from steermoe_core.errors import CheckpointError
    from steermoe_core.model.checkpoint import read_checkpoint

    recipe, meta, _ = read_checkpoint(model_dir)
    want = demo_recipe(full_config(model_dir), "layer_wise", Path(recipe.data.train).parent)
    for section in ("model", "data", "train", "eval"):
        have, need = asdict(getattr(recipe, section)), asdict(getattr(want, section))
        diff = [f"{section}.{k} {have.get(k)!r} (want {need[k]!r})" for k in need
                if have.get(k) != need[k] and (section, k) not in MACHINE_FIELDS]
        if diff:
            raise CheckpointError(f"{model_dir}: not the adapter `steermoe demo --full` trains: " + ", ".join(diff))
    if meta.get("step") != FULL_STEPS:
        raise CheckpointError(f"{model_dir}: stopped at step {meta.get('step')}, not the full run's {FULL_STEPS}")
    return meta


def _prep_synth(texts: list[str], out: Path, voices: list[str], workers: int, log: Log) -> None:
    from steermoe_core.data.prep.pipeline import run_prep
    from steermoe_core.data.prep.synth import DEFAULT_SPEEDS, synth_items

    if (out / "manifest.json").exists():
        log(f"reusing {out}")
        return
    txt = out.with_suffix(".txt")
    write_text(txt, "\n".join(texts) + "\n")
    items, skipped = synth_items(txt, voices, DEFAULT_SPEEDS, copies=1, prefix=out.name)
    m = run_prep(items, out, f"synth:{txt.name}", out.name, skipped, workers=workers, shard_size=500).manifest
    log(f"synthesised {m['examples']} utterances ({m['hours'] * 60:.1f} min of speech) into {out}")


def _prep_real(out: Path, log: Log) -> None:
    from steermoe_core.backbones.weights import resolve_path
    from steermoe_core.data.prep.pipeline import run_prep
    from steermoe_core.data.prep.sources import folder

    if (out / "manifest.json").exists():
        return
    items, skipped = folder(Path(resolve_path(REAL_CLIPS)))
    run_prep(items, out, "pytest-audioeval:en", "test", skipped, workers=1)
    log(f"real English clips: {len(items)} from pytest-audioeval")


def demo_recipe(cfg: DemoConfig, placement: str, data: Path):
    """The recipe a demo run trains with: `recipes/demo_tiny.toml` plus the run's size and data (the
    CTC-only stage is at most half of the steps). Public: an adapter shipped in ``demo/pretrained`` must
    carry exactly the recipe `demo --full` builds."""
    return load_recipe(cfg.recipe, [
        f"data.train={data / 'train'}", "data.valid=", f"train.max_steps={cfg.steps}", f"train.decay_steps={cfg.decay_steps}",
        f"train.ctc_only_steps={min(cfg.ctc_only_steps, cfg.steps // 2)}",
        *([f"data.batch_size={cfg.batch_size}"] if cfg.batch_size else []),
        *([f"data.num_workers={cfg.loader_workers}"] if cfg.loader_workers else []),
        f"model.steering.placement={placement}",
        # the curve: out-of-domain WER every eval_every steps, in the run's metrics.jsonl
        *([f"data.valid={data / 'ood'}", f"train.eval_every={cfg.eval_every}", f"train.save_every={cfg.save_every or cfg.eval_every}"]
          if cfg.eval_every else ["train.eval_every=0"]),
    ])


def _train(cfg: DemoConfig, name: str, placement: str, data: Path, log: Log) -> Path:
    from steermoe_core.training.loop import Callbacks, train

    run = cfg.workdir / name
    if finished(run / "model", cfg.steps):
        log(f"reusing {run / 'model'}")
        return run / "model"
    recipe = demo_recipe(cfg, placement, data)
    log(f"training {name} ({placement}) for {cfg.steps} steps")
    cb = Callbacks(on_step=lambda r: log(f"  {name} step {r['step']}: loss {r['loss']:.3f}, {r['samples_per_s']:.1f} samples/s"))
    resume = (run / "checkpoints" / "latest").exists()
    return train(recipe, run, resume=resume, callbacks=cb).model_dir


def _wer_of(model, ds_dir: Path, recipe, read: str = "llm") -> float:
    """WER of ``model`` on a prepared set: the LLM's transcripts, or (``read="ctc"``) its CTC read-out."""
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.evaluate import predict_dataset
    from steermoe_core.evaluation.metrics import word_error_rate

    preds = predict_dataset(model, ShardedDataset(ds_dir), recipe, read=read)
    return word_error_rate([p["reference"] for p in preds], [p["prediction"] for p in preds])


def finished(model_dir: Path, steps: int) -> bool:
    """Whether ``model_dir`` holds a run's final model at ``steps`` (a stage that is done is reused)."""
    meta = model_dir / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("step") == steps


def _whisper_wer(encoder_path: str, ds_dir: Path) -> float:
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.evaluation.metrics import word_error_rate
    from steermoe_core.evaluation.whisper_decoder import WhisperDecoderBaseline

    whisper = WhisperDecoderBaseline(encoder_path)
    ds = ShardedDataset(ds_dir)
    exs = [ds[i] for i in range(len(ds))]
    hyps = [h for k in range(0, len(exs), 16) for h in whisper.transcribe([e.audio for e in exs[k : k + 16]])]
    return word_error_rate([e.text for e in exs], hyps)


def _infer_clips(model, precision, workdir: Path, max_new_tokens: int, log: Log) -> list[dict]:
    """What `steermoe infer` prints for the real clips and for a freshly synthesised one."""
    import soundfile as sf

    from steermoe_core.backbones.weights import resolve_path
    from steermoe_core.data.prep.synth import synthesize
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.inference import SteerMoE

    clip = workdir / "synth_clip.wav"
    if not clip.exists():
        sf.write(clip, synthesize("Good morning everyone, the meeting starts at ten.", "flite", "slt", 1.0), 16000)
    real = sorted(Path(resolve_path(REAL_CLIPS)).glob("*.wav"))
    results = SteerMoE(TorchBackend(model, precision)).transcribe([str(p) for p in real + [clip]], max_new_tokens=max_new_tokens)
    refs = {p.name: p.with_suffix(".txt").read_text().strip() for p in real}
    refs[clip.name] = "Good morning everyone, the meeting starts at ten."
    out = [{"file": Path(r.path).name, "reference": refs[Path(r.path).name], "steermoe": r.text, "rtf": r.rtf} for r in results]
    for o in out:
        log(f"  infer {o['file']}: {o['steermoe']!r}")
    return out


def _claim_workdir(cfg: DemoConfig, log: Log = print) -> None:
    """Every stage reuses what the folder holds, so a folder made at one size must not serve another.

    One change is allowed: the same run made longer with a schedule that matches the shorter one's up to
    its last step (``decay_steps`` = the old length, the lr flat after it). The training then resumes from
    its last checkpoint and ends where one run of the longer recipe would (how `make demo-full` grew)."""
    size = {k: getattr(cfg, k) for k in ("train_sentences", "valid_sentences", "ood_sentences", "steps", "decay_steps",
                                          "ctc_only_steps", "batch_size", "voices", "heldout_voices")}
    size = json.loads(json.dumps(size))  # tuples as lists, as they read back
    stamp = cfg.workdir / "size.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        old.setdefault("decay_steps", 0)  # folders stamped before decay_steps existed
        if old == size:
            return
        changed = {k for k, v in size.items() if old.get(k) != v}
        if not (changed <= {"steps", "decay_steps"} and size["steps"] > old["steps"]
                and size["decay_steps"] == (old["decay_steps"] or old["steps"])):
            diff = ", ".join(f"{k} {old.get(k)} -> {size[k]}" for k in sorted(changed, key=list(size).index))
            raise UsageError(f"{cfg.workdir}: made by a demo of another size ({diff}); pass another --workdir or delete it")
        log(f"{cfg.workdir}: the run grows from {old['steps']} to {size['steps']} steps; the lr schedule is the same "
            f"up to step {size['decay_steps']}, so it resumes from its last checkpoint")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, json.dumps(size, indent=2))


def run_demo(cfg: DemoConfig, log: Log = print) -> dict:
    from steermoe_core.backbones.weights import file_key
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.model.checkpoint import load_checkpoint, read_checkpoint
    from steermoe_core.model.steermoe import SteerMoEModel
    from steermoe_core.runtime import resolve_precision
    from steermoe_core.training.loop import validation_loss
    from steermoe_core.training.strategy import SingleDevice

    _claim_workdir(cfg, log)
    data = cfg.workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    _prep_synth(train_sentences(cfg.train_sentences), data / "train", list(cfg.voices), cfg.workers, log)
    _prep_synth(in_domain_sentences(cfg.valid_sentences), data / "valid_in", list(cfg.voices), cfg.workers, log)
    _prep_synth(out_of_domain_sentences(cfg.ood_sentences), data / "ood", list(cfg.heldout_voices), cfg.workers, log)
    _prep_real(data / "real", log)

    steer_ckpt = _train(cfg, "steermoe", "layer_wise", data, log)
    linear_ckpt = _train(cfg, "linear", "none", data, log) if cfg.train_linear else None
    pretrained = cfg.pretrained if cfg.pretrained is not None and (cfg.pretrained / "adapter.safetensors").exists() else None
    # which adapters a stored table scored: each adapter.safetensors' path, size and modification time
    scored = [None if f is None else file_key(f / "adapter.safetensors") for f in (steer_ckpt, linear_ckpt, pretrained)]
    previous = cfg.workdir / "results.json"
    stored = json.loads(previous.read_text()) if previous.exists() else {}
    if stored.get("scored") == scored:
        log(f"reusing {previous}: the same checkpoints were scored")  # scoring is minutes; the table is not
        return stored
    steer, recipe, _ = load_checkpoint(steer_ckpt)  # on the recipe's device: a GPU where `auto` finds one
    precision = resolve_precision(recipe.train.precision, steer.device)
    log(f"precision: {precision}")

    def sibling(model_cfg) -> SteerMoEModel:
        """A fresh adapter on the already-loaded frozen backbones: no second load of either."""
        torch.manual_seed(recipe.train.seed)  # the same init build_model gives at step 0
        return SteerMoEModel(steer.encoder, steer.llm, steer.tokenizer, model_cfg)

    models = {"untrained adapter": sibling(recipe.model).eval()}
    if linear_ckpt is not None:
        models["linear-only adapter"] = load_checkpoint(linear_ckpt, model=sibling(read_checkpoint(linear_ckpt)[0].model))[0]
    models["steermoe"] = steer
    if pretrained is not None:
        pre_recipe, pre_meta, _ = read_checkpoint(pretrained)
        name = f"steermoe, shipped ({pre_meta['step']} steps)"
        models[name] = load_checkpoint(pretrained, model=sibling(pre_recipe.model))[0]
    sets = {label: data / folder for label, folder in SETS.items()}
    table, losses = {}, {}
    for name, m in models.items():
        table[name] = {label: _wer_of(m, path, recipe) for label, path in sets.items()}
        losses[name] = validation_loss(m.eval(), ShardedDataset(sets["in-domain"]), recipe, precision, SingleDevice())
        log(f"scored {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in table[name].items()))
    table["whisper tiny.en decoder"] = {label: _whisper_wer(recipe.model.encoder.path, path) for label, path in sets.items()}
    best = models[list(models)[-1]]
    inferred = _infer_clips(best, resolve_precision(recipe.train.precision, best.device, "decode"), cfg.workdir, recipe.eval.max_new_tokens, log)  # the recipe's decode limit, as scoring
    result = {
        "steps": cfg.steps, "train_utterances": cfg.train_sentences, "precision": str(precision),
        "wer": table,
        "in_domain_loss": losses,  # target-token cross-entropy: a learning signal even before WER moves
        "sets": {label: str(path) for label, path in sets.items()},
        "transcripts": inferred,
        "checkpoint": str(steer_ckpt),
        "parameters": steer.parameter_counts(),
        "scored": scored,
    }
    write_text(previous, json.dumps(result, indent=2))
    return result
