"""LoRA on the frozen backbones, through peft (``[model.encoder.lora]``, ``[model.llm.lora]``).

peft's tuner injects its LoRA layers in place: each targeted ``nn.Linear`` becomes a ``lora.Linear``
wrapping it, at the same attribute. Nothing else about the backbone changes, so our own Whisper
forward (which calls HF's layer modules one by one) and the LLM's ``base_model`` path run through
the LoRA layers without knowing. The base weights stay frozen; only ``lora_A``/``lora_B`` train, in
fp32 whatever the backbone's dtype (peft casts the input to them and the result back).

A checkpoint stores the LoRA matrices beside the adapter in ``adapter.safetensors``, under
``lora.encoder.<module path>`` and ``lora.llm.<module path>``: a few hundred kB per backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from steermoe_core.config import LoRAConfig
from steermoe_core.errors import CheckpointError, RecipeError

SteerMoEModel = nn.Module  # the functions below take a SteerMoEModel (duck-typed: this module sits under it)

PARTS = ("encoder", "llm")
PREFIX = "lora."
ADAPTER_NAME = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise RecipeError("a [model.*.lora] section needs peft: pip install 'steermoe[lora]'") from None
    return peft


def _linear_names(module: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(module: nn.Module, cfg: LoRAConfig, part: str) -> nn.Module:
    """Inject LoRA into ``module`` in place; returns peft's tuner (kept only to merge later).

    ``part`` ("encoder" or "llm") names the recipe section in errors.
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none",
    )
    try:
        tuner = peft.LoraModel(module, config, ADAPTER_NAME)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise RecipeError(
            f"model.{part}.lora.target_modules: {cfg.target_modules} match no layer of the {part} "
            f"(its Linear layers are named {', '.join(_linear_names(module))})"
        ) from None
    for p in lora_parameters(module):
        p.data = p.data.float()  # fp32 master weights, as for the adapter
    return tuner


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in _named_lora(module)]


def _named_lora(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if ".lora_" in n]


def lora_state_dict(model: SteerMoEModel) -> dict[str, torch.Tensor]:
    """The LoRA matrices of both backbones, keyed ``lora.<part>.<parameter path>``."""
    return {
        f"{PREFIX}{part}.{n}": p.detach()
        for part in model.lora for n, p in _named_lora(getattr(model, part))
    }


def lora_part(key: str) -> str:
    """The backbone (``encoder`` or ``llm``) a ``lora.<part>.<parameter path>`` key belongs to."""
    return key[len(PREFIX):].split(".", 1)[0]


def load_lora_state_dict(model: SteerMoEModel, state: dict[str, torch.Tensor], parts: set[str] | None = None) -> None:
    """Load LoRA weights, refusing missing, unexpected or mis-shaped tensors with one line (a
    checkpoint whose LoRA sat on other modules, or on a backbone of another shape). ``parts`` limits
    the check to those backbones (``--init-from`` a checkpoint with LoRA on the encoder only, into a
    recipe that adds it on the LLM: the LLM's starts fresh)."""
    own = {k: v for k, v in lora_state_dict(model).items() if parts is None or lora_part(k) in parts}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"LoRA weights do not match the recipe's backbones (missing {missing[:3]}, unexpected {extra[:3]})")
    params = {f"{PREFIX}{part}.{n}": p for part in model.lora for n, p in _named_lora(getattr(model, part))}
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise CheckpointError(f"LoRA weight {k}: shape {tuple(v.shape)} but the backbone builds {tuple(params[k].shape)}")
            params[k].copy_(v)


def set_lora_training(model: SteerMoEModel, mode: bool) -> None:
    """LoRA dropout follows the model's mode even though the backbones around it stay in eval."""
    for part in model.lora:
        for name, m in getattr(model, part).named_modules():
            if name.rsplit(".", 1)[-1] == "lora_dropout":
                m.train(mode)


def merge_lora(model: SteerMoEModel) -> SteerMoEModel:
    """Fold every LoRA update into its base weight (peft's ``merge_and_unload``) and drop the LoRA
    layers: the backbones become plain HF modules again (what ONNX export needs), computing the
    same function. The model then has no LoRA to train or save; returns it for chaining."""
    for part in list(model.lora):
        tuner = model.lora.pop(part)
        with torch.no_grad():
            for p in lora_parameters(getattr(model, part)):
                p.data = p.data.to(_base_dtype(getattr(model, part)))
            tuner.merge_and_unload()
        if hasattr(getattr(model, part), "peft_config"):
            del getattr(model, part).peft_config
    return model


def _base_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for n, p in module.named_parameters() if ".lora_" not in n)


def has_lora(model: SteerMoEModel, part: str | None = None) -> bool:
    """Whether ``part`` ("encoder", "llm"; None = either) carries unmerged LoRA layers."""
    return bool(model.lora) if part is None else part in model.lora


def attach_lora(model: SteerMoEModel) -> None:
    """Apply the recipe's ``[model.encoder.lora]`` / ``[model.llm.lora]`` to the built backbones."""
    for part in PARTS:
        cfg = getattr(model.cfg, part).lora
        if cfg is not None:
            model.lora[part] = apply_lora(getattr(model, part), cfg, part)


@contextlib.contextmanager
def base_llm(model: SteerMoEModel) -> Iterator[None]:
    """The frozen LLM as it was released, LoRA layers switched off, for prompts without audio (the
    transcript strategy, `serve`'s text chat, behaviour-alignment targets): LoRA trained to read
    audio tokens must not change how the LLM answers text, its skills there are the product's."""
    tuner = getattr(model, "lora", {}).get("llm")
    if tuner is None:
        yield
        return
    tuner.disable_adapter_layers()
    try:
        yield
    finally:
        tuner.enable_adapter_layers()
