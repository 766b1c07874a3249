"""`steermoe train --init-from CHECKPOINT`: a new run that starts from another run's weights and Adam moments.

``--resume`` continues a run exactly (its recipe, schedule and data position); ``--init-from`` starts a
*new* run (this recipe: its learning rates, schedule from step 0, data, LoRA) from a checkpoint's
trained weights. Restarting AdamW with empty moments moves every weight by about the learning rate on the
first steps whatever its gradient, a jolt that set back a settled adapter (docs/voices.md), so where the
checkpoint kept its optimizer state the new run takes its moments too:

- a run's checkpoint (``checkpoints/step-N``) keeps them in ``train_state.pt`` (AdamW's state dict, by
  parameter index within named groups);
- a shipped adapter keeps them in ``optimizer.safetensors`` beside ``adapter.safetensors``, by weight
  name (no pickle in a package), written by ``save_moments``.

Moments are matched by weight name and shape, so a recipe that groups the weights differently (weight
decay splits the projector's group) or adds LoRA still takes every moment that fits; new weights (LoRA
added to a checkpoint without it) start fresh. A checkpoint on other backbones, or whose adapter does
not fit the recipe, is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steermoe_core.atomic import write_text
from steermoe_core.errors import CheckpointError
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.training.strategy import Strategy

MOMENTS_FILE = "optimizer.safetensors"
SLOTS = ("exp_avg", "exp_avg_sq", "step")


def trainable_names(model: SteerMoEModel) -> dict[int, str]:
    """id(parameter) -> the name its weight has in ``adapter_state_dict`` (``lora.<part>.*`` for LoRA)."""
    from steermoe_core.model.lora import PREFIX, _named_lora

    names = {id(p): n for n, p in model.adapter.named_parameters()}
    for part in model.lora:
        names.update({id(p): f"{PREFIX}{part}.{n}" for n, p in _named_lora(getattr(model, part))})
    return names


def _group_params(model: SteerMoEModel, group_names: list[str]) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of each optimizer group, in ``make_optimizer``'s order, for the groups a saved
    optimizer had (``projector_bias`` exists when weight decay split the projector's group)."""
    groups = model.parameter_groups()
    out = {}
    for name in group_names:
        if name == "projector_bias":
            out[name] = [model.projector.bias]
        elif name == "projector" and "projector_bias" in group_names:
            out[name] = [model.projector.weight]
        elif name in groups:
            out[name] = groups[name]
    return out


def moments_from_state_dict(opt_state: dict, model: SteerMoEModel) -> dict[str, torch.Tensor]:
    """An AdamW state dict as ``train_state.pt`` keeps it -> ``{"<weight>#exp_avg": t, ...}`` by weight name.
    Groups the model does not have (LoRA the recipe left out) are passed over."""
    saved_groups = opt_state.get("param_groups", [])
    params = _group_params(model, [g.get("name", "") for g in saved_groups])
    names = trainable_names(model)
    state = opt_state.get("state", {})
    out: dict[str, torch.Tensor] = {}
    for g in saved_groups:
        plist = params.get(g.get("name", ""))
        if plist is None or len(plist) != len(g["params"]):
            continue
        for idx, p in zip(g["params"], plist):
            st = state.get(idx) or state.get(str(idx))
            if not st or id(p) not in names:
                continue
            for slot in SLOTS:
                if slot in st:
                    out[f"{names[id(p)]}#{slot}"] = torch.as_tensor(st[slot]).detach().float().cpu()
    return out


def moments_of(opt: torch.optim.Optimizer, model: SteerMoEModel) -> dict[str, torch.Tensor]:
    """A live optimizer's moments by weight name (what ``save_moments`` writes)."""
    return moments_from_state_dict(opt.state_dict(), model)


def save_moments(moments: dict[str, torch.Tensor], folder: Path) -> Path:
    """``folder/optimizer.safetensors``, written atomically."""
    from safetensors.torch import save

    from steermoe_core.atomic import atomic_file

    path = folder / MOMENTS_FILE
    with atomic_file(path) as f:
        f.write(save({k: v.contiguous() for k, v in moments.items()}))
    return path


PORTABLE_FILES = ("adapter.safetensors", "meta.json", "recipe.toml")


def save_portable(model_dir: Path, dest: Path, state_from: Path | None = None) -> Path:
    """``model_dir`` as a checkpoint travels (in the package, or in a repository from one machine to the
    next): its adapter, meta.json and recipe, and the Adam moments of ``state_from``'s ``train_state.pt``
    (a run's checkpoint; default ``model_dir`` itself) by weight name in ``optimizer.safetensors``: no
    pickle, and `steermoe train --init-from DEST` continues from it as from the run. The moments must
    belong to these weights: ``state_from``'s adapter has to be ``model_dir``'s."""
    from steermoe_core.atomic import atomic_file

    state_from = Path(state_from or model_dir)
    if (state_from / "adapter.safetensors").read_bytes() != (model_dir / "adapter.safetensors").read_bytes():
        raise CheckpointError(f"{state_from}: its adapter is not {model_dir}'s, so its optimizer state does not belong to it")
    dest.mkdir(parents=True, exist_ok=True)
    for name in PORTABLE_FILES:
        blob = (model_dir / name).read_bytes()
        with atomic_file(dest / name) as f:
            f.write(blob)
    (dest / MOMENTS_FILE).unlink(missing_ok=True)  # never the moments of an earlier adapter
    if (state_from / "train_state.pt").is_file():
        from steermoe_core.model.checkpoint import load_checkpoint, read_train_state

        opt_state = read_train_state(state_from).get("optimizer")
        if opt_state is not None:  # None: a DeepSpeed run keeps its own partitions
            model = load_checkpoint(model_dir, torch.device("cpu"))[0]
            save_moments(moments_from_state_dict(opt_state, model), dest)
    return dest


def read_moments(folder: Path, model: SteerMoEModel | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(moments by weight name, where they came from); empty when the checkpoint kept none. ``model``
    names the parameters of a ``train_state.pt`` (by index); None loads the checkpoint's own, and only
    when that file is what must be read."""
    if (folder / MOMENTS_FILE).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(folder / MOMENTS_FILE)), MOMENTS_FILE
        except Exception as e:
            raise CheckpointError(f"{folder / MOMENTS_FILE}: damaged optimizer state ({type(e).__name__}: {e})") from None
    if (folder / "train_state.pt").is_file():
        from steermoe_core.model.checkpoint import read_train_state

        opt_state = read_train_state(folder).get("optimizer")
        if opt_state is None:  # a DeepSpeed run keeps its own partitions
            return {}, "train_state.pt (optimizer kept by the deepspeed engine: not read)"
        if model is None:
            from steermoe_core.model.checkpoint import load_checkpoint

            model = load_checkpoint(folder, torch.device("cpu"))[0]
        return moments_from_state_dict(opt_state, model), "train_state.pt"
    return {}, "none saved"


def restore_moments(opt: torch.optim.Optimizer, model: SteerMoEModel, moments: dict[str, torch.Tensor]) -> int:
    """Give each of ``opt``'s parameters the saved moments of the weight with its name and shape;
    returns how many parameters got them (the others start fresh)."""
    names = trainable_names(model)
    restored = 0
    for g in opt.param_groups:
        for p in g["params"]:
            name = names.get(id(p))
            if name is None or f"{name}#exp_avg" not in moments or f"{name}#exp_avg_sq" not in moments:
                continue
            avg, sq = moments[f"{name}#exp_avg"], moments[f"{name}#exp_avg_sq"]
            if avg.shape != p.shape or sq.shape != p.shape:
                continue
            step = moments.get(f"{name}#step", torch.tensor(0.0))
            st = {"exp_avg": avg.to(p.device, p.dtype).clone(), "exp_avg_sq": sq.to(p.device, p.dtype).clone()}
            # AdamW keeps its step as a float tensor (on the parameter's device when fused/capturable)
            fused = bool(g.get("fused") or g.get("capturable"))
            st["step"] = step.float().reshape(()).clone().to(p.device if fused else "cpu")
            opt.state[p] = st
            restored += 1
    return restored


def lineage(recipe, meta: dict) -> list[dict]:
    """The runs a checkpoint (its recipe and meta.json) grew from, oldest first, ending with itself: each
    one's last step and recipe fingerprint (``config.recipe_fingerprint``). A staged recipe (a CTC stage
    started from a full run, a reader started from the stage) can then be checked from its last
    checkpoint alone."""
    from steermoe_core.config import recipe_fingerprint

    parent = meta.get("init_from") or meta.get("reader_init_from") or {}
    return [*parent.get("lineage", []), {"step": meta.get("step"), "recipe": recipe_fingerprint(recipe)}]


def init_from(model: SteerMoEModel, opt: torch.optim.Optimizer | None, path: Path) -> dict:
    """Load ``path``'s adapter (and LoRA, when both have it) into ``model`` and, where saved, its Adam
    moments into ``opt``. Returns what was taken, for the log and the run's meta.json."""
    from steermoe_core.model.checkpoint import check_backbones, read_checkpoint
    from steermoe_core.model.lora import load_lora_state_dict, lora_part

    path = Path(path)
    src_recipe, meta, state = read_checkpoint(path)
    check_backbones(model, meta, path)
    adapter = {k: v for k, v in state.items() if not k.startswith("lora.")}
    lora = {k: v for k, v in state.items() if k.startswith("lora.")}
    try:
        model.adapter.load_checked(adapter)
        have = {lora_part(k) for k in lora}
        if have - set(model.lora):
            raise CheckpointError(f"it has LoRA weights and this recipe has no {' / '.join(f'[model.{p}.lora]' for p in sorted(have - set(model.lora)))}")
        if lora:
            load_lora_state_dict(model, lora, have)
    except CheckpointError as e:
        raise CheckpointError(f"--init-from {path}: {e}") from None
    state_of = {p: "loaded" if p in have else "fresh" for p in model.lora}
    states = set(state_of.values())
    lora_info = ", ".join(f"{p} {s}" for p, s in state_of.items()) if len(states) > 1 else (states.pop() if states else "none")
    info = {"path": str(path), "step": meta.get("step"), "lora": lora_info, "lineage": lineage(src_recipe, meta)}
    if opt is not None:
        moments, source = read_moments(path, model)
        n = restore_moments(opt, model, moments) if moments else 0
        total = sum(len(g["params"]) for g in opt.param_groups)
        info["optimizer"] = f"{n} of {total} parameters from {source}" if moments else source
    return info


def initialise(model: SteerMoEModel, opt, out: Path, start: Path | None, init_from_path: Path | None, strategy: Strategy) -> dict | None:
    """Where a run's weights came from (kept in ``init_from.json`` so checkpoints after a resume still say it):
    a new run with ``init_from`` loads that checkpoint's adapter and Adam moments (not under DeepSpeed,
    whose optimizer keeps its own partitions)."""
    record = out / "init_from.json"
    if start is not None:
        return json.loads(record.read_text()) if record.is_file() else None
    if init_from_path is None:
        if strategy.is_main:
            record.unlink(missing_ok=True)
        return None
    info = init_from(model, None if strategy.name == "deepspeed" else opt, init_from_path)
    if strategy.name == "deepspeed":
        info["optimizer"] = "not restored (distributed.engine = deepspeed keeps its own optimizer state)"
    if strategy.is_main:
        write_text(record, json.dumps(info, indent=2))
    return info
