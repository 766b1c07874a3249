"""`steermoe ablate`: the paper's comparisons in one command, resumable.

Every variant is the user's recipe plus a few overrides (``VARIANTS``), trained for the same
number of steps from the same seed on the same data (the batch order is a function of the seed),
then decoded on the same evaluation set. Each variant lives in its own folder:

    OUT/<variant>/run/            the training run (checkpoints, metrics.jsonl, model/)
    OUT/<variant>/train_seconds   wall time spent training so far (kept across kills)
    OUT/<variant>/result.json     written last: its presence means "finished, skip" (a result whose
                                  recipe hash differs from the variant's recipe now is an error)
    OUT/ablation.md, .json        the table over all finished variants, rewritten after each

A killed variant resumes from its latest checkpoint (one at least every quarter of the steps); a
finished one is never retrained: when the recipe or ``--set`` changed since, reusing it would mix
recipes in one table, so that is a UsageError (use another --out, or delete the variant's folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from steermoe_core.atomic import write_text
from steermoe_core.config import (
    LoRAConfig,
    Recipe,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from steermoe_core.data.dataset import ShardedDataset
from steermoe_core.errors import UsageError
from steermoe_core.evaluation.evaluate import evaluate
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.runtime import resolve_precision
from steermoe_core.training.loop import (
    Callbacks,
    latest_checkpoint,
    train,
    validation_loss,
)
from steermoe_core.training.strategy import SingleDevice

DEFAULT_VARIANTS = "linear,post_encoder,layer_wise,per_layer_router,experts=4,experts=16,encoder_lora"
STEERMOE = ["model.steering.placement=layer_wise", "model.steering.router=shared"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "linear": ("linear adapter only (no steering)", ["model.steering.placement=none"]),
    "post_encoder": ("one steering MoE after the last encoder layer", ["model.steering.placement=post_encoder", "model.steering.router=shared"]),
    "layer_wise": ("SteerMoE: steering after every layer, one shared router", STEERMOE),
    "per_layer_router": ("SteerMoE with a separate router per layer", ["model.steering.placement=layer_wise", "model.steering.router=per_layer"]),
    "encoder_lora": ("LoRA on the encoder + linear adapter (the paper's baseline)", ["model.steering.placement=none"]),
    "llm_lora": ("SteerMoE + LoRA on the LLM", STEERMOE),
    "vocab_posterior": ("SteerMoE, the LLM reading mixtures of its own embeddings (model.projector.vocab_posterior)",
                        [*STEERMOE, "model.projector.vocab_posterior=true"]),
}
# name=value variants: SteerMoE with one steering field changed
PARAMETRIC: dict[str, tuple[str, type]] = {
    "experts": ("model.steering.num_experts", int),
    "top_k": ("model.steering.top_k", int),
    "temperature": ("model.steering.temperature", float),
    "load_balance": ("model.steering.load_balance_weight", float),
}


@dataclass
class Variant:
    name: str  # as the user wrote it: "layer_wise", "experts=4"
    description: str
    overrides: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        """A folder name: "experts=4" -> "experts-4"."""
        return self.name.replace("=", "-")


def _lora_override(part: str, base: Recipe) -> str:
    """Switch LoRA on for ``part``, keeping the recipe's own LoRA settings when it has some."""
    lora = getattr(base.model, part).lora or LoRAConfig()
    return f"model.{part}.lora.rank={lora.rank}"


def parse_variants(spec: str, base: Recipe) -> list[Variant]:
    """``"linear,experts=4,..."`` -> variants; unknown names are a UsageError listing the known ones."""
    out: list[Variant] = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        key, _, value = name.partition("=")
        if not value and key in VARIANTS:
            desc, sets = VARIANTS[key]
            sets = list(sets)
            if key in ("encoder_lora", "llm_lora"):
                sets.append(_lora_override(key.split("_")[0], base))
            out.append(Variant(name, desc, sets))
        elif value and key in PARAMETRIC:
            field_key, kind = PARAMETRIC[key]
            try:
                kind(value)
            except ValueError:
                raise UsageError(f"--variants {name}: {value!r} is not a{'n integer' if kind is int else ' number'}") from None
            out.append(Variant(name, f"SteerMoE with {field_key.rsplit('.', 1)[-1]} = {value}", [*STEERMOE, f"{field_key}={value}"]))
        else:
            known = ", ".join([*VARIANTS, *(f"{k}=N" for k in PARAMETRIC)])
            raise UsageError(f"--variants: unknown variant {name!r} (known: {known})")
    names = [v.name for v in out]
    if not out or len(set(names)) != len(names):
        raise UsageError(f"--variants: expected distinct variant names, got {spec!r}")
    if not all(re.fullmatch(r"[A-Za-z0-9_.=-]+", v.name) for v in out):
        raise UsageError(f"--variants: names may hold letters, digits, '_', '.', '=' and '-' only ({spec!r})")
    return out


def variant_recipe(base: Recipe, variant: Variant, steps: int) -> Recipe:
    """The base recipe + the variant's overrides, ``steps`` long, without in-loop validation (every
    variant is decoded once at the end on the ablation's own set), checkpointed for resuming.

    LoRA is part of what a variant compares: a ``[model.*.lora]`` section of the base recipe applies
    only to the variants that ask for LoRA there (encoder_lora, llm_lora), never to the others (and
    ``train.lr_lora`` goes with it when no LoRA is left)."""
    from steermoe_core.errors import RecipeError

    d = recipe_to_dict(base)
    asked = {part for part in ("encoder", "llm") if any(o.startswith(f"model.{part}.lora.") for o in variant.overrides)}
    for part in {"encoder", "llm"} - asked:
        d["model"][part]["lora"] = None
    if not asked:
        d["train"]["lr_lora"] = 0.0
    try:
        r = recipe_from_dict(d, [*variant.overrides, f"train.max_steps={steps}"])
    except RecipeError as e:
        raise UsageError(f"variant {variant.name}: {e}") from None
    r.data.valid = ""
    r.train.eval_every = 0
    # at least one checkpoint before the end (every quarter of the run), so that a kill loses little
    r.train.save_every = min(r.train.save_every or steps, max(1, steps // 4))
    return r


def recipe_hash(recipe: Recipe) -> str:
    """What a finished variant was trained with (its full resolved recipe), to tell when it is stale."""
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _samples_per_s(metrics_path: Path) -> float:
    """Training throughput over the whole run: total samples over total time, from the log windows
    (each line covers the steps since the previous one, at a fixed batch size)."""
    prev, steps, seconds = 0, 0.0, 0.0
    for line in metrics_path.read_text().splitlines() if metrics_path.exists() else []:
        rec = json.loads(line)
        if rec.get("samples_per_s"):
            n = rec["step"] - prev
            steps, seconds, prev = steps + n, seconds + n / rec["samples_per_s"], rec["step"]
    return steps / seconds if seconds else 0.0


def _train_variant(recipe: Recipe, vdir: Path, callbacks: Callbacks) -> int:
    """Train (or finish training) one variant; returns the step it resumed from (0 = fresh)."""
    run = vdir / "run"
    if (run / "model").exists():
        return recipe.train.max_steps
    start = latest_checkpoint(run)
    if start is None:
        shutil.rmtree(run, ignore_errors=True)  # killed before its first checkpoint: start clean
    resumed = int(_read_json(start / "meta.json")["step"]) if start is not None else 0
    clock = vdir / "train_seconds"
    spent = float(clock.read_text()) if clock.exists() and start is not None else 0.0
    t0 = time.perf_counter()

    def tick(rec: dict) -> None:
        write_text(clock, f"{spent + time.perf_counter() - t0:.3f}")
        callbacks.on_step(rec)

    cb = dataclasses.replace(callbacks, on_step=tick)
    train(recipe, run, resume=start is not None, callbacks=cb)
    write_text(clock, f"{spent + time.perf_counter() - t0:.3f}")
    return resumed


def run_ablation(
    recipe_path: str | Path,
    variants: str,
    steps: int,
    out: Path,
    data: str | Path | None = None,
    overrides: list[str] | None = None,
    callbacks_for: Callable[[Variant], Callbacks] | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train and evaluate every variant (skipping finished ones); returns one result per variant.

    ``data``: the evaluation set (default: the recipe's ``data.valid``). ``callbacks_for`` gives the
    training callbacks of each variant (progress bars); ``on_result`` sees each finished result.
    """
    base = load_recipe(recipe_path, overrides)
    data = str(data or base.data.valid)
    if not data:
        raise UsageError(f"{recipe_path}: no evaluation set: pass --data or set data.valid")
    if steps < 1:
        raise UsageError(f"--steps {steps}: expected at least 1")
    chosen = parse_variants(variants, base)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for v in chosen:
        vdir = out / v.slug
        done = vdir / "result.json"
        recipe = variant_recipe(base, v, steps)
        if done.exists():
            res = _read_json(done)
            if res["steps"] != steps or res["eval_data"] != data:
                raise UsageError(f"{vdir}: finished with {res['steps']} steps on {res['eval_data']}, not {steps} on {data}; "
                                 "use another --out")
            if res.get("recipe_hash", recipe_hash(recipe)) != recipe_hash(recipe):
                raise UsageError(f"{vdir}: finished with another recipe (the recipe file or --set changed since; see "
                                 f"{vdir / 'run' / 'recipe.toml'}); use another --out, or delete {vdir} to retrain it")
        else:
            res = _run_variant(v, recipe, vdir, data, callbacks_for(v) if callbacks_for else Callbacks())
            write_text(done, json.dumps(res, indent=2))
        results.append(res)
        write_report(out, results, base.eval.metric, {"recipe": str(recipe_path), "steps": steps, "eval_data": data})
        if on_result:
            on_result(res)
    return results


def _run_variant(v: Variant, recipe: Recipe, vdir: Path, data: str, callbacks: Callbacks) -> dict:
    resumed = _train_variant(recipe, vdir, callbacks)
    model, _, meta = load_checkpoint(vdir / "run" / "model")
    t0 = time.perf_counter()
    summary = evaluate(model, data, recipe, vdir / "predictions.jsonl")
    # teacher-forced loss on the same set: after a short run every WER may sit near or above 100%,
    # while this still orders the variants by how well the LLM can read their audio tokens
    loss = validation_loss(model.eval(), ShardedDataset(data), recipe, resolve_precision(recipe.train.precision, model.device),
                           SingleDevice())
    metric = recipe.eval.metric
    return {
        "variant": v.name, "description": v.description, "overrides": v.overrides, "recipe_hash": recipe_hash(recipe),
        "metric": metric, "value": summary.get(metric), "eval": summary, "eval_data": data,
        "trainable_parameters": meta["parameters"]["total"], "parameters": meta["parameters"],
        "steps": recipe.train.max_steps, "resumed_from_step": resumed,
        "samples_per_s": _samples_per_s(vdir / "run" / "metrics.jsonl"),
        "train_wall_s": float((vdir / "train_seconds").read_text()), "eval_wall_s": time.perf_counter() - t0,
        "final_loss": _last_loss(vdir / "run" / "metrics.jsonl"), "eval_loss": loss,
    }


def _last_loss(metrics_path: Path) -> float | None:
    losses = [json.loads(x).get("loss") for x in metrics_path.read_text().splitlines()]
    return next((x for x in reversed(losses) if x is not None), None)


def _fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if metric in ("wer", "cer") else f"{value:.3f}"


def markdown_table(results: list[dict], metric: str) -> str:
    head = f"| variant | {metric.upper()} | eval loss | trainable params | samples/s | train wall | eval wall | final train loss |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        loss, eval_loss = (("-" if r.get(k) is None else f"{r[k]:.3f}") for k in ("final_loss", "eval_loss"))
        lines.append(
            f"| {r['variant']} | {_fmt_metric(metric, r['value'])} | {eval_loss} | {r['trainable_parameters']:,} "
            f"| {r['samples_per_s']:.2f} | {r['train_wall_s']:.0f} s | {r['eval_wall_s']:.0f} s | {loss} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: list[dict], metric: str, info: dict) -> None:
    """ablation.md (the table, then what each variant is) and ablation.json (everything)."""
    legend = "\n".join(f"- `{r['variant']}`: {r['description']} (`{' '.join(r['overrides'])}`)" for r in results)
    ex = results[0]["eval"].get("examples", "?") if results else "?"
    text = (f"Recipe `{info['recipe']}`, {info['steps']} steps per variant, {metric.upper()} on `{info['eval_data']}` "
            f"({ex} examples).\n\n" + markdown_table(results, metric) + "\n" + legend + "\n")
    write_text(out / "ablation.md", text)
    write_text(out / "ablation.json", json.dumps({**info, "metric": metric, "results": results}, indent=2))
