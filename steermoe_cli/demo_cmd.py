"""`steermoe demo`: the offline demo. By default the shipped model adapted to a voice it never heard,
scored before and after (`make demo`); `--full` trains the shipped model from scratch, in stages (`make demo-full`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, friendly, stdout


@friendly
def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Work folder (default $STEERMOE_CACHE/demo-adapt, or demo-full with --full)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: as many as fit the time budget at the measured step time; --full: 3000)")] = None,
    minutes: Annotated[float, typer.Option(help="Training's share of the time, in minutes (not with --full)")] = 7.0,
    start: Annotated[Optional[Path], typer.Option(help="Adapter to adapt (default: the shipped one, steermoe_core/demo/pretrained)")] = None,
    sentences: Annotated[Optional[int], typer.Option(help="--full: synthesised training sentences (default 12000)")] = None,
    workers: Annotated[int, typer.Option(help="--full: prep worker processes (0 = all cores)")] = 0,
    full: Annotated[bool, typer.Option(help="Train the shipped model from scratch, in stages (hours on a CPU): the base run, a large synthetic set, a CTC stage and a text-trained reader (`make demo-full`)")] = False,
    until: Annotated[str, typer.Option(help="With --full: the last stage to run: base (the from-scratch run), corpus (the large synthetic set's shards for every round of the CTC stage), ctc (the CTC stage, round by round) or reader (the text-trained reader)")] = "reader",
    corpus_text: Annotated[Optional[Path], typer.Option(help="With --full: the Brown sentences of the large set and the reader (tools/brown_sentences.py; default $STEERMOE_CACHE/brown_train.txt)")] = None,
    base: Annotated[Optional[Path], typer.Option(help="With --full: start the later stages from this base run's adapter instead of training one (e.g. checkpoints/base in the repository, which is one; --ship checks its lineage)")] = None,
    linear: Annotated[bool, typer.Option(help="With --full --until base: also train a linear-only adapter on the same data, schedule and seed, and score both")] = False,
    ship: Annotated[bool, typer.Option(help="With --full: copy the reader stage's finished model into steermoe_core/demo/pretrained, where `infer`, `serve` and `make demo` take it from, once its recipe, step and lineage are checked (maintainers)")] = False,
):
    """The offline demo. By default (`make demo`, about 15 minutes on 2 CPU cores): the shipped model is
    fine-tuned on a voice it never heard and scored before and after on sentences it never trained on.
    --full trains the shipped model from scratch in stages (the base run; a large synthetic set; a CTC
    stage; a text-trained reader, the model that ships) and scores them on held-out and out-of-domain
    speech against Whisper's own decoder; --until base stops after the base run (with --linear beside a
    linear-only adapter)."""
    import time

    from steermoe_core.errors import UsageError

    t0 = time.perf_counter()
    log = lambda s: console.print(f"[dim]{time.perf_counter() - t0:6.0f}s[/] {s}", highlight=False)  # noqa: E731
    if ship and (not full or until != "reader" or steps is not None or sentences is not None or linear):
        raise UsageError("--ship copies the reader stage, the model that ships, as the stages make it: --full without --until, "
                         "--steps, --sentences or --linear")
    if not full and (linear or sentences is not None or corpus_text is not None or until != "reader" or base is not None):
        raise UsageError("--linear, --sentences, --corpus-text, --until and --base belong to --full (the from-scratch run); `steermoe demo` adapts the shipped model")
    if full and until != "base" and (linear or sentences is not None or steps is not None):
        raise UsageError("--steps, --sentences and --linear size the base run alone: add --until base")
    if base is not None and (until == "base" or linear or sentences is not None or steps is not None):
        raise UsageError("--base replaces the base run: it goes with the later stages, not with --until base, --steps, --sentences or --linear")
    if full and start is not None:
        raise UsageError("--start names the adapter the short demo adapts; --full trains from scratch")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: expected at least 1")
    if not minutes > 0:
        raise UsageError(f"--minutes {minutes}: expected more than 0")
    if full:
        _full(workdir, steps, sentences, workers, linear, until, corpus_text, base, ship, log)
    else:
        _adapt(workdir, steps, minutes, start, log)
    stdout.print(f"demo: {time.perf_counter() - t0:.0f} s in total")


def _adapt(workdir: Optional[Path], steps: Optional[int], minutes: float, start: Optional[Path], log) -> None:
    from steermoe_core.paths import cache_root
    from steermoe_core.demo.adapt import AdaptConfig, describe_voices, run_adapt

    cfg = AdaptConfig(workdir or cache_root() / "demo-adapt", steps=steps or 0, train_budget_s=60 * minutes)
    if start is not None:
        cfg.start = start
    log(f"work folder {cfg.workdir}")
    res = run_adapt(cfg, log=log)
    tr = res["trained"]
    which = "the shipped model" if start is None else f"the adapter in {start}"
    grown = " + ".join(f"{n:,}" for n in res.get("start_lineage") or [res["start_step"]])  # base run + CTC stage + reader
    t = Table(title=f"A few minutes of adaptation: {which} ({grown} steps) fine-tuned for {tr['steps']} steps "
                    f"of batch {res['batch_size']} on {describe_voices(res['voices'])} it never heard")
    t.add_column("")
    for col in ("reference", "before", "after"):
        t.add_column(col)
    for n, e in enumerate(res["examples"][:4]):
        t.add_row(str(n + 1), e["reference"], e["before"], e["after"])
    stdout.print(t)
    t = Table(title="WER, normalised (lower is better), on sentences the adaptation never saw")
    sets = list(res["wer"]["start adapter"])
    t.add_column("model")
    for s in sets:
        t.add_column(s, justify="right")
    t.add_column("LLM loss, new voice", justify="right")
    for name, row in res["wer"].items():
        label = {"start adapter": f"before: {which} ({grown} steps)",
                 "adapted": f"after: adapted ({tr['steps']} steps, {tr['train_s'] / 60:.1f} min)"}.get(name, name)
        loss = res["loss"].get(name)
        t.add_row(label, *[f"{100 * row[s]:.1f}%" for s in sets], "" if loss is None else f"{loss:.3f}")
    stdout.print(t)
    stdout.print(f"new voice: {', '.join(res['voices'])} speaking Harvard sentences the adaptation never saw; "
                 "training voices: held-out Brown sentences in the demo's base run's voices")
    stdout.print(f"precision {res['precision']}; adapted adapter: {res['checkpoint']} (`steermoe infer --model` takes it)", soft_wrap=True)


def _full(workdir: Optional[Path], steps: Optional[int], sentences: Optional[int], workers: int, linear: bool, until: str,
          corpus_text: Optional[Path], base: Optional[Path], ship: bool, log) -> None:
    from steermoe_core.config import load_recipe
    from steermoe_core.demo.run import RECIPE, check_full_run, full_config
    from steermoe_core.demo.stages import run_stages, score_model, ship_staged
    from steermoe_core.paths import cache_root

    root = workdir or cache_root() / "demo-full"
    recipe = load_recipe(RECIPE)
    cfg = full_config(root, workers)  # the base run in the folder itself, as before the later stages existed
    cfg.train_linear = linear
    if steps is not None:
        cfg.steps = steps
        if cfg.decay_steps > steps:  # a shorter run decays to its own last step (`--steps 200 --linear`: the short comparison)
            cfg.decay_steps = 0
    if sentences is not None:
        cfg.train_sentences = sentences
    if base is not None and ship:  # before the hours of the later stages, not after them
        check_full_run(base)
    if base is None:
        log(f"base run: {cfg.steps} steps of batch {cfg.batch_size or recipe.data.batch_size}, {cfg.train_sentences} training "
            f"sentences, {cfg.valid_sentences} + {cfg.ood_sentences} held-out clips; work folder {root}")
    done = run_stages(root, corpus_text or cache_root() / "brown_train.txt", workers, log, until, base_config=cfg, base=base)
    stored = cfg.workdir / "results.json"
    if stored.is_file():  # the base run's own table, and the final model's on the same sets
        _tables(json.loads(stored.read_text()), score_model(done["reader"], cfg.workdir / "data", "CTC stage + reader") if "reader" in done else {})
    stdout.print("; ".join(f"{k}: {v}" for k, v in done.items()), soft_wrap=True)
    if ship:
        stdout.print(f"shipped: {done['reader']} -> {ship_staged(done['reader'], done['ctc'], log=log)}", soft_wrap=True)


def _tables(res: dict, final: dict) -> None:
    t = Table(title="steermoe infer on real speech (pytest-audioeval) and a synthesised clip: the base run")
    for col in ("file", "reference", "steermoe"):
        t.add_column(col)
    for r in res["transcripts"]:
        t.add_row(r["file"], r["reference"], r["steermoe"])
    stdout.print(t)
    table = {**res["wer"], **final}
    t = Table(title=f"WER, normalised (lower is better); the base run from scratch: {res['steps']} steps on {res['train_utterances']} sentences")
    sets = list(next(iter(table.values())))
    t.add_column("model")
    for s in sets:
        t.add_column(s, justify="right")
    for name, row in table.items():
        t.add_row(name, *[f"{100 * row[s]:.1f}%" for s in sets])
    stdout.print(t)
    stdout.print("in-domain: held-out Brown-corpus sentences, the base run's voices; out-of-domain: Harvard sentences, "
                 f"voices never trained on; real clips: pytest-audioeval's English recordings. precision {res['precision']}")
