"""Checkpoints (docs/design.md#checkpoints): a folder with the adapter only, the resolved recipe and meta.

    CKPT/adapter.safetensors   trainable weights (megabytes)
    CKPT/recipe.toml           the resolved recipe, enough to rebuild the model
    CKPT/meta.json             version, backbone identity, parameter counts, step, metrics
    CKPT/train_state.pt        optimizer, scheduler, RNG and data position (only for --resume)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steermoe_core import __version__
from steermoe_core.atomic import atomic_dir
from steermoe_core.config import Recipe, dump_recipe, load_recipe
from steermoe_core.errors import CheckpointError
from steermoe_core.model.steermoe import SteerMoEModel, backbone_identity


def save_checkpoint(
    model: SteerMoEModel, recipe: Recipe, path: Path, step: int, metrics: dict, train_state: dict | None = None,
    run_info: dict | None = None, identity: dict | None = None,
) -> Path:
    """``run_info`` (engine, world size, precision) goes into meta.json beside the step and metrics.
    ``identity``: {"parameters", "backbones"} measured before an engine partitioned the weights
    (ZeRO-3 leaves empty tensors outside forward, frozen backbones included); None: measured now."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        state = {k: v.float().contiguous().cpu() for k, v in model.adapter_state_dict().items()}
        save_file(state, str(tmp / "adapter.safetensors"))
        (tmp / "recipe.toml").write_text(dump_recipe(recipe))
        meta = {
            "steermoe_version": __version__,
            "step": step,
            **(run_info or {}),
            "metrics": metrics,
            **(identity or model_identity(model)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
    return path


def model_identity(model: SteerMoEModel) -> dict:
    """What meta.json records about the model itself: parameter counts and backbone fingerprints."""
    return {"parameters": model.parameter_counts(), "backbones": backbone_identity(model)}


def read_checkpoint(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict, dict[str, torch.Tensor]]:
    """(recipe, meta, adapter weights). The recipe's ``trust_remote_code`` is always reset to False:
    a checkpoint is data from elsewhere and must never switch on code execution by itself."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("adapter.safetensors", "recipe.toml", "meta.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a steermoe checkpoint (no {name})")
    recipe = load_recipe(path / "recipe.toml", overrides)
    recipe.model.llm.trust_remote_code = False
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = load_file(str(path / "adapter.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None
    return recipe, meta, state


def check_backbones(model: SteerMoEModel, meta: dict, path: Path) -> None:
    """Refuse an adapter trained on other backbones, and say exactly what differs."""
    want, have = meta.get("backbones", {}), backbone_identity(model)
    diffs = []
    for part in ("encoder", "llm"):
        w, h = want.get(part, {}), have[part]
        for k, v in w.get("config", {}).items():
            if h["config"].get(k) != v:
                diffs.append(f"{part}.{k}: checkpoint {v}, loaded {h['config'].get(k)}")
        if w.get("weights") and w["weights"] != h["weights"]:
            diffs.append(f"{part} weights differ from those trained with ({w.get('path')} vs {h['path']})")
    if diffs:
        raise CheckpointError(f"{path}: backbones do not match the checkpoint: " + "; ".join(diffs))


def load_checkpoint(
    path: str | Path,
    device: torch.device | None = None,
    overrides: list[str] | None = None,
    model: SteerMoEModel | None = None,
    trust_remote_code: bool = False,
) -> tuple[SteerMoEModel, Recipe, dict]:
    """Rebuild the model from the checkpoint's recipe (or reuse ``model``'s backbones) and load the adapter.

    ``trust_remote_code`` comes only from the caller (the user's command line or own recipe).
    """
    from steermoe_core.model.build import build_model
    from steermoe_core.runtime import pick_device

    path = Path(path)
    recipe, meta, state = read_checkpoint(path, overrides)
    recipe.model.llm.trust_remote_code = trust_remote_code
    device = device or pick_device(recipe.train.device)
    if model is None:
        model = build_model(recipe.model, device, recipe.train.seed, trust_remote_code)
    check_backbones(model, meta, path)
    try:
        model.load_adapter_state_dict(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.pad_to_repeated_shapes(recipe.data.pad_multiple_seconds)  # as it trained: repeated shapes in eval and infer too
    return model.eval(), recipe, meta


def load_train_state(path: Path) -> dict:
    return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)


def read_train_state(start: Path) -> dict:
    """The checkpoint's train state, loaded with torch's weights-only unpickler: a file that needs
    anything more (code to run) is refused as foreign, never loaded with ``weights_only=False``."""
    import pickle

    path = start / "train_state.pt"
    try:
        st = load_train_state(start)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: not a steermoe train state; refusing to unpickle it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: damaged train state ({first})") from None
    need = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng")
    if not isinstance(st, dict) or any(k not in st for k in need):
        raise CheckpointError(f"{path}: not a steermoe train state; refusing to use it")
    meta_step = json.loads((start / "meta.json").read_text()).get("step")
    if int(st["step"]) != meta_step:
        raise CheckpointError(f"{path}: step {st['step']} does not match meta.json's step {meta_step}")
    return st
