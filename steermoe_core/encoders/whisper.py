"""Whisper's encoder on HF's own layer modules, with our forward.

HF's ``WhisperEncoder.forward`` insists on exactly 3000 mel frames (30 s). Ours accepts any length
up to that, slices the positional table to the real length, masks padded frames inside a batch, and
calls a hook after every layer: that is where SteerMoE steers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..weights import load_prefixed_state, resolve_model_dir, to_device

LayerHook = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]


def load_whisper_encoder(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
    """A frozen ``WhisperEncoder`` from a hub id, an HF folder, or a CTranslate2 folder."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = resolve_model_dir(path, patterns=["config.json", "*.safetensors", "*.json", "model.bin"])
    if (folder / "model.bin").exists() and not list(folder.glob("*.safetensors")):
        from .ctranslate2 import whisper_encoder_from_ct2

        encoder = whisper_encoder_from_ct2(folder, attn_implementation)
    else:
        config = WhisperConfig.from_pretrained(folder)
        config._attn_implementation = attn_implementation
        encoder = WhisperEncoder(config)
        state = load_prefixed_state(folder, ("model.encoder.", "encoder."))
        missing = encoder.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise ValueError(f"{folder}: not a Whisper checkpoint (missing encoder weights, e.g. {missing[0]})")
    encoder.to(dtype)
    return freeze(encoder)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (SteerMoEModel.train() keeps backbones in eval: no dropout)."""
    module.requires_grad_(False)
    return module.eval()


def whisper_dims(encoder: nn.Module) -> tuple[int, int, int]:
    """(num_layers, hidden size, mel bins)."""
    c = encoder.config
    return c.encoder_layers, c.d_model, c.num_mel_bins


def encode(
    encoder: nn.Module,
    features: torch.Tensor,
    frames: torch.Tensor,
    trim_padding: bool = True,
    hook: LayerHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_mels, F) features with ``frames`` real mel frames each -> (B, T, D) states and (B, T) mask.

    With ``trim_padding=False`` the features are padded to 3000 frames and every output frame counts
    as real: exactly HF's computation (the reference's layout).
    """
    max_frames = encoder.config.max_source_positions * 2
    if not trim_padding and features.shape[-1] != max_frames:
        features = nn.functional.pad(features, (0, max_frames - features.shape[-1]))
    if features.shape[-1] > max_frames:
        raise ValueError(f"audio longer than {max_frames // 100} s reached the encoder; split it into windows first")
    dtype = encoder.conv1.weight.dtype
    x = nn.functional.gelu(encoder.conv1(features.to(dtype)))
    x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    t = x.shape[1]
    x = x + encoder.embed_positions.weight[:t]
    b = x.shape[0]
    enc_frames = (frames.cpu() + 1) // 2  # frame counts live on the host: no device sync below
    uniform = bool((enc_frames >= t).all())
    enc_frames = to_device(enc_frames, x.device)
    if trim_padding:
        mask = torch.arange(t, device=x.device)[None, :] < enc_frames[:, None]
    else:
        mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
    # Padded keys are masked out; a uniform-length batch passes None so SDPA may pick flash kernels.
    attn_mask = None
    if trim_padding and not uniform:
        attn_mask = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device)
        attn_mask.masked_fill_(~mask[:, None, None, :], torch.finfo(x.dtype).min)
    for i, layer in enumerate(encoder.layers):
        x = layer(x, attn_mask)
        if isinstance(x, tuple):  # transformers < 5 returns a tuple
            x = x[0]
        if hook is not None:
            x = hook(i, x, mask)
    return x, mask


def final_norm(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder.layer_norm(x)
