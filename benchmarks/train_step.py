"""Training-step speed at any shape, random weights, CPU or GPU.

    python benchmarks/train_step.py --whisper large-v3 --llm qwen2.5-7b --layout librispeech
    python benchmarks/train_step.py --whisper large-v3 --llm qwen2.5-7b --layout reference --batch 4
    python benchmarks/train_step.py --smoke            # tiny shapes on CPU (what CI runs)
    python benchmarks/train_step.py --recipe recipes/demo_tiny.toml --data DATASET --steps 8

Prints step time, samples/s, audio hours per hour, target tokens/s, peak memory, FLOPs per sample,
model FLOP utilisation against --peak-tflops, and a split of one step into its phases.

``--recipe`` times the product's real step instead: the recipe's own backbones (real weights), its
batches from a prepared dataset through the training loader (length-bucketed, augmented), and both
stages of a CTC curriculum, the CTC-only one (no LLM pass) and the joint one, each with its split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build, librispeech_batches, reference_batches, step_flops  # noqa: E402

from steermoe_core.config import TrainConfig  # noqa: E402
from steermoe_core.runtime import autocast, resolve_precision  # noqa: E402
from steermoe_core.training.loop import train_step  # noqa: E402
from steermoe_core.training.optim import make_optimizer  # noqa: E402
from steermoe_core.training.strategy import SingleDevice  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, opt, batch, precision) -> torch.Tensor:
    """The product's own training step (steermoe_core.training.loop.train_step), one micro-batch."""
    return train_step(model, opt, [batch], precision, clip_grad=1.0)["ce"]


def phase_split(model, opt, batch, device, precision: str) -> dict[str, float]:
    """One step cut into phases with a sync between each (slower than a real step; for proportions).

    The phases call the same model methods and optimizer step as ``train_step``; only the timing
    boundaries are added."""
    times = {}
    sync(device)
    t = time.perf_counter()
    batch.waves = batch.waves.to(device, non_blocking=True)
    sync(device)
    times["data_h2d"] = time.perf_counter() - t
    real_encode = model.audio_tokens  # what the loss's forward calls for the audio side
    t = time.perf_counter()
    with autocast(device, precision):
        audio = real_encode(batch.waves, batch.lengths)
    sync(device)
    times["encoder_steering_fwd"] = time.perf_counter() - t
    leaf = audio.detach().requires_grad_()
    model.audio_tokens = lambda *a: leaf
    t = time.perf_counter()
    with autocast(device, precision):
        out = model(batch)
    sync(device)
    times["llm_fwd"] = time.perf_counter() - t
    t = time.perf_counter()
    out["loss"].backward()
    sync(device)
    times["llm_bwd"] = time.perf_counter() - t
    t = time.perf_counter()
    audio.backward(leaf.grad)
    sync(device)
    times["encoder_steering_bwd"] = time.perf_counter() - t
    del model.audio_tokens  # the instance attribute shadowed the method
    t = time.perf_counter()
    SingleDevice().optimizer_step(opt, 1.0)
    sync(device)
    times["optimizer"] = time.perf_counter() - t
    return times


def _use_fused_ctc(model, on: bool) -> None:
    from steermoe_core.model import ctc, steermoe

    steermoe.vocab_ctc_loss = ctc.vocab_ctc_loss if on else ctc.plain_vocab_ctc_loss


def _fused_ctc_on(model) -> bool:
    from steermoe_core.model import ctc, steermoe

    return steermoe.vocab_ctc_loss is ctc.vocab_ctc_loss


AB_SWITCHES = {
    # name -> (what it turns on, a function setting it on the model, one reading it, the stages it concerns)
    "prefix": ("the chat prefix's keys and values reused from their cache (off: run every step)",
               lambda model, on: setattr(model, "reuse_prefix", on), lambda model: model.reuse_prefix, ("joint",)),
    "drop_blank": ("the LLM reading only the audio tokens the CTC read-out keeps (model.projector.drop_blank)",
                   lambda model, on: setattr(model.adapter, "drop_blank", on), lambda model: model.adapter.drop_blank, ("joint",)),
    "fused_ctc": ("the CTC loss without a (tokens x vocabulary) log-softmax (model/ctc.py; off: the plain log-softmax + F.ctc_loss)",
                  _use_fused_ctc, _fused_ctc_on, ("ctc_only", "joint")),
}


def alternate(model, opt, batches, precision, clip: float, switch: str) -> dict:
    """Steps with ``switch`` off and on, the two alternating on the same batches so that a busy
    machine's drift falls on both alike; and the loss of the first batch both ways, before any of these
    steps. The model is left as the recipe set it."""
    _, flip, read, _ = AB_SWITCHES[switch]
    was = read(model)
    with torch.no_grad():
        loss = {}
        for flag in (False, True):
            flip(model, flag)
            loss[flag] = float(model(batches[0])["loss"])
    times: dict[bool, list[float]] = {False: [], True: []}
    for i, b in enumerate(batches):
        for flag in ((False, True) if i % 2 == 0 else (True, False)):
            flip(model, flag)
            t = time.perf_counter()
            train_step(model, opt, [b], precision, clip)
            times[flag].append(time.perf_counter() - t)
    flip(model, was)
    n = sum(len(b.lengths) for b in batches)
    return {"switch": AB_SWITCHES[switch][0], "loss_off": loss[False], "loss_on": loss[True],
            "step_s_off": sum(times[False]) / len(batches), "step_s_on": sum(times[True]) / len(batches),
            "samples_per_s_off": n / sum(times[False]), "samples_per_s_on": n / sum(times[True])}


def recipe_steps(args) -> dict:
    """The product's own step on a recipe's real backbones and a prepared dataset, per stage."""
    from steermoe_core.config import load_recipe
    from steermoe_core.data.dataset import ShardedDataset
    from steermoe_core.runtime import pick_device
    from steermoe_core.training.loop import Position, _model_for_run, micro_batch_stream

    recipe = load_recipe(args.recipe, [f"data.train={args.data}", *args.set])
    device = pick_device(recipe.train.device)
    precision = resolve_precision(args.precision if args.precision != "auto" else recipe.train.precision, device)
    torch.manual_seed(recipe.train.seed)
    model = _model_for_run(recipe, None, device)
    model.train()
    opt = make_optimizer(model, recipe.train, device)
    if args.init_from is not None:  # a trained adapter: what drop_blank keeps depends on it
        from steermoe_core.training.init_from import init_from

        init_from(model, opt, args.init_from)
    ds = ShardedDataset(recipe.data.train, recipe.data.max_duration)
    stream = micro_batch_stream(ds, recipe, Position(), SingleDevice())
    res: dict = {"device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device), "torch": torch.__version__,
                 "recipe": str(args.recipe), "data": str(args.data), "precision": precision.name,
                 "threads": torch.get_num_threads(), "batch_size": recipe.data.batch_size}
    stages = {"ctc_only": True, "joint": False}
    for stage in args.stages.split(","):
        model.ctc_only = stages[stage]
        t = time.perf_counter()
        batches = [next(stream)[0] for _ in range(args.warmup + (args.steps or 6))]
        data_s = time.perf_counter() - t
        for b in batches[: args.warmup]:
            train_step(model, opt, [b], precision, recipe.train.clip_grad)
        timed = batches[args.warmup :]
        t0 = time.perf_counter()
        for b in timed:
            train_step(model, opt, [b], precision, recipe.train.clip_grad)
        wall = time.perf_counter() - t0
        samples = sum(len(b.lengths) for b in timed)
        audio_s = sum(float(b.lengths.sum()) / 16000 for b in timed)
        split = phase_split(model, opt, timed[0], device, precision)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(model, opt, [timed[-1]], precision, recipe.train.clip_grad)
            print(f"-- {stage}: one step, operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        if args.ab and stage in AB_SWITCHES[args.ab][3]:
            res[f"ab_{args.ab}_{stage}"] = alternate(model, opt, timed, precision, recipe.train.clip_grad, args.ab)
        res[stage] = {"steps": len(timed), "step_s": wall / len(timed), "samples_per_s": samples / wall,
                      "audio_s_per_s": audio_s / wall, "mean_clip_s": audio_s / samples,
                      "data_s_per_batch": data_s / len(batches), "split_s": split}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper", default="large-v3")
    ap.add_argument("--llm", default="qwen2.5-7b")
    ap.add_argument("--layout", choices=["librispeech", "reference"], default="librispeech")
    ap.add_argument("--batch", type=int, default=4, help="reference layout: clips per batch")
    ap.add_argument("--batch-seconds", type=float, default=480.0, help="librispeech layout: padded seconds per batch")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--utterances", type=int, default=400, help="librispeech layout: clips drawn")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (0 = all batches once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--cudnn-attention", action="store_true", help="keep torch's cuDNN attention on (the product turns it off on CUDA)")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile encoder layers and LLM layers")
    ap.add_argument("--peak-tflops", type=float, default=778.0, help="measured bf16 matmul ceiling of the card")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 3 steps")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--recipe", type=Path, help="time this recipe's real step (its backbones, --data's batches)")
    ap.add_argument("--data", type=Path, help="--recipe: a prepared dataset folder to draw batches from")
    ap.add_argument("--set", action="append", default=[], help="--recipe: a recipe override, KEY=VALUE (repeatable)")
    ap.add_argument("--stages", default="ctc_only,joint", help="--recipe: which stages to time (ctc_only, joint)")
    ap.add_argument("--ab", choices=sorted(AB_SWITCHES), help="--recipe: also time steps with this switch off and on, alternating "
                    "on the same batches (prefix: the chat prefix's cache; drop_blank: the LLM reads only the tokens the CTC read-out keeps; "
                    "fused_ctc: the CTC loss without a (tokens x vocabulary) log-softmax)")
    ap.add_argument("--init-from", type=Path, help="--recipe: start from this checkpoint's adapter (and LoRA) weights")
    ap.add_argument("--profile", type=int, default=0, help="--recipe: also print the N costliest operators of one step (torch.profiler)")
    args = ap.parse_args()
    if args.recipe is not None:
        if args.data is None:
            ap.error("--recipe needs --data (a prepared dataset folder)")
        res = recipe_steps(args)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return
    if args.smoke:
        args.whisper, args.llm, args.device, args.utterances, args.steps, args.warmup = "tiny", "smoke", "cpu", 12, 2, 1
        args.batch_seconds, args.batch = 60.0, 2
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    print(f"precision: {precision}")
    trim = args.layout == "librispeech"
    model = build(args.whisper, args.llm, device, trim, cudnn_attention=args.cudnn_attention)
    model.max_target_tokens = 448
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    if args.compile:
        for i, layer in enumerate(model.encoder.layers):
            model.encoder.layers[i] = torch.compile(layer, dynamic=True)
        for i, layer in enumerate(model.llm.base_model.layers):
            model.llm.base_model.layers[i] = torch.compile(layer, dynamic=True)
    model.train()
    opt = make_optimizer(model, TrainConfig(lr=1e-4), device)

    if trim:
        work = librispeech_batches(args.utterances, args.batch_seconds, args.max_batch, device)
    else:
        work = reference_batches(max(args.steps, 1) + args.warmup, args.batch, device)
    batches = work.batches
    warm, timed = batches[: args.warmup], batches[args.warmup :]
    if args.steps:
        timed = (timed * (args.steps // max(len(timed), 1) + 1))[: args.steps]
    for b in warm:
        step(model, opt, b, precision)
    split = phase_split(model, opt, timed[0], device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = sum(step_flops(model, b) for b in timed)
    samples = sum(len(b.lengths) for b in timed)
    audio_s = sum(float(b.lengths.sum()) / 16000 for b in timed)
    tokens = sum(len(model.layout.target_ids(t, 448)) for b in timed for t in b.targets)
    sync(device)
    t0 = time.perf_counter()
    for b in timed:
        step(model, opt, b, precision)
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "whisper": args.whisper, "llm": args.llm, "layout": args.layout,
        "precision": precision.name, "steps": len(timed), "samples": samples, "mean_batch": samples / len(timed),
        "step_s": wall / len(timed), "samples_per_s": samples / wall, "audio_hours_per_hour": audio_s / wall,
        "target_tokens_per_s": tokens / wall, "peak_mem_gib": peak, "tflop_per_sample": flops / samples / 1e12,
        "achieved_tflops": flops / wall / 1e12, "mfu": flops / wall / 1e12 / args.peak_tflops,
        "split_s": split, "grad_ckpt": args.grad_ckpt, "compile": args.compile, "cudnn_attention": args.cudnn_attention,
    }
    if args.layout == "librispeech":
        res["librispeech960_epoch_h"] = 281_241 / res["samples_per_s"] / 3600
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    width = max(len(k) for k in res)
    for k, v in res.items():
        if isinstance(v, dict):
            v = "  ".join(f"{a}={b * 1000:.1f}ms" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
