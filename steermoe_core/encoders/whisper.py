"""Whisper's encoder on HF's own layer modules, with our forward.

HF's ``WhisperEncoder.forward`` insists on exactly 3000 mel frames (30 s). Ours accepts any length
up to that, slices the positional table to the real length, masks padded frames inside a batch, and
calls a hook after every layer: that is where SteerMoE steers.
"""

from __future__ import annotations

import torch
from torch import nn

from steermoe_core.backbones.weights import load_prefixed_state, resolve_model_dir
from steermoe_core.encoders.base import AudioEncoder, LayerHook, padded_width
from steermoe_core.encoders.log_mel import HOP, MAX_FRAMES, batch_log_mel
from steermoe_core.errors import BackboneError
from steermoe_core.runtime import to_device


def load_hf_whisper_encoder(path: str, attn_implementation: str = "sdpa") -> nn.Module:
    """HF's ``WhisperEncoder`` from a hub id, an HF folder, or a CTranslate2 folder (converted, cached)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = resolve_model_dir(path, patterns=["config.json", "*.safetensors", "*.json", "model.bin"])
    if (folder / "model.bin").exists() and not list(folder.glob("*.safetensors")):
        from steermoe_core.backbones.ctranslate2 import whisper_encoder_from_ct2

        return whisper_encoder_from_ct2(folder, attn_implementation)
    config = WhisperConfig.from_pretrained(folder)
    config._attn_implementation = attn_implementation
    encoder = WhisperEncoder(config)
    state = load_prefixed_state(folder, ("model.encoder.", "encoder."))
    missing = encoder.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise BackboneError(f"{folder}: not a Whisper checkpoint (missing encoder weights, e.g. {missing[0]})")
    return encoder


class WhisperAudioEncoder(AudioEncoder):
    """Whisper (tiny ... large-v3): log-mel front end, 2x conv subsampling (20 ms frames), L layers."""

    kind = "whisper"
    default_stride = 4  # 50 Hz -> 12.5 Hz

    def __init__(self, model: nn.Module, trim_padding: bool = True):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.trim_padding = trim_padding
        c = model.config
        self.num_layers, self.dim, self.n_mels = c.encoder_layers, c.d_model, c.num_mel_bins
        self.max_frames = c.max_source_positions * 2
        self.max_samples = self.max_frames * HOP

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def features(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.trim_padding:
            return batch_log_mel(waves, lengths, self.n_mels, pad_to=MAX_FRAMES)
        feats, frames = batch_log_mel(waves, lengths, self.n_mels)
        width = padded_width(feats.shape[-1], self.pad_multiple, self.max_frames)
        return nn.functional.pad(feats, (0, width - feats.shape[-1])), frames

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if not self.trim_padding:
            return torch.full((len(lengths),), self.max_frames // 2, dtype=torch.long)
        return self.audio_frames(lengths)

    def audio_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        frames = (torch.as_tensor(lengths).cpu() // HOP).clamp_max(self.max_frames)
        return (frames + 1) // 2

    def forward_layers(
        self, feats: torch.Tensor, feat_lengths: torch.Tensor, hook: LayerHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, F) features with ``feat_lengths`` real mel frames -> (B, T, D) states, (B, T) mask.

        With ``trim_padding=False`` the features are padded to 3000 frames and every output frame
        counts as real: exactly HF's computation (the reference's layout).
        """
        enc = self.model
        if not self.trim_padding and feats.shape[-1] != self.max_frames:
            feats = nn.functional.pad(feats, (0, self.max_frames - feats.shape[-1]))
        if feats.shape[-1] > self.max_frames:
            raise ValueError(f"audio longer than {self.max_frames // 100} s reached the encoder; split it into windows first")
        dtype = enc.conv1.weight.dtype
        x = nn.functional.gelu(enc.conv1(feats.to(dtype)))
        f = x.shape[-1]
        # A clip shorter than the batch must see, at its end, the zeros conv2 pads with when it is
        # alone: conv1's output past its features (gelu(bias) != 0) would leak into its last frame
        # and, through attention, into every frame. (Under export the lengths are graph inputs.)
        if self.trim_padding and (_exporting() or bool((feat_lengths.cpu() < f).any())):
            x = x * (torch.arange(f, device=x.device) < to_device(feat_lengths, x.device)[:, None])[:, None, :].to(dtype)
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        b, t = x.shape[:2]
        x = x + enc.embed_positions.weight[:t]
        enc_frames = (feat_lengths.cpu() + 1) // 2  # frame counts live on the host: no device sync below
        # under export the lengths are graph inputs, not host values: always build the mask then
        uniform = not _exporting() and bool((enc_frames >= t).all())
        enc_frames = to_device(enc_frames, x.device)
        if self.trim_padding:
            mask = torch.arange(t, device=x.device)[None, :] < enc_frames[:, None]
        else:
            mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        # Padded keys are masked out; a uniform-length batch passes None so SDPA may pick flash kernels.
        attn_mask = None
        if self.trim_padding and not uniform:
            attn_mask = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device)
            attn_mask.masked_fill_(~mask[:, None, None, :], torch.finfo(x.dtype).min)
        for i, layer in enumerate(enc.layers):
            x = layer(x, attn_mask)
            if isinstance(x, tuple):  # transformers < 5 returns a tuple
                x = x[0]
            if hook is not None:
                x = hook(i, x, mask)
        return x, mask

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.layer_norm(x)

    def identity(self) -> dict:
        c = self.model.config
        return {k: getattr(c, k, None) for k in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins")}

    def fingerprint_tensor(self) -> torch.Tensor:
        return self.model.conv1.weight


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def load(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", trim_padding: bool = True) -> WhisperAudioEncoder:
    """The registry's loader for ``kind = "whisper"``."""
    return WhisperAudioEncoder(load_hf_whisper_encoder(path, attn_implementation).to(dtype), trim_padding)
